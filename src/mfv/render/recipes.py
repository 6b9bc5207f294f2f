"""The recipes, as data: which optimizer, with which schedule or settings (no torch here).

- `paper-mean`, `paper-center`: the paper's octave schedules (paper-spec §2.6), executed or as
  written, run by `mfv.render.paper`;
- `fourier`: Lucid's Fourier parameterization with its usual transforms, run by
  `mfv.render.fourier`;
- `maco`: MACO (Fel et al. 2023): only the Fourier phase is optimized, the amplitude fixed to
  the mean spectrum of the scanned images (`mfv.render.maco`);
- `anchored`: the Fourier optimizer from the facet's mean image, with the target's objective
  anchored to the facet (`mfv.render.anchor`: a pull of the code toward the facet's centre and,
  optionally, sort-matching of intermediate activations to the facet's photos).


Numbers are those of the authors' scripts `act_max.tvd.mean.py` (mean-image start) and
`act_max.tvd.center.py` (center-biased regularization), for CaffeNet at 227 px in the 0..255
domain. mfv keeps the 0..255 domain, so step sizes and TV weights mean what they meant, and scales
sizes and margins with the model's input size (`margin` is given at 227 px).

The scripts were Python 2, which changes two things (reproduced unless `as_written=True`):
- an all-integer step ramp (mean octave 1: 1 → 2) uses integer division, so the step stays 1;
- the TV weight is computed as `start - (start - end*i) / n`, which ramps from ≈start to
  ≈start+end rather than from start to end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mfv.core.errors import MfvError


@dataclass(frozen=True)
class Octave:
    """One octave: optional upscale, then `iters` normalized-gradient steps on jittered crops."""

    iters: int
    step: tuple[float, float]  # start, end (ints stay ints: see `as_written`)
    tv_weight: tuple[float, float]
    window: float  # crop offset sd as a fraction of the slack
    scale: float | None = None  # upscale the canvas before the octave
    margin: int = 0  # gradient mask width at 227 px
    objective: str = "target"  # "target", or "prob": softmax probability of a class target

    def step_size(self, i: int, as_written: bool = False) -> float:
        start, end = self.step
        if not as_written and all(isinstance(v, int) for v in self.step):
            return start + ((end - start) * i) // self.iters  # Python 2 integer division
        return start + ((end - start) * i) / self.iters

    def tv(self, i: int, as_written: bool = False) -> float:
        start, end = self.tv_weight
        if not as_written:
            return start - (start - end * i) / self.iters
        return start + (end - start) * i / self.iters

    def scaled(self, factor: float) -> Octave:
        """The same octave with its iteration count scaled (at least two steps: with one, the
        executed TV ramp `start·(1 − 1/n)` would give weight 0, i.e. infinite smoothing)."""
        return Octave(max(2, round(self.iters * factor)), self.step, self.tv_weight, self.window,
                      self.scale, self.margin, self.objective)


PAPER_MEAN = (
    Octave(190, (1, 2), (0.4, 0.4), 0.3),
    Octave(150, (1.0, 1.0), (0.01, 2.0), 0.3, scale=1.2),
    Octave(20, (2.0, 2.0), (0.1, 2.0), 0.2, scale=1.0, margin=50),
    Octave(10, (2.0, 2.0), (0.4, 2.0), 0.3),
)

PAPER_CENTER = (
    Octave(190, (11.0, 11.0), (0.001, 0.05), 0.3, objective="prob"),
    Octave(150, (6.0, 6.0), (0.01, 0.08), 0.3, scale=1.2, objective="prob"),
    Octave(150, (1.0, 1.0), (0.01, 2.0), 0.3, scale=1.2),
    Octave(30, (3.0, 3.0), (0.1, 2.0), 0.1, scale=1.0, margin=50),
    Octave(10, (6.0, 3.0), (0.01, 2.0), 0.3),
)

SCHEDULES = {"paper-mean": PAPER_MEAN, "paper-center": PAPER_CENTER}


@dataclass(frozen=True)
class FourierSettings:
    """Lucid's defaults: Adam 0.05, pad 12, jitter 8, scale ±5 %, rotate ±5°, jitter 4."""

    steps: int = 256
    lr: float = 0.05
    pad: int = 12
    jitter: int = 8
    scales: tuple[float, ...] = (1.0, 0.975, 1.025, 0.95, 1.05)
    degrees: float = 5.0
    decorrelate: bool = True

    def with_steps(self, steps: int | None) -> FourierSettings:
        return self if steps is None else replace(self, steps=steps)


@dataclass(frozen=True)
class AnchorSettings:
    """Weights of the anchored objective's terms (dimensionless, see `mfv.render.anchor`) and
    the layers whose activation distributions are matched (empty: chosen along the depth)."""

    code_weight: float = 1.0
    match_weight: float = 1.0
    match_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class MacoSettings:
    """MACO's optimization settings (the reference implementation's defaults, module doc)."""

    steps: int = 256
    lr: float = 1.0  # NAdam, on the (standardized) phase
    crops: int = 32  # random crops per step and sample
    box: tuple[float, float] = (0.5, 0.05)  # mean crop side / canvas side, first -> last step
    box_sd: float = 0.05  # sd of each crop's side around the mean
    box_min: float = 0.05  # crop sides are clipped to [box_min, 1]
    center_sd: float = 0.15  # sd of crop centres around the canvas centre (fraction of the side)
    noise: float = 10.2  # grey levels: N(0, noise^2) + U(-noise / 2, noise / 2) on every crop
    canvas: float = 512 / 224  # canvas side / model input side
    alpha_percentile: float = 80.0  # the transparency is clipped at this percentile

    def __post_init__(self) -> None:
        if self.steps < 0 or self.crops < 1 or self.lr <= 0 or self.canvas < 1:
            raise MfvError("MACO needs steps >= 0, crops >= 1, lr > 0 and canvas >= 1")
        spreads = (self.box_sd, self.center_sd, self.noise)
        if not 0 < self.box_min <= 1 or not all(0 < b <= 1 for b in self.box) or \
                min(spreads) < 0 or not 0 < self.alpha_percentile <= 100:
            raise MfvError("MACO box sizes must be in (0, 1], spreads and noise >= 0, and the "
                           "alpha percentile in (0, 100]")

    def with_steps(self, steps: int | None) -> MacoSettings:
        return self if steps is None else replace(self, steps=steps)

    def canvas_size(self, input_size: int) -> int:
        return max(input_size, round(self.canvas * input_size))


RECIPES = (*SCHEDULES, "fourier", "maco", "anchored")  # every recipe `--recipe` accepts
FACET_RECIPES = ("anchored",)  # recipes that need their facet (random starts run without)


def schedule(name: str, steps: int | None = None) -> tuple[Octave, ...]:
    """A named schedule, optionally with its iterations rescaled to about `steps` in total."""
    if name not in SCHEDULES:
        raise MfvError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    octaves = SCHEDULES[name]
    if steps is None:
        return octaves
    if steps < 2 * len(octaves):
        raise MfvError(f"{name} needs at least {2 * len(octaves)} steps (two per octave)")
    factor = steps / sum(o.iters for o in octaves)
    return tuple(o.scaled(factor) for o in octaves)


def canvas_sizes(octaves: tuple[Octave, ...], size: int) -> list[int]:
    """Canvas size during each octave: 227 → 272 → 326 for CaffeNet."""
    sizes = []
    for octave in octaves:
        if octave.scale is not None:
            size = round(size * octave.scale)
        sizes.append(size)
    return sizes

"""The authors' optimizer (paper-spec §2.3–2.5), batched, with their two octave schedules:
`paper-mean` (`act_max.tvd.mean.py`, mean-image start) and `paper-center`
(`act_max.tvd.center.py`, center-biased regularization).

Per step: a Gaussian-jittered crop of an upscaled canvas, the gradient of the target, an
optional margin mask, the normalized step `x += step / mean|g| · g`, clipping to 0..255,
TV-Bregman denoising of the crop, write-back. A sample's randomness comes only from its own seed,
so a batch gives the images each sample would get alone (up to float rounding).

Numbers are those of the authors' scripts, for CaffeNet at 227 px in the 0..255 domain. mfv keeps
the 0..255 domain, so step sizes and TV weights mean what they meant, and scales margins with the
model's input size (`margin` is given at 227 px). The scripts were Python 2, which changes two
things (reproduced unless `as_written=True`): an all-integer step ramp (mean octave 1: 1 → 2)
uses integer division, so the step stays 1; the TV weight is computed as
`start - (start - end*i) / n`, which ramps from ≈start to ≈start+end rather than from start to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mfv.core.errors import MfvError
from mfv.render.objective import Objective, Rendered
from mfv.render.recipes import register
from mfv.render.recipes.base import Batch, Recipe, optimize
from mfv.render.tv import tv_bregman

if TYPE_CHECKING:
    from mfv.render.options import RenderOptions

NAMES = ("paper-mean", "paper-center")
PAPER_NOISE = (175.0, 8.0)  # the authors' random start: grey 175 + N(0, 8²) per pixel
PAPER_REFERENCE_SIZE = 227  # margins in the schedules are given at CaffeNet's input size


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
        return replace(self, iters=max(2, round(self.iters * factor)))


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

SCHEDULES = dict(zip(NAMES, (PAPER_MEAN, PAPER_CENTER), strict=True))


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


def paper_noise(seed: int, size: int) -> np.ndarray:
    """The authors' start image, (3, S, S) RGB, drawn from the seed's stream."""
    return _noise(np.random.RandomState(seed), size)


def _noise(rng: np.random.RandomState, size: int) -> np.ndarray:
    mean, sd = PAPER_NOISE
    return rng.normal([mean] * 3, sd, (size, size, 3)).transpose(2, 0, 1)


def _margin_mask(size: int, margin: int, like: torch.Tensor) -> torch.Tensor | None:
    margin = round(margin * size / PAPER_REFERENCE_SIZE)
    if margin <= 0:
        return None
    mask = torch.zeros(size, size, dtype=like.dtype, device=like.device)
    mask[margin:size - margin, margin:size - margin] = 1
    return mask


def _normalized_step(crops: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
    """x + step / mean|g| · g per sample; a zero gradient leaves the sample unchanged."""
    scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True)
    factor = torch.where(scale > 0, step / scale.clamp(min=1e-30), torch.zeros_like(scale))
    return crops + factor * grad


def paper_loop(objective: Objective, starts: Sequence[torch.Tensor | None], seeds: Sequence[int],
               octaves: Sequence[Octave], as_written: bool = False, progress: bool = False,
               desc: str = "render") -> Rendered:
    """The authors' engine on a batch. `starts[b]` is a (3, S, S) 0..255 image or None (noise)."""
    return _paper(Batch(objective, starts, seeds, progress=progress, desc=desc), octaves,
                  as_written)


def _paper(batch: Batch, octaves: Sequence[Octave], as_written: bool) -> Rendered:
    size, device, objective = batch.size, batch.device, batch.objective
    rngs = [np.random.RandomState(seed) for seed in batch.seeds]
    # The authors' script draws the noise image first, even when a start image replaces it.
    noise = [_noise(rng, size) for rng in rngs]
    state: dict[str, Any] = {"canvas": torch.stack([
        (s.to(device, torch.float32) if s is not None else
         torch.from_numpy(n).to(device, torch.float32))
        for s, n in zip(batch.starts, noise, strict=True)])}
    plan = [(octave, i) for octave in octaves for i in range(octave.iters)]

    def step(n: int) -> torch.Tensor:
        octave, i = plan[n]
        if i == 0:
            _begin_octave(state, octave, rngs, size)
        canvas = state["canvas"]
        window = _CropWindow(state["corners"][i], size)
        crops = window.read(canvas).requires_grad_(True)
        value = objective(crops, octave.objective)
        (grad,) = torch.autograd.grad(value.sum(), crops)
        if state["mask"] is not None:
            grad = grad * state["mask"]
        with torch.no_grad():
            crops = _normalized_step(crops.detach(), grad, octave.step_size(i, as_written))
            window.write(canvas, tv_bregman(crops.clamp_(0, 255), octave.tv(i, as_written)))
        return value

    trace = optimize(batch, len(plan), step)
    return Rendered(state["canvas"].clamp(0, 255), trace)


def _begin_octave(state: dict[str, Any], octave: Octave, rngs: Sequence[np.random.RandomState],
                  size: int) -> None:
    """Upscale the canvas, make the octave's margin mask, and draw its crop corners up front
    (the same draws in the same order as step by step), moved to the device at once: no
    host-to-device copy, so no wait, per step."""
    canvas = state["canvas"]
    if octave.scale is not None and octave.scale != 1.0:
        side = round(canvas.shape[-1] * octave.scale)
        canvas = F.interpolate(canvas, size=(side, side), mode="bicubic", align_corners=False)
    slack = canvas.shape[-1] - size
    state["canvas"], state["mask"] = canvas, _margin_mask(size, octave.margin, canvas)
    state["corners"] = torch.tensor([[_offsets(rng, slack, octave.window) for rng in rngs]
                                     for _ in range(octave.iters)], dtype=torch.long
                                    ).view(octave.iters, len(rngs), 2).to(canvas.device)


class _CropWindow:
    """One size×size window per sample at its own offset, read and written with one indexing
    kernel each (not two per sample)."""

    def __init__(self, corner: torch.Tensor, size: int):
        """`corner`: (B, 2) long offsets (row, column) on the canvas's device."""
        device = corner.device
        span = torch.arange(size, device=device)
        self.index = (torch.arange(len(corner), device=device).view(-1, 1, 1), slice(None),
                      (corner[:, 0, None] + span).unsqueeze(2),
                      (corner[:, 1, None] + span).unsqueeze(1))

    def read(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas[self.index].permute(0, 3, 1, 2).contiguous()  # indexing puts C last

    def write(self, canvas: torch.Tensor, crops: torch.Tensor) -> None:
        canvas[self.index] = crops.permute(0, 2, 3, 1)


def _offsets(rng: np.random.RandomState, slack: int, window: float) -> tuple[int, int]:
    """Gaussian crop offsets around the centre, clipped and truncated as in the original."""
    if slack <= 0:
        return 0, 0
    mid, sd = slack / 2, slack * window
    ox = int(np.clip(rng.normal(mid, sd), 0, slack))
    oy = int(np.clip(rng.normal(mid, sd), 0, slack))
    return ox, oy


class Paper(Recipe):
    """One of the paper's schedules (`as_written`: as the paper writes it, not as the authors'
    code ran it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def probe_options(self, options: RenderOptions, batch: int) -> RenderOptions:
        return replace(options, steps=2 * len(SCHEDULES[self.name]))  # every octave's canvas

    def render(self, batch: Batch, options: RenderOptions) -> Rendered:
        return _paper(batch, schedule(self.name, options.steps), options.as_written)


for _name in NAMES:
    register(Paper(_name))

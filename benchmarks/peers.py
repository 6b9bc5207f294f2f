"""mfv beside its peers (issue 24, item 5): Horama's `maco`, `fourier` and `accentuation` and
Lucent's `render_vis` against mfv's `maco`, `fourier` and `anchored` recipes on the same
EfficientNet-Lite0 weights, input size, batch and steps — seconds per step side by side, and the
quality of what each makes from random starts and from facet means, judged by mfv's evaluation.

Set-up (its own virtual environment outside the repository, never CI: the peers need
torchvision, which here comes only with a CUDA build of torch; it runs on the CPU):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/peers-venv/bin/pip install horama==0.3.0 torch-lucent==0.1.8 einops
    /work/peers-venv/bin/pip install -e /work/main      # mfv, without constraints-cpu.txt

(horama 0.3.0 imports einops without declaring it; torch-lucent pins kornia 0.4.1, which
installs and runs with torch 2.14.)

Run (from the repository root), the two sections as separate invocations (each rewrites
results/peers.md from the sections found in --out):

    PY=/work/peers-venv/bin/python
    nohup $PY benchmarks/peers.py --only timing > .tmp/peers-timing.log 2>&1 &
    nohup $PY benchmarks/peers.py --only quality > .tmp/peers-quality.log 2>&1 &

On 2026-12-02, with the shared 2-core machine at load 20-33, the timing took 51 min and the
quality section's mfv run alone 41 min (Horama's 6 crops per step dominate the rest); a quiet
machine needs a fraction of that. A rerun reuses the mfv run directory and the peers' pictures
(cached as .npz in --out), so only what is missing is made again.

Options: --steps (all methods, default 16), --per-class (photos per Imagenette class, 30),
--k (facets per target, 2), --targets, --timing-steps / --rounds, --only timing|quality,
--no-write. Writes benchmarks/results/peers.md and the contact sheet docs/peers.jpg.

What each method is given (the peers' own defaults but steps, canvas and device):

- mfv `fourier` / `anchored`: the recipes as shipped (Adam 0.05, Lucid's transforms; anchored
  adds the facet pull and the activation matching), canvas = the input, 224 px, batch 10.
- mfv `maco`: as shipped (NAdam 1.0, the scanned photos' amplitude spectrum, canvas 512 px)
  but 6 crops per step — Horama's default, so both MACOs do the same work per step.
- Horama `maco` / `fourier` (one image per call: Horama has no batch): NAdam 1.0, 6 crops of
  25-30 % of the side per step, noise 0.05; canvas 512 px (Horama's default 1280, mfv maco's
  canvas 512); `values_range=(-1, 1)`, Lite0's normalized input range, so the crops go straight
  to the network. Horama downloads ImageNet's decorrelated spectrum at run time, which this
  machine cannot: it gets the same photos' spectrum in its own format (`horama_spectrum`),
  as mfv's maco does. Horama's maco / fourier take no start image: from facet means Horama
  runs its own seeded method, `accentuation` (Hamblin et al. 2024; penalty 1.0).
- Lucent `render_vis`: `param.image(224, batch=B)` (FFT, decorrelated, sd 0.01), Adam 0.05,
  `transform.standard_transforms`, then Lite0's normalization ((x - 0.5) / 0.5) in place of
  Lucent's ImageNet one (`preprocess=False`). From facet means: a `param_f` whose spectrum is
  set so that its image is the mean image (Lucent's own constants inverted; Lucent has no
  image start). Objectives: `channel` for logits, `neuron` (the centre, as mfv's `center`)
  for hidden units, one per batch element (`batch=i`), summed.

Every peer gets its own copy of the module (Lucent's hooks are never removed, so a fresh copy
per call); mfv folds batch norms into convolutions inside its render calls, the peers run the
module as it is.

Quality: one mfv run (`mfv.run`: scan, facets with k = `--k` over whole photos, the three mfv
recipes from facet means and random starts), then every method's pictures, mfv's read back from
the run, are judged together by `mfv.evaluate.evaluation.evaluate_target` (as seen: each
picture treated like a photo). Columns: coverage (class targets: share with a picture
classified as its class — for a pair, the pair rule of `mfv.evaluate.metrics.coverage` — by
Lite0, and by the independent judges Lite1 / Lite2), plausibility (Lite2 codes vs the facet's
photos), path similarity (Lite0's channel means along its depth vs the facet's photos),
activation over the best photo of the target, pictures above their facet's best photo, facet
fidelity, diversity. Plausibility, path similarity and fidelity are defined for facet starts.

Timing: each method's loop timed from inside (the median interval between its steps, after a
warm-up), `--rounds` rounds with the methods interleaved, load average recorded before and
after; ratios mfv / peer are the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import mfv
import mfv.render.recipes.base as loop_module
from mfv.core.io import atomic_write_bytes, atomic_write_text, read_json
from mfv.evaluate.evaluation import Case, Picture, evaluate_target, networks
from mfv.models import LoadedModel
from mfv.models.base import to_tensor
from mfv.models.targets import Target, parse_targets, resolve_layer
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.runtime.rundir import TargetDir
from recovery import RESULTS, ROOT, cell, finite_mean, link_classes, machine, markdown, plain

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-train"
# tench, church + golf ball (a constructed two-faceted neuron); hidden units (e.g.
# "_blocks.10:37", the centre position) take --targets and a class-free photo pool
TARGETS = ("_fc:0", "_fc:497 + _fc:574")
WNIDS = ("n01440764", "n03028079", "n03445777")
MFV_RECIPES = ("fourier", "anchored", "maco")
CROPS = 6  # Horama's crops per step, given to mfv's maco too
CANVAS = 512  # MACO-family canvas (mfv maco's; Horama's default is 1280)
METHODS = ("mfv fourier", "mfv anchored", "mfv maco", "lucent render_vis", "horama fourier",
           "horama maco", "horama accentuation")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------ the peers
@dataclass
class Peers:
    """What the peers run: Lite0's module as loaded (copied per use), the targets, and the
    spectrum Horama reads from its working directory."""

    model: LoadedModel
    pristine: torch.nn.Module  # copied before mfv ever ran the model
    workdir: Path  # holds Horama's spectrum file

    @classmethod
    def make(cls, model: LoadedModel, photos: torch.Tensor, workdir: Path) -> Peers:
        import horama.maco_fv as maco_fv

        np.save(workdir / maco_fv.MACO_SPECTRUM_FILENAME, horama_spectrum(photos))
        return cls(model, copy.deepcopy(model.module).eval(), workdir)

    def module(self) -> torch.nn.Module:
        return copy.deepcopy(self.pristine).eval()


def horama_spectrum(photos: torch.Tensor) -> np.ndarray:
    """Horama's magnitude template from photos (n, 3, S, S) in [0, 1]: the mean |rfft2| of the
    photos in Lite0's input range with Horama's colour correlation undone (Horama standardizes
    the phase's image, so only the shape of the spectrum matters)."""
    from horama.common import get_color_correlation_svd_sqrt

    x = (photos.float() - 0.5) / 0.5
    inverse = torch.linalg.pinv(get_color_correlation_svd_sqrt(torch.device("cpu")))
    flat = x.permute(0, 2, 3, 1) @ inverse
    return torch.fft.rfft2(flat.permute(0, 3, 1, 2)).abs().mean(0).numpy().astype(np.float32)


def _value(net: torch.nn.Module, target: Target, images: torch.Tensor) -> torch.Tensor:
    """The target per image for a normalized batch: mfv's definition (each term's layer read by
    a forward hook, spatial maps at their centre), summed over terms."""
    store: dict[str, torch.Tensor] = {}
    handles = [net.get_submodule(t.layer.path).register_forward_hook(
        lambda _m, _i, out, key=t.layer.path: store.__setitem__(key, out)) for t in target.terms]
    try:
        net(images)
    finally:
        for h in handles:
            h.remove()
    total = 0
    for t in target.terms:
        a = store[t.layer.path]
        a = a[:, t.unit] if a.dim() == 2 else a[:, t.unit, a.shape[2] // 2, a.shape[3] // 2]
        total = total + t.weight * a
    return total


def horama_run(peers: Peers, method: str, target: Target, steps: int, seed: int,
               start: np.ndarray | None = None) -> np.ndarray:
    """One Horama picture (H, W, 3) uint8: `maco` / `fourier` from its random start, or
    `accentuation` seeded with `start` (S, S, 3) uint8."""
    import horama

    net = peers.module()

    def objective(crops: torch.Tensor) -> torch.Tensor:
        return _value(net, target, crops).mean()

    torch.manual_seed(seed)
    kwargs = {"total_steps": steps, "image_size": CANVAS, "values_range": (-1.0, 1.0),
              "device": "cpu"}
    with contextlib.chdir(peers.workdir):
        if method == "accentuation":
            seed_image = torch.from_numpy(start).permute(2, 0, 1).float() / 127.5 - 1.0
            image, _ = horama.accentuation(objective, seed_image, **kwargs)
        else:
            image, _ = getattr(horama, method)(objective, **kwargs)
    return _uint8((image.detach() + 1.0) / 2.0)


def _uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def _lucent_objective(targets: Sequence[Target]):
    """Lucent's objectives for one picture per target: `channel` for a logit, `neuron` (the
    centre) for a spatial unit, weighted per term, batch element i for target i."""
    from lucent.optvis import objectives

    parts = []
    for i, target in enumerate(targets):
        for t in target.terms:
            name = t.layer.path.replace(".", "_")
            make = objectives.channel if t.layer.path == "_fc" else objectives.neuron
            parts.append(t.weight * make(name, t.unit, batch=i))
    return objectives.Objective.sum(parts)


def _lucent_param(size: int, starts: Sequence[np.ndarray] | None, batch: int):
    """`param.image(size, batch)`; with starts, its spectrum set so the image is the start
    (Lucent's sigmoid, colour decorrelation, 1/4 scale and FFT scaling inverted)."""
    from lucent.optvis import param
    from lucent.optvis.param.color import color_correlation_normalized
    from lucent.optvis.param.spatial import rfft2d_freqs

    params, image_f = param.image(size, batch=batch)
    if starts is not None:
        x = torch.from_numpy(np.stack(starts)).float().div(255).clamp(1e-3, 1 - 1e-3)
        logits = torch.log(x / (1 - x))  # (B, S, S, 3)
        colour = torch.linalg.inv(torch.from_numpy(color_correlation_normalized.T))
        spatial = (logits @ colour).permute(0, 3, 1, 2) * 4.0
        scale = 1.0 / np.maximum(rfft2d_freqs(size, size), 1.0 / size)
        spectrum = torch.fft.rfftn(spatial, s=(size, size), norm="ortho")
        spectrum = spectrum / torch.from_numpy(scale).float()
        with torch.no_grad():
            params[0].copy_(torch.view_as_real(spectrum))
    return lambda: (params, image_f)


def lucent_run(peers: Peers, targets: Sequence[Target], steps: int, seed: int,
               starts: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Lucent's `render_vis` for a batch (one picture per target); (S, S, 3) uint8 each."""
    from lucent.optvis import render, transform

    torch.manual_seed(seed)
    np.random.seed(seed)  # Lucent's transforms draw from numpy
    size = peers.model.preprocess.input_size
    images = render.render_vis(
        peers.module(), _lucent_objective(targets),
        param_f=_lucent_param(size, starts, len(targets)),
        transforms=[*transform.standard_transforms, lambda x: (x - 0.5) / 0.5],
        thresholds=(steps,), preprocess=False, show_image=False, progress=False)
    return [(np.clip(im, 0, 1) * 255 + 0.5).astype(np.uint8) for im in images[-1]]


# ------------------------------------------------------------------------------- timing
class Stamps:
    """Stands in for a loop's tqdm: the time at every iteration boundary."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, iterable=None, *args, **kwargs):
        def stamped() -> Iterator:
            for item in iterable:
                self.times.append(time.perf_counter())
                yield item
            self.times.append(time.perf_counter())

        return stamped()

    # mfv's loop: tqdm(**kw) -> bar; bar.update() after every step
    def update(self, n: int = 1) -> None:
        self.times.append(time.perf_counter())

    def close(self) -> None:
        pass

    def step(self) -> float:
        gaps = np.diff(self.times)
        return float(np.median(gaps)) if len(gaps) else float("nan")


class _MfvBar(Stamps):
    def __call__(self, *args, **kwargs):
        return self


@contextlib.contextmanager
def stamped(module, name: str = "tqdm", bar: Stamps | None = None) -> Iterator[Stamps]:
    """`module.<name>` replaced by a `Stamps` inside the block."""
    clock = bar or Stamps()
    saved = getattr(module, name)
    setattr(module, name, clock)
    try:
        yield clock
    finally:
        setattr(module, name, saved)


@dataclass(frozen=True)
class Timed:
    label: str
    pictures: int  # per step
    passes: int  # images through the network per picture and step
    run: Callable[[int], float]  # steps -> median seconds per step


def timing_cases(peers: Peers, photos: torch.Tensor, codes: np.ndarray,
                 amplitude: np.ndarray) -> list[Timed]:
    """Every timed loop: mfv's and Lucent's at batch 10 and 1, Horama's (one image: Horama has
    no batch); the MACOs at batch 1 only (Horama's; mfv's batch gain is benchmarks/steps.py's)."""
    import horama.fourier_fv
    import horama.maco_fv
    from lucent.optvis import render as lucent_render

    from mfv.render.anchor import Anchor

    model = peers.model
    logits = [f"_fc:{c}" for c in range(0, 1000, 100)]

    def mfv_case(recipe: str, batch: int) -> Callable[[int], float]:
        targets = parse_targets(logits[:batch], model)
        anchors = [Anchor(codes[[(b + j) % len(codes) for j in range(10)]].mean(0), 1.0, 10.0,
                          photos[[(b + j) % len(photos) for j in range(10)]].numpy() * 255)
                   if recipe == "anchored" else None for b in range(batch)]
        jobs = [Job(b, photos[b % len(photos)] * 255, b, anchors[b]) for b in range(batch)]

        def run(steps: int) -> float:
            options = RenderOptions(steps=steps, maco_crops=CROPS, amplitude=amplitude)
            with stamped(loop_module, bar=_MfvBar()) as clock:
                render_batches(model, targets, jobs, recipe, options, batch_size=batch,
                               progress=False)
            return clock.step()
        return run

    def lucent_case(batch: int) -> Callable[[int], float]:
        targets = parse_targets(logits[:batch], model)

        def run(steps: int) -> float:
            with stamped(lucent_render) as clock:
                lucent_run(peers, targets, steps, 0)
            return clock.step()
        return run

    def horama_case(method: str) -> Callable[[int], float]:
        target = parse_targets(logits[:1], model)[0]
        where = horama.maco_fv if method == "maco" else horama.fourier_fv

        def run(steps: int) -> float:
            with stamped(where) as clock:
                horama_run(peers, method, target, steps, 0)
            return clock.step()
        return run

    return [Timed("mfv fourier", 10, 1, mfv_case("fourier", 10)),
            Timed("mfv anchored", 10, 1, mfv_case("anchored", 10)),
            Timed("lucent render_vis", 10, 1, lucent_case(10)),
            Timed("mfv fourier", 1, 1, mfv_case("fourier", 1)),
            Timed("lucent render_vis", 1, 1, lucent_case(1)),
            Timed("horama fourier", 1, CROPS, horama_case("fourier")),
            Timed("mfv maco", 1, CROPS, mfv_case("maco", 1)),
            Timed("horama maco", 1, CROPS, horama_case("maco"))]


# (mfv label, batch, peer label, batch, what is compared)
RATIOS = (("mfv fourier", 10, "lucent render_vis", 10, "step, same batch"),
          ("mfv fourier", 1, "lucent render_vis", 1, "step, same batch"),
          ("mfv anchored", 10, "lucent render_vis", 10, "step, same batch"),
          ("mfv fourier", 10, "horama fourier", 1, "per picture and step"),
          ("mfv fourier", 1, "horama fourier", 1, "step, same batch"),
          ("mfv maco", 1, "horama maco", 1, "step, same batch and crops"))


def section_timing(cases: Sequence[Timed], steps: int, rounds: int) -> tuple[str, str]:
    """Warm-up, then `rounds` interleaved rounds; a table of steps and one of ratios."""
    before = _load()
    for case in cases:  # warm-up: kernels, first-call costs
        case.run(2)
    times: dict[tuple[str, int], list[float]] = {(c.label, c.pictures): [] for c in cases}
    for r in range(rounds):
        for case in cases:
            times[(case.label, case.pictures)].append(case.run(steps))
        print(f"timing round {r + 1}/{rounds} done (load {_load()})", flush=True)
    after = _load()
    header = ("method", "batch", "net images / picture / step", "s / step", "s / picture-step",
              "s / net image")
    rows = []
    for c in cases:
        t = statistics.median(times[(c.label, c.pictures)])
        rows.append([c.label, str(c.pictures), str(c.passes), f"{t:.3f}", f"{t / c.pictures:.3f}",
                     f"{t / (c.pictures * c.passes):.4f}"])
    rheader = ("mfv", "peer", "compared", "ratio mfv / peer", "per net image")
    passes = {(c.label, c.pictures): c.passes for c in cases}
    rrows = []
    for a, ab, b, bb, what in RATIOS:
        per = [(x / ab) / (y / bb) for x, y in zip(times[(a, ab)], times[(b, bb)], strict=True)]
        ratio = statistics.median(per)
        net = ratio * passes[(b, bb)] / passes[(a, ab)]
        rrows.append([f"{a} (batch {ab})", f"{b} (batch {bb})", what, f"{ratio:.2f}",
                      f"{net:.2f}"])
    note = (f"{rounds} rounds of {steps} steps after a 2-step warm-up, methods interleaved; "
            f"load average before {before}, after {after}")
    print(f"\n## Seconds per step ({note})\n{plain(header, rows)}\n\n{plain(rheader, rrows)}",
          flush=True)
    return (f"{note}.\n\n{markdown(header, rows)}\n\n{markdown(rheader, rrows)}",
            plain(rheader, rrows))


# ------------------------------------------------------------------------------ quality
@dataclass
class Made:
    """The pictures of one method and start, in target order: (target index, rank, image)."""

    method: str
    start: str  # "facet" or "random"
    pictures: list[tuple[int, int, np.ndarray]]
    seconds: float


def mfv_pictures(run_dir: Path, results: dict) -> list[Made]:
    """mfv's pictures as the run stored them."""
    made = []
    seconds = float("nan")  # the run times its render stage as a whole, not per recipe
    for recipe in MFV_RECIPES:
        for start in ("facet", "random"):
            pics = []
            for t, target in enumerate(results["targets"]):
                entries = ([(f["rank"], f["visualizations"].get(recipe)) for f in target["facets"]]
                           if start == "facet" else
                           list(enumerate(target["baselines"].get(recipe, []))))
                for rank, v in entries:
                    if v and v.get("path"):
                        with Image.open(run_dir / v["path"]) as im:
                            pics.append((t, rank, np.asarray(im.convert("RGB"))))
            made.append(Made(f"mfv {recipe}", start, pics, seconds))
    return made


def cached(path: Path, jobs: Sequence[tuple[int, int]], method: str, start: str,
           make: Callable[[], list[np.ndarray]]) -> Made:
    """A peer's pictures, made once: kept in `path` (.npz) so that a rerun with the same
    settings (e.g. after a failed evaluation) reuses them."""
    if path.exists():
        with np.load(path) as f:
            images, seconds = list(f["images"]), float(f["seconds"])
    else:
        begin = time.perf_counter()
        images = make()
        seconds = time.perf_counter() - begin
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, images=np.stack(images), seconds=seconds)
        os.replace(tmp.name, path)
    print(f"{method} {start}: {seconds:.0f} s (load {_load()})", flush=True)
    return Made(method, start, [(t, r, im) for (t, r), im in zip(jobs, images, strict=True)],
                seconds)


def peer_pictures(peers: Peers, targets: Sequence[Target], means: Sequence[Sequence[np.ndarray]],
                  k: int, steps: int, seed: int, out: Path) -> list[Made]:
    """Lucent (one batch per start) and Horama (one call per picture), from random starts and
    from the facet means."""
    jobs = [(t, r) for t in range(len(targets)) for r in range(k)]
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for start in ("random", "facet"):
        starts = [means[t][r] for t, r in jobs] if start == "facet" else None
        made.append(cached(out / f"lucent-{start}.npz", jobs, "lucent render_vis", start,
                           lambda starts=starts: lucent_run(
                               peers, [targets[t] for t, _ in jobs], steps, seed, starts)))
        for method in (("fourier", "maco") if start == "random" else ("accentuation",)):
            made.append(cached(
                out / f"horama-{method}-{start}.npz", jobs, f"horama {method}", start,
                lambda method=method, start=start: [
                    horama_run(peers, method, targets[t], steps, seed + i,
                               means[t][r] if start == "facet" else None)
                    for i, (t, r) in enumerate(jobs)]))
    return made


def load_run_facets(run_dir: Path, results: dict):
    """Each target's stored clustering (`FacetResult`) and mean images: the clustering folder
    is the one its mean images are in (a run directory may hold older clusterings)."""
    out = []
    for target in results["targets"]:
        doc_path = (run_dir / target["facets"][0]["mean_image"]).parent / "facets.json"
        store = TargetDir(doc_path.parents[2])
        out.append(store.load_facets(read_json(doc_path)["key"]))
    return out


def digest_of(targets: Sequence[Target], k: int) -> str:
    """A short name for the targets and k (peer pictures are cached per setting)."""
    import hashlib

    return hashlib.sha256(repr(([t.spec for t in targets], k)).encode()).hexdigest()[:8]


QUALITY_HEADER = ("method", "start", "n", "cov. Lite0", "cov. Lite1", "cov. Lite2",
                  "plausibility", "path sim.", "act. ratio", "> facet max", "fidelity",
                  "diversity", "s / picture")


def section_quality(model: LoadedModel, peers: Peers, run_dir: Path, results: dict,
                    targets: Sequence[Target], k: int, steps: int, seed: int,
                    judges: Sequence[str], sheet: Path | None) -> str:
    stored = load_run_facets(run_dir, results)
    means = [[np.asarray(m) for m in s[1]] for s in stored]
    peers_dir = run_dir.parent / f"peers-s{steps}-seed{seed}-{digest_of(targets, k)}"
    made = mfv_pictures(run_dir, results) + peer_pictures(peers, targets, means, k, steps, seed,
                                                          peers_dir)
    own, judge_nets = networks(model, resolve_layer(model, "penultimate"), judges)
    base = Path(results["data"].get("base") or "")
    entries = []
    for t, (target, (facets, _)) in enumerate(zip(targets, stored, strict=True)):
        pictures = [Picture(m.start, rank, m.method, float("nan"), image)
                    for m in made for (ti, rank, image) in m.pictures if ti == t]
        info = results["targets"][t]
        members = [[str(base / p) for p in f["members"]] for f in info["facets"]]
        entries.append(evaluate_target(own, judge_nets, Case(
            target, facets, pictures, members, float(info["activation_max_real"])), seed))
        print(f"evaluated {target.spec} (load {_load()})", flush=True)
    nets = [model.name, *judges]
    rows = []
    for m in made:
        per = [e["facets"].get(f"facet{r:02d}", {}).get(m.method, {}) if m.start == "facet"
               else {} for e in entries for r in range(k)]
        stats = [e["target"].get(m.start, {}).get(m.method, {}) for e in entries]
        if m.start == "random":
            per = stats  # random starts: their metrics averaged per target
        cover = [[s.get("coverage", {}).get(n) for s, tg in zip(stats, targets, strict=True)
                  if tg.classes] for n in nets]
        above = [x["activation_ratio_facet"] > 1 for x in per
                 if m.start == "facet" and x.get("activation_ratio_facet") is not None]
        rows.append([m.method, "facet mean" if m.start == "facet" else "random",
                     str(len(m.pictures)), *(cell(finite_mean(c), percent=True) for c in cover),
                     cell(finite_mean([x.get("plausibility") for x in per]), 3),
                     cell(finite_mean([x.get("path_similarity") for x in per]), 3),
                     cell(finite_mean([x.get("activation_ratio") for x in per])),
                     f"{sum(above)}/{len(above)}" if above else "–",
                     cell(finite_mean([x.get("fidelity") for x in per]), percent=True),
                     cell(finite_mean([s.get("diversity") for s in stats]), 3),
                     cell(m.seconds / max(1, len(m.pictures)), 1)])
    order = {name: i for i, name in enumerate(METHODS)}
    rows.sort(key=lambda r: (r[1] != "facet mean", order.get(r[0], 99)))
    print(f"\n## Quality\n{plain(QUALITY_HEADER, rows)}", flush=True)
    if sheet is not None:
        contact_sheet(sheet, made, means, targets, k)
    return markdown(QUALITY_HEADER, rows)


def contact_sheet(path: Path, made: Sequence[Made], means, targets: Sequence[Target], k: int,
                  thumb: int = 72) -> None:
    """One row per method and start, one column per (target, facet): the facet means first."""
    label_w = 150
    rows = [("facet means", [(t, r, means[t][r]) for t in range(len(targets))
                             for r in range(k)])]
    for start in ("facet", "random"):
        for method in METHODS:
            for m in made:
                if m.method == method and m.start == start:
                    rows.append((f"{method} ({'mean' if start == 'facet' else 'random'})",
                                 m.pictures))
    cols = len(targets) * k
    sheet = Image.new("RGB", (label_w + cols * thumb, len(rows) * thumb), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (label, pics) in enumerate(rows):
        draw.text((4, y * thumb + thumb // 2 - 6), label, fill="black")
        for t, r, image in pics:
            im = Image.fromarray(np.asarray(image, np.uint8)).resize((thumb, thumb),
                                                                     Image.Resampling.LANCZOS)
            sheet.paste(im, (label_w + (t * k + r) * thumb, y * thumb))
    with tempfile.NamedTemporaryFile(suffix=".jpg") as tmp:
        sheet.save(tmp.name, quality=80)
        atomic_write_bytes(path, Path(tmp.name).read_bytes())


# --------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="steps of every method")
    ap.add_argument("--timing-steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judges", default="efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--only", choices=("timing", "quality"), default=None)
    ap.add_argument("--out", type=Path, default=ROOT / ".tmp" / "bench-peers")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    judges = args.judges.split(",")
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "horama",
                                                       "torch-lucent", "kornia", "mfv"))
    head = f"{machine()}; {versions}; load {_load()} at the start"
    print(f"# {head}", flush=True)
    images = link_classes(args.data, WNIDS, args.out / "images", args.per_class or None)
    base = {"images": str(images), "targets": args.targets, "out": str(args.out / "run"),
            "selection": "auto", "region": "image", "facets": args.k, "mean_of": 10,
            "steps": args.steps, "device": "cpu", "seed": args.seed, "batch_size": 10,
            "judges": judges, "maco_crops": CROPS, "recipes": list(MFV_RECIPES),
            "progress": False}
    model = mfv.load_model("efficientnet_lite0", device="cpu")
    sample = sorted(images.rglob("*.JPEG"))[::4]
    photos = torch.stack([to_tensor(model.preprocess, Image.open(p).convert("RGB"))
                          for p in sample])
    command = f"`/work/peers-venv/bin/python benchmarks/peers.py {' '.join(argv)}`"
    with tempfile.TemporaryDirectory() as work:
        peers = Peers.make(model, photos, Path(work))
        if args.only in (None, "timing"):
            from mfv.data.spectrum import AmplitudeSpectrum
            from mfv.models.activations import capture

            spectrum = AmplitudeSpectrum()
            spectrum.update(photos * 255)
            code = resolve_layer(model, "penultimate")
            with capture(model, [code]) as store, torch.no_grad():
                model(photos)
                codes = store[code.key].flatten(1).float().numpy()
            table, _ = section_timing(timing_cases(peers, photos, codes,
                                                   spectrum.result().numpy()),
                                      args.timing_steps, args.rounds)
            publish(args, "timing", [
                "## Seconds per step, side by side", "", command, "", f"Start: {head}.", "",
                table, "", f"{(time.perf_counter() - started) / 60:.1f} min; load at the end "
                f"{_load()}.", ""])
        if args.only in (None, "quality"):
            begin = time.perf_counter()
            results = mfv.run(**base, until="render").to_dict()
            print(f"mfv run (scan, facets, render) {time.perf_counter() - begin:.0f} s "
                  f"(load {_load()})", flush=True)
            targets = parse_targets(args.targets, model)
            sheet = None if args.no_write else ROOT / "docs" / "peers.jpg"
            table = section_quality(model, peers, Path(base["out"]), results, targets, args.k,
                                    args.steps, args.seed, judges, sheet)
            setting = (f"targets {', '.join(args.targets)}; {results['data']['n_images']} "
                       f"photos ({args.per_class} per class of {', '.join(WNIDS)}); k = "
                       f"{args.k} facets over whole photos, mean of 10; {args.steps} steps for "
                       f"every method; judges {', '.join(judges)}")
            publish(args, "quality", [
                "## Quality from random starts and from facet means", "", command, "",
                f"Start: {head}.", "", f"Settings: {setting}.", "", table, "",
                f"{(time.perf_counter() - started) / 60:.1f} min; load at the end {_load()}.",
                ""])
    print(f"# {(time.perf_counter() - started) / 60:.1f} min; load {_load()}", flush=True)


def publish(args: argparse.Namespace, section: str, lines: Sequence[str]) -> None:
    """Keep a section's text in the work folder and (unless --no-write) write
    results/peers.md from every section found there, so the timing and the quality may run
    as separate invocations."""
    atomic_write_text(args.out / f"{section}.md", "\n".join(lines))
    if args.no_write:
        return
    parts = ["# mfv beside Horama and Lucent (benchmarks/peers.py)", "",
             "Settings, set-up and columns: the docstring of benchmarks/peers.py.", ""]
    parts += [(args.out / f"{name}.md").read_text() for name in ("timing", "quality")
              if (args.out / f"{name}.md").exists()]
    atomic_write_text(RESULTS / "peers.md", "\n".join(parts))

if __name__ == "__main__":
    main()

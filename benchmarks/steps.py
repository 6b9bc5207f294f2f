"""Step costs (issue 16): every recipe's cost per visualization at batch 1, 2, 4, ... as fits, its
step over the model's own forward+backward, the scan's throughput with several decoding workers,
and a projection to ImageNet-1k x 10 facets on one device.

Usage: python benchmarks/steps.py [--device cpu|cuda] [--quick] [--model efficientnet_lite0]
           [--recipes fourier anchored ...] [--batches 1 2 4 ...] [--max-batch N] [--max-step 10]
           [--steps 6] [--workers 0 1 2] [--scan-images 320] [--precision float32|bfloat16]
           [--layout auto|standard|channels_last] [--only SECTION ...] [--data DIR]
           [--spread WORKERS] [--spread-targets N]

Sections (`--only`, repeatable; default: pass, recipes, scan, units, project):

- pass: the model's own forward+backward (w.r.t. the input, one logit per sample) per image in
  each memory layout and precision, at one batch (8 on the CPU, 64 on CUDA): what
  `RenderOptions.channels_last` / `.precision` choose between.
- recipes: paper-mean, paper-center, fourier, maco with 32 and 4 crops, anchored (its default
  grid, 1024 positions, every position; matching on every 2nd, 3rd, 4th step or never only when
  named: anchored-m2, -m3, -m4, -nomatch), and paper-mean with TV-Bregman's iterations launched
  one by one instead of as CUDA graphs (`paper-mean-plain-tv`; the same on the CPU), each at batch
  1, 2, 4, ... up to `--max-batch` (CPU 16, CUDA 256) or until a step takes more than
  `--max-step` seconds or the device runs out of memory. A recipe's step is timed inside the
  loop (the median interval between steps; on CUDA every interval waits for the device) and
  compared with the bare forward+backward at the same batch and pass settings, timed the same way
  right before (for MACO: the same images per step, in its passes), in `--rounds` such pairs:
  the ratio is the median of the rounds' ratios, the other columns medians over rounds. `fixed`
  is the rest of a `render_batches` call (start images, anchors' reference quantiles, the final
  measure); the cost per picture is (fixed + the recipe's full steps x the step) / batch.
- scan: `mfv.scan.scanner.scan` of `--scan-images` Imagenette photos for all 1000 logits, with each
  number of decoding workers; images/s, after an untimed warm-up scan of two batches (the
  process's one-time costs). More than the folder holds: its photos again, in order.
- units: one target's facets (t-SNE + k-means on 1,300 codes, an ImageNet class's size: the
  scanned codes resampled with small jitter) and mean images; the anchor photos one picture
  reads; one target's evaluation (the default judges) of 10 facet and 10 random pictures, with
  and without decoding threads. One-time costs (numba's kernels compiled on a machine's first
  call, cuDNN's first passes) are timed apart and left out of the per-target costs.
- project: ImageNet-1k x 10 facets on this device from those costs: the scan of 1.28 M images,
  facets of 1,000 classes, 10,000 facet pictures and 10,000 random-start baselines (the
  default), the anchored recipe's photos, evaluation; hours per term and in total, for the
  default recipe (anchored) and the paper's (paper-mean, paper-center), each at its cheapest
  measured batch. The stages run one after another, as `mfv run` runs them; a second total
  spreads the facets (one core each) over the machine's cores, as the Ray backend's workers;
  with `--spread W`, a third replaces the facets and evaluation by their measured wall time a
  target over W worker processes sharing the device (`benchmarks/spread.py`).
- precision (not by default): 32 pictures of 32 classes per recipe (fourier, anchored,
  paper-mean, or those of them in `--recipes`) rendered with a float32 and a bfloat16 pass,
  same seeds and starts; the final activations (both measured in float32) compared: the check
  that bf16 does not move quality (tolerance: mean bf16 / float32 activation >= 0.95, and no
  recipe's median paired relative difference below -5 %).
- syncs (CUDA only, not by default): host syncs per step of every recipe's loop, counted with
  `torch.cuda.set_sync_debug_mode("warn")` at two step counts.

The machine (CPUs, torch threads, load average before / after, GPU) is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import mfv.models.passes as passes_module
import mfv.models.read as read_module
import mfv.render.recipes.base as loop_module
import mfv.render.tv.sweep as tv_sweep
from mfv.core.allocator import keep_freed_memory
from mfv.data.images import decoding_workers, load_rgb
from mfv.data.sources import ImageList, from_folder
from mfv.data.spectrum import AmplitudeSpectrum
from mfv.evaluate.evaluation import evaluate_target, networks
from mfv.facets.find import facet_means, find_facets
from mfv.facets.options import FacetOptions
from mfv.models import LoadedModel, load_model
from mfv.models.activations import capture
from mfv.models.base import to_tensor
from mfv.models.passes import Forward, declared_pairs, prepared
from mfv.models.targets import parse_targets, resolve_layer
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, RenderOptions, out_of_memory, render_batches
from mfv.render.recipes.maco import CPU_PASS_IMAGES, GPU_PASS_IMAGES
from mfv.render.recipes.paper import SCHEDULES, schedule
from mfv.runtime.tasks import pixels
from mfv.scan.options import ScanOptions
from mfv.scan.scanner import scan
from spread import ANCHOR_PHOTOS, CLASS_SIZE, Pool, synthetic_case, synthetic_class
from spread import measure as measure_spread

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette-train"
SECTIONS = ("pass", "recipes", "scan", "units", "project", "precision", "syncs")
DEFAULT_SECTIONS = ("pass", "recipes", "scan", "units", "project")
# label: (recipe, MACO crops)
RECIPES = {"paper-mean": ("paper-mean", None), "paper-center": ("paper-center", None),
           "fourier": ("fourier", None), "maco-32": ("maco", 32), "maco-4": ("maco", 4),
           "anchored": ("anchored", None), "anchored-grid": ("anchored", None),
           "anchored-all": ("anchored", None), "anchored-m2": ("anchored", None),
           "anchored-m3": ("anchored", None), "anchored-m4": ("anchored", None),
           "anchored-nomatch": ("anchored", None), "paper-mean-plain-tv": ("paper-mean", None)}
# labels timed with TV-Bregman's iterations launched one kernel at a time (no CUDA graph): the
# default's "before", side by side
PLAIN_TV = {"paper-mean-plain-tv"}
# the anchored recipe matching at most this many positions per channel a step (its grid; 0:
# every position); "anchored" is the default's
GRID_POSITIONS = {"anchored-grid": 1024, "anchored-all": 0}
# the anchored recipe matching on every k-th step only (`AnchorSettings.match_every`); k = 0:
# no matching at all (the code's pull alone: what the matching costs, by difference)
MATCH_EVERY = {"anchored-m2": 2, "anchored-m3": 3, "anchored-m4": 4, "anchored-nomatch": 0}
FULL_STEPS = {"paper-mean": 370, "paper-center": 530, "fourier": 256, "maco": 256,
              "anchored": 256}
IMAGENET = {"images": 1_281_167, "classes": 1000, "facets": 10}
PRECISION_RECIPES = ("fourier", "anchored", "paper-mean")  # bfloat16's check (`--recipes` picks)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _sync_for(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# --clock: wall seconds, or this process's CPU seconds (all its threads)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class StepClock:
    """Stands in for the loops' tqdm: the time at each step boundary (after waiting for the
    device), so a step's cost is read inside the loop, without the calls' fixed costs."""

    def __init__(self, sync: Callable[[], None], now: Callable[[], float]) -> None:
        self.sync, self.now = sync, now
        self.stamps: list[float] = []

    def __call__(self, **_):
        return self

    def update(self, n: int = 1) -> None:  # after every step
        self._stamp()

    def close(self) -> None:
        pass

    def _stamp(self) -> None:
        self.sync()
        self.stamps.append(self.now())

    def step(self) -> float:
        """The median interval between steps (robust to other load)."""
        gaps = np.diff(self.stamps)
        return float(np.median(gaps)) if len(gaps) else float("nan")


@contextlib.contextmanager
def clocked(sync: Callable[[], None], now: Callable[[], float]) -> Iterator[StepClock]:
    """Every render loop's progress bar replaced by one `StepClock` inside the block."""
    clock = StepClock(sync, now)
    modules = (loop_module,)  # the recipes' shared loop owns the progress bar
    saved = [m.tqdm for m in modules]
    for m in modules:
        m.tqdm = clock
    try:
        yield clock
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.tqdm = original


@dataclass
class Inputs:
    """Real photos and what the recipes need from them."""

    model: LoadedModel
    photos: torch.Tensor  # (n, 3, S, S) 0..255
    paths: list[str]
    codes: np.ndarray  # (n, D) penultimate codes
    amplitude: np.ndarray  # MACO's mean spectrum
    classes: list[int]


def load_inputs(model: LoadedModel, images: ImageList, n: int) -> Inputs:
    items = list(images)[:: max(1, len(images) // n)][:n]
    paths = [it.path for it in items]
    photos = torch.stack([to_tensor(model.preprocess, load_rgb(p)) for p in paths])
    spectrum = AmplitudeSpectrum()
    spectrum.update(photos)
    code = resolve_layer(model, "penultimate")
    with capture(model, [code]) as store, torch.no_grad():
        model(photos.to(model.device))
        codes = store[code.key].flatten(1).float().cpu().numpy()
    classes = list(range(0, 1000, 1000 // 64))[:64]  # spread over the 1000 classes
    return Inputs(model, photos * 255, paths, codes, spectrum.result().numpy(), classes)


def make_jobs(inputs: Inputs, batch: int, recipe: str, seed: int = 0) -> tuple[list, list[Job]]:
    """`batch` pictures of `batch` classes from photo starts (anchored: each with its anchor)."""
    model = inputs.model
    classes = [inputs.classes[b % len(inputs.classes)] for b in range(batch)]
    targets = parse_targets([f"logits:{c}" for c in classes], model)
    n = len(inputs.photos)
    jobs = []
    for b in range(batch):
        anchor = None
        if recipe == "anchored":
            refs = [(b + j) % n for j in range(ANCHOR_PHOTOS)]
            anchor = Anchor(inputs.codes[refs].mean(0), 1.0, 10.0,
                            inputs.photos[refs].numpy().astype(np.float32))
        jobs.append(Job(b, inputs.photos[b % n], seed + b, anchor))
    return targets, jobs


def bare_step(model: LoadedModel, forward: Forward, images: torch.Tensor, passes: Sequence[int],
              repeats: int, sync, now: Callable[[], float]) -> float:
    """Median seconds of the model's own forward+backward (w.r.t. the input, one logit per
    sample) over `passes` batches of the given sizes, i.e. one step's worth."""
    batches = [images[torch.arange(p) % len(images)].to(model.device) for p in passes]
    times = []
    for r in range(repeats + 1):  # the first is a warm-up (kernels, oneDNN primitives)
        sync()
        start = now()
        for x in batches:
            x = x.clone().requires_grad_(True)
            rows = torch.arange(len(x), device=x.device)
            value = forward(model, x)[rows, rows % 1000]
            torch.autograd.grad(value.sum(), x)
        sync()
        if r:
            times.append(now() - start)
    return statistics.median(times)


def maco_passes(batch: int, crops: int, device: torch.device) -> list[int]:
    """The images of each forward pass of one MACO step (as `maco_loop` splits them)."""
    cap = CPU_PASS_IMAGES if device.type == "cpu" else GPU_PASS_IMAGES
    per_pass = max(1, cap // batch)
    return [min(per_pass, crops - first) * batch for first in range(0, crops, per_pass)]


@dataclass
class Cost:
    recipe: str
    batch: int
    step: float  # seconds per step of the recipe's loop (median over rounds)
    bare: float  # seconds of the model's own forward+backward for that step's images
    ratio: float  # the median over rounds of each round's step / bare
    fixed: float  # the rest of a render_batches call
    full_steps: int

    @property
    def per_picture(self) -> float:
        return (self.fixed + self.full_steps * self.step) / self.batch


def time_recipe(inputs: Inputs, label: str, batch: int, options: RenderOptions, steps: int,
                repeats: int, rounds: int, sync, now: Callable[[], float]) -> Cost:
    """`rounds` pairs of (the bare pass, `steps` steps of the recipe) back to back: a round's
    ratio compares two timings a few seconds apart, so a slow spell of a shared machine moves
    both; the medians over rounds are reported."""
    recipe, crops = RECIPES[label]
    model = inputs.model
    forward = options.forward(model.device)
    options = replace(options, maco_crops=crops)
    if label in GRID_POSITIONS:
        options = replace(options, anchor=replace(options.anchor,
                                                  match_positions=GRID_POSITIONS[label]))
    if label in MATCH_EVERY:
        every = MATCH_EVERY[label]
        options = replace(options, anchor=replace(
            options.anchor, **({"match_every": every} if every else {"match_weight": 0.0})))
    if recipe in SCHEDULES:
        steps = max(steps, 2 * len(SCHEDULES[recipe]))
        steps = sum(o.iters for o in schedule(recipe, steps))
    passes = maco_passes(batch, crops, model.device) if recipe == "maco" else [batch]
    targets, jobs = make_jobs(inputs, batch, recipe)
    bares, step_times, fixeds = [], [], []
    graphs = label not in PLAIN_TV
    with prepared(model, forward), mock.patch.object(tv_sweep, "_GRAPHS_ON_CUDA", graphs):
        for _ in range(max(1, rounds)):
            bares.append(bare_step(model, forward, inputs.photos, passes, repeats, sync, now))
            with clocked(sync, now) as clock:
                sync()
                start = now()
                render_batches(model, targets, jobs, recipe, replace(options, steps=steps),
                               batch_size=batch, progress=False)
                sync()
                total = now() - start
            step_times.append(clock.step())
            fixeds.append(max(0.0, total - steps * step_times[-1]))
    ratio = statistics.median(t / b for t, b in zip(step_times, bares, strict=True))
    return Cost(label, batch, statistics.median(step_times), statistics.median(bares), ratio,
                statistics.median(fixeds), FULL_STEPS[recipe])


def section_pass(model: LoadedModel, inputs: Inputs, repeats: int, sync,
                 now: Callable[[], float]) -> None:
    batch = 8 if model.device.type == "cpu" else 64
    variants = [Forward(precision, layout, affine) for precision in ("float32", "bfloat16")
                for layout in (False, True) for affine in (False, True)]
    if model.device.type == "cpu":  # without bf16 units: one bf16 row shows it does not pay
        variants = [v for v in variants if v.precision == "float32"] + [
            Forward("bfloat16", True, True)]
    results: dict[Forward, list[float]] = {v: [] for v in variants}
    fastest = Forward("float32", True, True)  # and once more with its activations out of place
    in_place = bool(declared_pairs(model.module, "norm_act_pairs"))
    copied: list[float] = []
    for _ in range(max(1, repeats)):  # alternating, the best of each
        for v in variants:
            with prepared(model, v):
                results[v].append(bare_step(model, v, inputs.photos, [batch], 1, sync, now))
        if in_place:
            with mock.patch.object(passes_module, "_IN_PLACE", ()), prepared(model, fastest):
                copied.append(bare_step(model, fastest, inputs.photos, [batch], 1, sync, now))
    base = min(results[variants[0]])
    print(f"\n## The model's own forward+backward, batch {batch}, {model.name} "
          f"({model.device}), best of {max(1, repeats)}")
    print(f"{'precision':10s} {'layout':14s} {'batch norm':11s} {'ms/img':>8s} "
          f"{'vs the first':>13s}")
    declared = bool(declared_pairs(model.module))  # `prepared` folds them
    for v in variants:
        t = min(results[v])
        norm = ("folded" if declared else "affine") if v.affine_batchnorm else "torch"
        print(f"{v.precision:10s} {'channels_last' if v.channels_last else 'standard':14s} "
              f"{norm:11s} {t / batch * 1e3:8.1f} "
              f"{t / base:13.2f}")
    if copied:
        print(f"(batch norms {'folded' if declared else 'affine'} with the activations in place, "
              "as `prepared` runs the declared pairs; the same with them out of place: "
              f"{min(copied) / batch * 1e3:.1f} ms/img, {min(copied) / base:.2f}; in place / out "
              f"of place {min(results[fastest]) / min(copied):.3f})")


def section_recipes(inputs: Inputs, labels: Sequence[str], batches: Sequence[int],
                    options: RenderOptions, steps: int, max_step: float, repeats: int,
                    rounds: int, sync, now: Callable[[], float]) -> dict[str, list[Cost]]:
    model = inputs.model
    forward = options.forward(model.device)
    print(f"\n## Recipes: step over the model's own forward+backward, {model.name} "
          f"({model.device}, {forward.precision}, "
          f"{'channels_last' if forward.channels_last else 'standard'} layout)")
    print(f"{'recipe':19s} {'batch':>5s} {'s/step':>8s} {'bare':>8s} {'ratio':>6s} "
          f"{'fixed s':>8s} {'s/picture':>10s} {'pictures/h':>11s}")
    costs: dict[str, list[Cost]] = {}
    for label in labels:
        costs[label] = []
        recipe = RECIPES[label][0]
        targets, jobs = make_jobs(inputs, 1, recipe)
        render_batches(model, targets, jobs, recipe,  # a first call's one-time costs
                       replace(options, maco_crops=1,
                               steps=2 * len(SCHEDULES.get(recipe, (0,)))),
                       batch_size=1, progress=False)
        for batch in batches:
            try:
                cost = time_recipe(inputs, label, batch, options, steps, repeats, rounds,
                                   sync, now)
            except RuntimeError as error:
                if not out_of_memory(error):
                    raise
                print(f"{label:19s} {batch:5d} out of memory")
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            costs[label].append(cost)
            print(f"{label:19s} {batch:5d} {cost.step:8.3f} {cost.bare:8.3f} "
                  f"{cost.ratio:6.2f} {cost.fixed:8.2f} {cost.per_picture:10.2f} "
                  f"{3600 / cost.per_picture:11.1f}", flush=True)
            if cost.step > max_step:
                break
    for label, rows in costs.items():
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            bare = (first.bare / first.batch) / (last.bare / last.batch)
            print(f"{label}: per picture batch {first.batch} -> {last.batch} "
                  f"{first.per_picture / last.per_picture:.2f}x faster; the bare pass per image "
                  f"{bare:.2f}x (what the model itself gains)")
    print("(ratio: the recipe's step over the bare pass of the same images, median of paired "
          f"rounds; goals 1.15 for the Fourier family, 1.5 for the paper recipes. load {_load()})")
    return costs


def section_scan(model: LoadedModel, images: ImageList, n: int, workers: Sequence[int],
                 batch_size: int) -> dict[int, float]:
    every = list(images)
    if n <= len(every):
        items = every[:: max(1, len(every) // n)][:n]
    else:  # more than the folder holds: its photos again, in order (a throughput measure)
        items = [every[i % len(every)] for i in range(n)]
    subset = ImageList(tuple(items), f"{len(items)} of {images.source}")
    targets = parse_targets(["logits:*"], model)
    rates = {}
    print(f"\n## Scan: {len(subset)} photos, all 1000 logits + codes, batch {batch_size}, "
          f"{model.name} ({model.device})")
    # the process's first scan pays one-time costs (cuDNN's choices for the batch's shapes, the
    # pages of the photos): on an H200 3,600 photos ran at 341/s first and 1,103/s after
    warm = ImageList(tuple(items[:2 * batch_size]), "warm-up")
    with tempfile.TemporaryDirectory() as run:
        start = time.perf_counter()
        scan(model, warm, targets, run, ScanOptions(batch_size=batch_size, workers=workers[0]),
             progress=False)
    print(f"warm-up ({len(warm)} photos, {workers[0]} workers): {time.perf_counter() - start:.1f} "
          "s, not counted")
    for w in workers:
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            scan(model, subset, targets, run, ScanOptions(batch_size=batch_size, workers=w),
                 progress=False)
            rates[w] = len(subset) / (time.perf_counter() - start)
        print(f"workers {w}: {rates[w]:7.1f} images/s (load {_load()})", flush=True)
    return rates


@dataclass
class UnitCosts:
    facets: float  # seconds per target: t-SNE + k-means + mean images
    photo: float  # seconds to read one photo at the model's size
    evaluate: float  # seconds per target (10 facet + 10 random pictures)


def section_units(inputs: Inputs, judges: Sequence[str], seed: int = 0) -> UnitCosts:
    model = inputs.model
    codes, acts, paths = synthetic_class(Pool(inputs.codes, inputs.paths), seed)
    print(f"\n## Per-target units, {model.name} ({model.device})")
    options = FacetOptions(k=IMAGENET["facets"], m=ANCHOR_PHOTOS, seed=seed)
    start = time.perf_counter()  # a process's first call: numba's kernels compiled or loaded
    find_facets(codes[:200], acts[:200], options=options)
    print(f"first clustering call (200 codes; kernels compiled, or loaded from numba's cache): "
          f"{time.perf_counter() - start:.1f} s, not counted")
    start = time.perf_counter()
    facets = find_facets(codes, acts, options=options)
    clustering = time.perf_counter() - start
    start = time.perf_counter()
    facet_means(facets, lambda idx: pixels(model, "crop", paths, idx))
    means = time.perf_counter() - start
    photos = sum(len(f.representatives) for f in facets.facets)
    photo = means / max(1, photos)
    print(f"facets of one class ({CLASS_SIZE} codes, k={IMAGENET['facets']}, t-SNE): "
          f"{clustering:.1f} s clustering + {means:.1f} s mean images ({photos} photos, "
          f"{photo * 1e3:.0f} ms each)")
    code_ref = resolve_layer(model, "penultimate")
    start = time.perf_counter()
    own, judge_nets = networks(model, code_ref, judges)
    print(f"judges {', '.join(judges) or 'none'} loaded in {time.perf_counter() - start:.1f} s "
          "(once per process, not counted)")
    case = synthetic_case(model, facets, acts, paths, inputs.classes[0], seed)

    def evaluation() -> float:
        start = time.perf_counter()
        evaluate_target(own, judge_nets, case, seed)
        return time.perf_counter() - start

    first = evaluation()  # cuDNN's choices for new shapes, the metrics' kernels
    with mock.patch.object(read_module, "decoding_workers", lambda device: 0):
        in_turn = evaluation()
    evaluate = evaluation()
    threads = decoding_workers(model.device)
    print(f"evaluation of one target ({len(case.pictures)} pictures, {len(judge_nets)} judges): "
          f"{evaluate:.1f} s with {threads} decoding threads (the default here), {in_turn:.1f} s "
          f"decoding in turn; the process's first {first:.1f} s (load {_load()})")
    return UnitCosts(clustering + means, photo, evaluate)


def section_project(costs: dict[str, list[Cost]], rates: dict[int, float], units: UnitCosts,
                    device: torch.device, spread: tuple[int, float] | None = None) -> None:
    classes, facets = IMAGENET["classes"], IMAGENET["facets"]
    pictures = classes * facets
    scan_rate = max(rates.values())
    best_workers = max(rates, key=rates.get)
    print(f"\n## Projection: ImageNet-1k x {facets} facets on one {device.type} device "
          f"(hours; scan at {best_workers} workers)")
    for label in ("anchored", "paper-mean", "paper-center"):
        if not costs.get(label):
            continue
        best = min(costs[label], key=lambda c: c.per_picture)
        terms = [
            (f"scan of {IMAGENET['images']:,} images ({scan_rate:.0f}/s)",
             IMAGENET["images"] / scan_rate),
            (f"facets of {classes} classes ({units.facets:.1f} s each)", classes * units.facets),
            (f"render {pictures:,} facet pictures ({best.per_picture:.2f} s, batch "
             f"{best.batch})", pictures * best.per_picture),
            (f"render {pictures:,} random-start baselines", pictures * best.per_picture),
        ]
        if label == "anchored":
            terms.append((f"anchor photos ({ANCHOR_PHOTOS} a facet picture)",
                          pictures * ANCHOR_PHOTOS * units.photo))
        terms.append((f"evaluate {classes} classes ({units.evaluate:.1f} s each)",
                      classes * units.evaluate))
        total = sum(seconds for _, seconds in terms)
        print(f"\n{label}:")
        for name, seconds in terms:
            print(f"  {name:58s} {seconds / 3600:9.2f}")
        print(f"  {'total':58s} {total / 3600:9.2f}")
        # t-SNE and k-means of a target use one core (find_facets' n_jobs=1): the Ray backend
        # with one single-thread worker per core runs the node's cores' worth at once
        cores = os.cpu_count() or 1
        assumed = total - classes * units.facets * (1 - 1 / cores)
        print(f"  {f'total, facets spread over the {cores} cores (Ray workers)':58s} "
              f"{assumed / 3600:9.2f}")
        if spread is not None:  # measured: facets and evaluation over workers sharing the GPU
            workers, per_target = spread
            shared = total - classes * (units.facets + units.evaluate) + classes * per_target
            print(f"  {f'total, facets + evaluation over {workers} workers sharing it':58s} "
                  f"{shared / 3600:9.2f}  ({per_target:.2f} s a target, measured)")


def section_precision(inputs: Inputs, options: RenderOptions, steps: int | None,
                      labels: Sequence[str] = PRECISION_RECIPES,
                      count: int = 32) -> None:
    """float32 against bfloat16 passes: same jobs, final activations measured in float32."""
    model = inputs.model
    print(f"\n## bfloat16 against float32 passes: {count} pictures per recipe, "
          f"{'full' if steps is None else steps} steps ({model.device})")
    print(f"{'recipe':12s} {'float32':>9s} {'bfloat16':>9s} {'ratio':>6s} {'median rel':>11s} "
          f"{'verdict':>8s}")
    for label in labels:
        recipe = RECIPES[label][0]
        targets, jobs = make_jobs(inputs, count, recipe, seed=100)
        out = {}
        for precision in ("float32", "bfloat16"):
            results = render_batches(model, targets, jobs, recipe,
                                     replace(options, precision=precision, steps=steps),
                                     progress=False)
            out[precision] = np.array([r.activation for r in results])
        f32, b16 = out["float32"], out["bfloat16"]
        ratio = b16.mean() / f32.mean()
        relative = float(np.median((b16 - f32) / np.abs(f32).clip(1e-6)))
        verdict = "ok" if ratio >= 0.95 and relative >= -0.05 else "MOVED"
        print(f"{label:12s} {f32.mean():9.3f} {b16.mean():9.3f} {ratio:6.3f} {relative:11.3f} "
              f"{verdict:>8s}", flush=True)
    print("(tolerance: ratio of mean activations >= 0.95 and median paired relative "
          "difference >= -0.05)")


def section_syncs(inputs: Inputs, options: RenderOptions) -> None:
    """Host syncs per step of each recipe's loop, from CUDA's sync debug mode."""
    model = inputs.model
    print("\n## Host syncs per step (torch.cuda.set_sync_debug_mode)")
    for label in RECIPES:
        recipe, crops = RECIPES[label]
        targets, jobs = make_jobs(inputs, 4, recipe)
        counts = []
        plans = (8, 16) if recipe not in SCHEDULES else (2 * len(SCHEDULES[recipe]),
                                                         4 * len(SCHEDULES[recipe]))
        for steps in plans:
            render_batches(model, targets, jobs, recipe,
                           replace(options, steps=steps, maco_crops=crops), batch_size=4,
                           progress=False)  # warm-up: lazy initialisations sync once
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    render_batches(model, targets, jobs, recipe,
                                   replace(options, steps=steps, maco_crops=crops),
                                   batch_size=4, progress=False)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        executed = [steps if recipe not in SCHEDULES else sum(
            o.iters for o in schedule(recipe, steps)) for steps in plans]
        per_step = (counts[1] - counts[0]) / (executed[1] - executed[0])
        print(f"{label:12s} syncs {counts[0]} at {executed[0]} steps, {counts[1]} at "
              f"{executed[1]}: {per_step:.2f} per step", flush=True)


def main() -> None:
    keep_freed_memory()  # as the `mfv` command does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--quick", action="store_true",
                        help="batches 1 and 4, few steps, a small scan: a rough figure")
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="largest batch (default: 16 on the CPU, 256 on CUDA)")
    parser.add_argument("--max-step", type=float, default=10.0,
                        help="stop a recipe's batches after a step longer than this (s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps timed per run (default 6, quick 4; paper: >= 2 per octave)")
    parser.add_argument("--repeats", type=int, default=None, help="bare-pass repeats (2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired (bare pass, recipe steps) rounds per recipe and batch "
                             "(3, quick 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scan-images", type=int, default=None, help="(320, quick 64)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--layout", default="auto", choices=("auto", "standard", "channels_last"))
    parser.add_argument("--judges", nargs="*", default=["efficientnet_lite1", "efficientnet_lite2"])
    parser.add_argument("--only", choices=SECTIONS, action="append")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--spread", type=int, default=0,
                        help="with units: also time targets over this many worker processes "
                             "sharing the device (benchmarks/spread.py); the projection uses it")
    parser.add_argument("--spread-targets", type=int, default=0,
                        help="targets for --spread (default: twice the workers)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="what pass and recipe timings count: wall seconds, or this "
                             "process's CPU seconds (steadier on a loaded machine; the scan and "
                             "units are always wall)")
    args = parser.parse_args()
    now = CLOCKS[args.clock]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = _sync_for(device)
    sections = args.only or list(DEFAULT_SECTIONS)
    if "project" in sections:  # it needs what these measure
        sections = list(dict.fromkeys([*sections, "recipes", "scan", "units"]))
    if args.spread:  # reported beside the units it spreads
        sections = list(dict.fromkeys([*sections, "units"]))
    if args.batches:
        batches = args.batches
    else:
        most = args.max_batch or (16 if device.type == "cpu" else 256)
        batches = [1, 4] if args.quick else [2 ** i for i in range(int(math.log2(most)) + 1)]
    steps = args.steps or (4 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 3)
    layout = None if args.layout == "auto" else args.layout == "channels_last"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"# benchmarks/steps.py {'--quick ' if args.quick else ''}: device {device} (GPU "
          f"{gpu}), {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {args.clock} clock, load {_load()}")
    model = load_model(args.model, device=device)
    images = from_folder(args.data)
    inputs = load_inputs(model, images, 64)
    options = RenderOptions(precision=args.precision, channels_last=layout,
                            amplitude=inputs.amplitude)
    if "pass" in sections:
        section_pass(model, inputs, repeats, sync, now)
    costs: dict[str, list[Cost]] = {}
    if "recipes" in sections:
        labels = args.recipes or [r for r in RECIPES if r not in MATCH_EVERY]
        costs = section_recipes(inputs, labels, batches, options, steps, args.max_step,
                                repeats, rounds, sync, now)
    rates: dict[int, float] = {}
    if "scan" in sections:
        rates = section_scan(model, images, args.scan_images or (64 if args.quick else 320),
                             args.workers, 32 if device.type == "cpu" else 256)
    units = section_units(inputs, args.judges) if "units" in sections else None
    spread = None
    if args.spread:
        targets = args.spread_targets or 2 * args.spread
        wall, _ = measure_spread(args.spread, targets, args.model, str(device), args.judges,
                                 Pool(inputs.codes, inputs.paths))
        spread = (args.spread, wall / targets)
        print(f"\n## Spread: {spread[1]:.2f} s a target (facets + evaluation) over "
              f"{args.spread} worker processes sharing the device (benchmarks/spread.py)")
    if "project" in sections and units is not None:
        section_project(costs, rates, units, device, spread)
    if "precision" in sections:
        section_precision(inputs, options, 32 if args.quick else None,
                          [r for r in PRECISION_RECIPES if not args.recipes or r in args.recipes])
    if "syncs" in sections:
        if device.type == "cuda":
            section_syncs(inputs, options)
        else:
            print("\n## Host syncs per step: CUDA only (tests/test_speed.py checks the CPU "
                  "loops for Python-level reads)")
    print(f"\n(load {_load()})")


if __name__ == "__main__":
    main()

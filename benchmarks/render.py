"""Render benchmark (issue 5): TV-Bregman backends against scikit-image, the engine's step time
over the model's own forward+backward, and k facets in one batch against one by one.

Usage: python benchmarks/render.py [--device cpu|cuda] [--model efficientnet_lite0]
                                   [--threads N] [--repeats 2] [--quick] [--only tv|engine|facets]
                                   [--batch 10 [--batch 64 ...]]
                                   [--engine-tv auto|numba|skimage|torch-exact|torch-fast]

Everything is measured in this one run, on the same inputs:

1. TV at 227x227x3 on 10 noisy photos, one TV weight each from 0.01 to 2 (the schedules' range):
   the paper's call (`skimage.restoration.denoise_tv_bregman`, float64, one image at a time) against
   `mfv.render.tv.tv_bregman` with each backend, and the variants `benchmarks/tv.py` keeps (a
   skimage thread pool, a red-black sweep), one image per call (B=1) and the ten in one call
   (B=10). Speed-up = skimage time / variant time.
2. The engine at batch 10 (or each `--batch`), input = the model's size: seconds per step of
   `fourier_loop` and `paper_loop` (paper-mean schedule rescaled to a few steps, its TV time
   shown apart; TV as `--engine-tv` says, default `auto`), over one bare forward+backward of
   the model on a (B, 3, S, S) input w.r.t. the input for one logit per sample, the same number
   of times.
   Goals: <= 1.15 for fourier, <= 1.5 for the paper recipes.
3. k=10 facets (10 start images, one target) with `mfv.render.batch.render_batches`, paper-mean:
   one batch of 10 against 10 runs of one.

Timings are the best of `--repeats` runs, sides alternating (least disturbed by other load).
The machine's CPU count, torch threads and load average (before / after) are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from skimage.restoration import denoise_tv_bregman

import mfv.render.recipes.paper as paper
from mfv.models import load_model
from mfv.models.targets import parse_targets
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.objective import Objective
from mfv.render.recipes.fourier import FourierSettings, fourier_loop
from mfv.render.recipes.paper import paper_loop, schedule
from tv import VARIANTS, noisy_photos

IMAGENETTE_CLASSES = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
TV_VARIANTS = {  # label: a function of (images, weights), from benchmarks/tv.py
    "mfv numba": VARIANTS["numba f32"][0],
    "skimage (thread pool)": VARIANTS["skimage pool"][0],
    "mfv torch exact": VARIANTS["torch exact"][0],
    "torch fast (red-black sweep)": VARIANTS["torch fast"][0],
}
ENGINE_TV = {"numba": "mfv numba", "skimage": "skimage (thread pool)",
             "torch-exact": "mfv torch exact", "torch-fast": "torch fast (red-black sweep)"}


def _best(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@contextlib.contextmanager
def _engine_tv(choice: str) -> Iterator[list[float]]:
    """Make the engine's TV call use `kwargs` and record the seconds each call takes."""
    spent: list[float] = []
    original = paper.tv_bregman

    def timed(images: torch.Tensor, weight, **kw) -> torch.Tensor:
        start = time.perf_counter()
        out = original(images, weight, **kw) if choice == "auto" else \
            TV_VARIANTS[ENGINE_TV[choice]](images, weight)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return out

    paper.tv_bregman = timed
    try:
        yield spent
    finally:
        paper.tv_bregman = original


def bench_tv(device: torch.device, repeats: int, sync) -> None:
    n = 10
    imgs = noisy_photos(n, 227, noise=12.0)
    weights = np.geomspace(0.01, 2.0, n)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(device, torch.float32).contiguous()
    w = torch.from_numpy(weights)

    def paper() -> None:
        for img, wk in zip(imgs, weights, strict=True):
            denoise_tv_bregman(img, weight=wk, max_num_iter=100, eps=1e-3, channel_axis=None)

    variants = {k: v for k, v in TV_VARIANTS.items()
                if device.type == "cpu" or k not in ("mfv numba", "skimage (thread pool)")}
    runs: dict[str, list[float]] = {"skimage (paper call)": []}
    runs.update({label: [] for label in variants})
    runs.update({f"{label} B=10": [] for label in variants})
    for _ in range(repeats):  # alternate the sides, keep each one's best
        runs["skimage (paper call)"].append(_best(paper, 1, lambda: None))
        for label, fn in variants.items():
            runs[label].append(_best(
                lambda fn=fn: [fn(x[k:k + 1], w[k:k + 1]) for k in range(n)], 1, sync))
            runs[f"{label} B=10"].append(_best(lambda fn=fn: fn(x, w), 1, sync))
    base = min(runs["skimage (paper call)"]) / n
    print(f"\n## TV-Bregman, 227x227x3, 10 noisy photos, weights 0.01..2, max_iter 100, eps 1e-3"
          f" ({device}, torch threads {torch.get_num_threads()})")
    print(f"{'variant':40s} {'B=1 ms/img':>11s} {'speed-up':>9s} {'B=10 ms/img':>12s} "
          f"{'speed-up':>9s}")
    print(f"{'skimage, the paper call (CPU, float64)':40s} {base * 1e3:11.1f} {1.0:9.2f} "
          f"{base * 1e3:12.1f} {1.0:9.2f}")
    for label in variants:
        one, ten = min(runs[label]) / n, min(runs[f"{label} B=10"]) / n
        print(f"{label:40s} {one * 1e3:11.1f} {base / one:9.2f} {ten * 1e3:12.1f} "
              f"{base / ten:9.2f}")


def bench_engine(model, steps: int, paper_steps: int, repeats: int, sync,
                 engine_tv: str, batch: int = 10) -> None:
    size = model.preprocess.input_size
    device = model.device
    classes = [IMAGENETTE_CLASSES[b % len(IMAGENETTE_CLASSES)] for b in range(batch)]
    targets = parse_targets([f"logits:{c}" for c in IMAGENETTE_CLASSES], model)
    objective = Objective(model, targets, [b % len(targets) for b in range(batch)])
    starts = torch.from_numpy(noisy_photos(batch, size)).permute(0, 3, 1, 2).float().contiguous()
    start_list = list(starts)
    seeds = list(range(batch))
    x0 = starts.to(device)
    rows = torch.arange(batch, device=device)
    cls = torch.tensor(classes, device=device)
    octaves = schedule("paper-mean", paper_steps)

    def bare(n: int) -> None:
        for _ in range(n):
            x = x0.clone().requires_grad_(True)
            value = model(x / 255.0)[rows, cls]
            torch.autograd.grad(value.sum(), x)

    tv_time: list[float] = []

    def paper() -> None:
        with _engine_tv(engine_tv) as spent:
            paper_loop(objective, start_list, seeds, octaves)
        tv_time.append(sum(spent))

    paper_n = sum(o.iters for o in octaves)
    tv_label = engine_tv
    paper_label = f"paper-mean (TV {tv_label})"
    sides: dict[str, tuple[Callable[[], None], int, str | None]] = {
        "fourier": (lambda: fourier_loop(objective, start_list, seeds,
                                         FourierSettings(steps=steps)), steps, "1.15"),
        "  bare forward+backward": (lambda: bare(steps), steps, None),
        paper_label: (paper, paper_n, "1.5"),
        "  bare forward+backward ": (lambda: bare(paper_n), paper_n, None),
    }
    bare(1)  # warm-up
    best: dict[str, list[float]] = {label: [] for label in sides}
    for _ in range(repeats):
        for label, (fn, _, _) in sides.items():
            best[label].append(_best(fn, 1, sync))
    per_step = {label: min(best[label]) / n for label, (_, n, _) in sides.items()}
    print(f"\n## Engine step time over the model's forward+backward, batch {batch}, input "
          f"{size}, {model.name} ({device}, torch threads {torch.get_num_threads()})")
    print(f"{'loop':36s} {'steps':>5s} {'s/step':>7s} {'TV':>6s} {'other':>6s} {'ratio':>6s} "
          f"{'goal':>5s}")
    labels = list(sides)
    for loop, ref in ((labels[0], labels[1]), (labels[2], labels[3])):
        n, goal = sides[loop][1], sides[loop][2]
        best_run = int(np.argmin(best[loop]))
        tv = tv_time[best_run] / n if loop == paper_label else 0.0
        other = per_step[loop] - per_step[ref] - tv
        print(f"{loop:36s} {n:5d} {per_step[loop]:7.3f} {tv:6.3f} {other:6.3f} "
              f"{per_step[loop] / per_step[ref]:6.2f} {goal:>5s}")
        print(f"{ref:36s} {n:5d} {per_step[ref]:7.3f}")
    print("(TV: the engine's TV calls; other: s/step - bare - TV, i.e. crops, hooks, objective, "
          "parameterization, optimizer)")


def bench_facets(model, steps: int, repeats: int, sync) -> None:
    size = model.preprocess.input_size
    k = 10
    targets = parse_targets([f"logits:{IMAGENETTE_CLASSES[0]}"], model)
    starts = torch.from_numpy(noisy_photos(k, size)).permute(0, 3, 1, 2).float()
    jobs = [Job(0, starts[i], seed=i) for i in range(k)]

    def together() -> None:
        render_batches(model, targets, jobs, "paper-mean", RenderOptions(steps=steps),
                       batch_size=k,
                       progress=False)

    def alone() -> None:
        for job in jobs:
            render_batches(model, targets, [job], "paper-mean", RenderOptions(steps=steps),
                           progress=False)

    t_batch, t_alone = [], []
    for _ in range(repeats):
        t_batch.append(_best(together, 1, sync))
        t_alone.append(_best(alone, 1, sync))
    tb, ta = min(t_batch), min(t_alone)
    print(f"\n## k={k} facets of one target, paper-mean, {steps} steps, {model.name} "
          f"({model.device})")
    print(f"one batch of {k}: {tb:.2f} s | {k} runs of one: {ta:.2f} s | "
          f"batch / one-by-one = {tb / ta:.2f} (speed-up x{ta / tb:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and one repeat (a rough figure in minutes)")
    parser.add_argument("--only", choices=("tv", "engine", "facets"), action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--batch", type=int, action="append",
                        help="engine batch size(s) for section 2 (repeatable; default 10)")
    parser.add_argument("--engine-tv", default="auto",
                        choices=("auto", "numba", "skimage", "torch-exact", "torch-fast"),
                        help="TV backend the engine uses in section 2 (default: auto)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats = 1 if args.quick else args.repeats
    sections = args.only or ["tv", "engine", "facets"]
    print(f"# benchmarks/render.py: device {device}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads, load {_load()}")
    if "tv" in sections:
        bench_tv(device, repeats, sync)
        print(f"(load {_load()})")
    if {"engine", "facets"} & set(sections):
        model = load_model(args.model, device=device)
        for batch in (args.batch or [10]) if "engine" in sections else []:
            bench_engine(model, steps=3 if args.quick else 10,
                         paper_steps=8 if args.quick else 20, repeats=repeats, sync=sync,
                         engine_tv=args.engine_tv, batch=batch)
            print(f"(load {_load()})")
        if "facets" in sections:
            bench_facets(model, steps=8 if args.quick else 16, repeats=repeats, sync=sync)
            print(f"(load {_load()})")


if __name__ == "__main__":
    main()

"""Per-target work spread over worker processes that share one device (issue 24, the projection).

A target's facets (t-SNE and k-means on one core) and its evaluation (decoding photos, the
judges' passes) are mostly CPU work. On a node with one GPU and many cores, the Ray backend's
workers share the GPU (`--workers N`, each holding 1/N of it), so these units run N at a time.
This measures what that buys: `--workers P ...` processes, each with one torch thread (as a
Ray worker has) and its own copy of the model and judges on the device, take `--targets`
synthetic ImageNet-sized classes (1,300 scanned codes resampled with jitter, as
`benchmarks/steps.py`'s units section) and run each one's facets, mean images and evaluation
of 10 facet and 10 random pictures. One-time costs (imports, loading, numba's kernels, cuDNN's
first passes) are paid before the clock starts: every worker runs one untimed target, then all
wait at a barrier. Printed: per target, the wall seconds (the run's wall time over its targets)
and the speed-up over one worker.

Usage: python benchmarks/spread.py [--device cuda] [--workers 1 8 16] [--targets 32]
           [--data DIR] [--judges efficientnet_lite1]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mfv.data.images import load_rgb
from mfv.data.sources import from_folder
from mfv.evaluate.evaluation import Case, Picture, evaluate_target, networks
from mfv.facets.find import FacetResult, facet_means, find_facets
from mfv.facets.options import FacetOptions
from mfv.models import LoadedModel, load_model
from mfv.models.activations import capture
from mfv.models.base import to_tensor
from mfv.models.targets import parse_targets, resolve_layer
from mfv.runtime.tasks import pixels

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette-train"
CLASS_SIZE = 1300  # images of one ImageNet class
FACETS = 10
ANCHOR_PHOTOS = 15


@dataclass(frozen=True)
class Pool:
    """What every synthetic class is drawn from: scanned codes and their photos."""

    codes: np.ndarray  # (n, D) penultimate codes
    paths: list[str]


def scanned_codes(model: LoadedModel, paths: list[str], batch: int = 64) -> np.ndarray:
    """(n, D) penultimate codes of the photos."""
    code = resolve_layer(model, "penultimate")
    out = []
    for i in range(0, len(paths), batch):
        photos = torch.stack([to_tensor(model.preprocess, load_rgb(p))
                              for p in paths[i:i + batch]])
        with capture(model, [code]) as store, torch.no_grad():
            model(photos.to(model.device))
            out.append(store[code.key].flatten(1).float().cpu().numpy())
    return np.concatenate(out)


def synthetic_class(pool: Pool, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageNet class's worth of codes: `CLASS_SIZE` scanned codes drawn with jitter (5 % of
    each dimension's spread), gamma-distributed activations and the drawn codes' photos."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(pool.codes), CLASS_SIZE)
    scale = pool.codes.std(0, keepdims=True) * 0.05
    codes = pool.codes[rows] + rng.normal(0, 1, (CLASS_SIZE, pool.codes.shape[1])) * scale
    return codes, rng.gamma(2.0, 2.0, CLASS_SIZE), [pool.paths[r] for r in rows]


def one_target(model: LoadedModel, judges: tuple, pool: Pool, seed: int) -> tuple[float, float]:
    """Seconds of one synthetic class's facets (with mean images) and of its evaluation."""
    codes, acts, paths = synthetic_class(pool, seed)
    start = time.perf_counter()
    facets = find_facets(codes, acts, options=FacetOptions(k=FACETS, m=ANCHOR_PHOTOS, seed=seed))
    facet_means(facets, lambda idx: pixels(model, "crop", paths, idx))
    middle = time.perf_counter()
    own, judge_nets = judges
    evaluate_target(own, judge_nets, synthetic_case(model, facets, acts, paths, seed % 1000, seed),
                    seed)
    return middle - start, time.perf_counter() - middle


def synthetic_case(model: LoadedModel, facets: FacetResult, acts: np.ndarray, paths: list[str],
                   class_index: int, seed: int) -> Case:
    """What one target's evaluation judges: a class logit, its facets and their photos, and
    one random-pixel picture per facet for each start (facet and random)."""
    size = model.preprocess.input_size
    rng = np.random.default_rng(seed)
    pictures = [Picture(kind, rank, "anchored", 1.0,
                        rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                for kind in ("facet", "random") for rank in range(len(facets.facets))]
    members = [[paths[i] for i in f.members] for f in facets.facets]
    target = parse_targets([f"logits:{class_index}"], model)[0]
    return Case(target, facets, pictures, members, float(acts.max()))


@functools.cache
def _loaded(model_name: str, device: str, judge_names: tuple[str, ...]) -> tuple:
    """This worker process's model and (own, judge) networks, loaded once."""
    torch.set_num_threads(1)  # as a Ray worker with one CPU
    model = load_model(model_name, device=torch.device(device))
    return model, networks(model, resolve_layer(model, "penultimate"), list(judge_names))


def _worker_start(model_name: str, device: str, judge_names: tuple[str, ...], pool: Pool,
                  barrier) -> None:
    """A worker process's one-time costs, then the barrier: the clock starts after it."""
    model, nets = _loaded(model_name, device, judge_names)
    one_target(model, nets, pool, seed=10_000 + os.getpid())
    barrier.wait(timeout=600)


def _worker_target(model_name: str, device: str, judge_names: tuple[str, ...], pool: Pool,
                   seed: int) -> tuple[float, float]:
    model, nets = _loaded(model_name, device, judge_names)
    return one_target(model, nets, pool, seed)


def measure(workers: int, targets: int, model_name: str, device: str, judges: list[str],
            pool: Pool) -> tuple[float, list[tuple[float, float]]]:
    """Wall seconds for `targets` targets over `workers` processes, and each target's
    (facets, evaluation) seconds."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    names = tuple(judges)
    with context.Pool(workers, _worker_start,
                      (model_name, device, names, pool, barrier)) as processes:
        barrier.wait(timeout=600)  # every worker loaded and warm
        start = time.perf_counter()
        each = processes.map(functools.partial(_worker_target, model_name, device, names, pool),
                             range(targets), chunksize=1)
        wall = time.perf_counter() - start
    return wall, each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--targets", type=int, default=None,
                        help="targets per measurement (default: twice the most workers)")
    parser.add_argument("--judges", nargs="*", default=["efficientnet_lite1"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=400, help="scanned photos drawn from")
    args = parser.parse_args()
    targets = args.targets or 2 * max(args.workers)
    model = load_model(args.model, device=torch.device(args.device))
    items = list(from_folder(args.data))
    items = items[:: max(1, len(items) // args.photos)][:args.photos]
    paths = [it.path for it in items]
    pool = Pool(scanned_codes(model, paths), paths)
    print(f"# benchmarks/spread.py: device {args.device}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {targets} targets of {CLASS_SIZE} codes, judges "
          f"{', '.join(args.judges) or 'none'}, load {os.getloadavg()[0]:.2f}")
    print("workers  wall s  s/target  speed-up  facets s (mean)  evaluation s (mean)  load")
    first = None
    for workers in args.workers:
        wall, each = measure(workers, targets, args.model, args.device, args.judges, pool)
        per = wall / targets
        first = first or per
        facets, evaluation = np.mean([e[0] for e in each]), np.mean([e[1] for e in each])
        print(f"{workers:7d}  {wall:6.1f}  {per:8.2f}  {first / per:8.2f}  {facets:15.2f}  "
              f"{evaluation:19.2f}  {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()

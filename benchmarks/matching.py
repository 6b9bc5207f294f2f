"""The anchored recipe's sort-matching alone: per matched layer of Lite0 (its defaults, on the
grid of at most `AnchorSettings.match_positions` positions), the ranks' argsort and the term's
forward+backward (`quantile_match`) on the activations of real photos, next to Lite0's own
forward+backward of the same batch, alternated in rounds; medians in ms and as shares of the
pass. What the default recipe's step pays for matching, apart from the step's other work.

Usage: python benchmarks/matching.py [--batch 10] [--rounds 5] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mfv.data.images import load_rgb
from mfv.models import load_model
from mfv.models.activations import capture
from mfv.models.base import to_tensor
from mfv.models.passes import prepared
from mfv.models.targets import resolve_layer
from mfv.render.anchor import (
    AnchorSettings,
    _argsort,
    _grid_positions,
    _grid_stride,
    default_match_layers,
    quantile_match,
)
from mfv.render.batch import RenderOptions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette-train"


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median ms of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = load_model("efficientnet_lite0")
    files = sorted(p for d in sorted(DATA.iterdir()) for p in sorted(d.iterdir())[:1])
    photos = torch.stack([to_tensor(model.preprocess, load_rgb(f))
                          for f in files[:args.batch]])
    forward = RenderOptions().forward(model.device)
    layers = [resolve_layer(model, p) for p in default_match_layers(model)]
    most = AnchorSettings().match_positions
    with prepared(model, forward), capture(model, layers) as store, torch.no_grad():
        forward(model, photos * 255)
        grids = {ref.path: _grid_positions(store[ref.key].float(),
                                           _grid_stride(store[ref.key].shape, most), 0)
                 for ref in layers}
    quantiles = {k: v.roll(1, dims=0).sort(dim=2).values for k, v in grids.items()}
    variances = {k: v.var(dim=2, keepdim=True) + 1e-3 for k, v in grids.items()}

    def bare() -> None:
        x = (photos * 255).requires_grad_(True)
        rows = torch.arange(len(x))
        torch.autograd.grad(forward(model, x)[rows, rows].sum(), x)

    def match(path: str) -> None:
        x = grids[path].clone().requires_grad_(True)
        quantile_match(x, quantiles[path], variances[path]).sum().backward()

    print(f"# benchmarks/matching.py: Lite0, batch {args.batch}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.2f}; matched layers on grids of at most {most} positions")
    rows: dict[str, list[float]] = {}
    with prepared(model, forward):
        for _ in range(args.rounds):
            rows.setdefault("bare pass", []).append(timed(bare, max(2, args.repeats // 5)))
            for path, grid in grids.items():
                rows.setdefault(f"{path} argsort", []).append(
                    timed(lambda g=grid: _argsort(g), args.repeats))
                rows.setdefault(f"{path} match fwd+bwd", []).append(
                    timed(lambda p=path: match(p), args.repeats))
    pass_ms = statistics.median(rows["bare pass"])
    total = sum(statistics.median(v) for k, v in rows.items() if k.endswith("fwd+bwd"))
    print(f"{'what':<28} {'shape':>16} {'ms':>8} {'of the pass':>12}")
    for name, values in rows.items():
        path = name.split()[0]
        shape = "x".join(map(str, grids[path].shape)) if path in grids else ""
        ms = statistics.median(values)
        print(f"{name:<28} {shape:>16} {ms:8.2f} {ms / pass_ms:12.3f}")
    print(f"{'matching, all layers':<28} {'':>16} {total:8.2f} {total / pass_ms:12.3f}")
    print(f"(medians over {args.rounds} alternated rounds; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()

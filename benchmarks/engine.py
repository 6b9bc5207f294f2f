"""Passes without gradients through ONNX Runtime against torch's own (`mfv.models.onnx_engine`).

Usage: python benchmarks/engine.py [--models efficientnet_lite0 efficientnet_lite2]
       [--threads 1 2] [--batch 16] [--rounds 4] [--out benchmarks/results/engine.md]

Per network (at its own input size), thread count and engine, a batch of real photos (the
first `batch` of ../shared/data/imagenette-train, as the network's preprocessing shows them)
is read up to the penultimate layer: torch as mfv ran it before (`capture` + `inference`:
channels_last, batch norms folded) and ONNX Runtime (`layer_reader`), back to back in each of
`rounds` rounds after one warm-up pass each; the medians of ms per image and of the per-round
ratio are printed, with the export's one-time cost and the largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mfv.core.allocator import keep_freed_memory
from mfv.core.io import atomic_write_text
from mfv.data.images import load_rgb
from mfv.data.sources import from_folder
from mfv.models import load_model
from mfv.models.base import to_tensor
from mfv.models.onnx_engine import engine_name, exported, layer_reader
from mfv.models.targets import resolve_layer

HERE = Path(__file__).resolve().parent


def ms_per_image(read, images: torch.Tensor) -> float:
    start = time.perf_counter()
    read(images)
    return (time.perf_counter() - start) * 1000 / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0",
                                                        "efficientnet_lite2"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    keep_freed_memory()  # as the mfv command runs
    photos = list(from_folder(HERE.parent.parent / "shared/data/imagenette-train"))
    lines = [f"`{' '.join(['python benchmarks/engine.py', *sys.argv[1:]])}`", "",
             f"torch {torch.__version__}, {engine_name(load_model('efficientnet_lite0'))}, "
             f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the start; batch "
             f"{args.batch}, {args.rounds} rounds, medians", "",
             "| network | threads | torch ms/img | ONNX Runtime ms/img | speed-up | export s | "
             "largest difference / range |", "|---|---|---|---|---|---|---|"]
    for name in args.models:
        model = load_model(name)
        layer = resolve_layer(model, "penultimate")
        images = torch.stack([to_tensor(model.preprocess, load_rgb(p.path))
                              for p in photos[:args.batch]])
        size = model.preprocess.input_size
        start = time.perf_counter()
        exported(model, [layer], (size, size))
        export_s = time.perf_counter() - start
        for threads in args.threads:
            torch.set_num_threads(threads)
            with layer_reader(model, [layer], "torch") as by_torch, \
                    layer_reader(model, [layer], "onnxruntime") as by_onnx:
                want, got = by_torch(images)[0].clone(), by_onnx(images)[0]
                diff = float((got - want).abs().max() / want.abs().max())
                rows = []
                for _ in range(args.rounds):
                    t, o = ms_per_image(by_torch, images), ms_per_image(by_onnx, images)
                    rows.append((t, o, t / o))
            t, o, r = (statistics.median(c) for c in zip(*rows, strict=True))
            line = (f"| {name} @ {size} | {threads} | {t:.1f} | {o:.1f} | **{r:.2f}x** | "
                    f"{export_s:.1f} | {diff:.1e} |")
            print(line, flush=True)
            lines.append(line)
    lines.append(f"\nload {os.getloadavg()[0]:.1f} at the end")
    print(lines[-1])
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
    assert np.isfinite(r)


if __name__ == "__main__":
    main()

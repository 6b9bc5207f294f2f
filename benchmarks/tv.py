"""TV-Bregman benchmark (issue 16): every CPU backend of `mfv.render.tv.tv_bregman` against
scikit-image's own loop, side by side, plus the numba kernels' JIT compile time.

Usage: python benchmarks/tv.py [--threads 1 [--threads 2 ...]] [--batch 1 [--batch 10 ...]]
                               [--repeats 2] [--size 227] [--only VARIANT ...] [--no-compile]

Inputs: 10 noisy photos from scikit-image's samples (N(0, 12^2) noise, 0..255), size x size x 3,
one TV weight each from 0.01 to 2 (the render schedules' range), max_iter 100, eps 1e-3.
For each torch thread count (`torch.set_num_threads`, which every backend follows) and batch
size B, the ten photos go through each variant in calls of B images; the table shows ms per
image and the speed-up over the paper's call (skimage, serial, one image at a time):

- skimage serial: `skimage.restoration.denoise_tv_bregman(img, weight, 100, 1e-3,
  channel_axis=None)`, image after image (it is single-threaded: the same for every row).
- skimage pool: backend="skimage", the paper's call per sample in a thread pool.
- torch exact / torch fast: backend="torch", float32.
- numba f32 / numba f64: backend="numba" on float32 / float64 input (the render loops pass
  float32; float64 is the paper's precision).

Timings are the best of `--repeats` rounds, variants alternating within a round. The JIT
compile time is measured in fresh interpreters with an empty numba cache (the first call of a
process that has never compiled the kernels) and then with that cache filled (the first call of
every later process). The machine's CPU count and load average (before / after) are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from skimage.restoration import denoise_tv_bregman

from mfv.render.tv import tv_bregman
from render import noisy_photos

VARIANTS: dict[str, tuple[dict, torch.dtype] | None] = {  # label: (tv_bregman kwargs, dtype)
    "skimage serial": None,
    "skimage pool": ({"backend": "skimage"}, torch.float32),
    "torch exact": ({"backend": "torch", "method": "exact"}, torch.float32),
    "torch fast": ({"backend": "torch", "method": "fast"}, torch.float32),
    "numba f32": ({"backend": "numba"}, torch.float32),
    "numba f64": ({"backend": "numba"}, torch.float64),
}

# Run in a fresh interpreter: time one first call per dtype on one 227x227x3 image.
_COMPILE_PROBE = """
import time, torch
from mfv.render.tv import tv_bregman
x = torch.rand(1, 3, 227, 227, generator=torch.Generator().manual_seed(0)) * 255
for dtype in (torch.float32, torch.float64):
    start = time.perf_counter()
    tv_bregman(x.to(dtype), 0.1, max_iter=1, backend="numba")
    print(time.perf_counter() - start)
"""


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(threads: int, batches: list[int], labels: list[str], repeats: int,
          imgs: np.ndarray, weights: np.ndarray) -> None:
    torch.set_num_threads(threads)
    n = len(imgs)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    w = torch.from_numpy(weights)

    def calls(label: str, batch: int) -> Callable[[], None]:
        if VARIANTS[label] is None:  # the paper's call, one image after the other
            return lambda: [denoise_tv_bregman(img, weight=wk, max_num_iter=100, eps=1e-3,
                                               channel_axis=None)
                            for img, wk in zip(imgs, weights, strict=True)]
        kwargs, dtype = VARIANTS[label]
        xs = x.to(dtype)
        return lambda: [tv_bregman(xs[s:s + batch], w[s:s + batch], **kwargs)
                        for s in range(0, n, batch)]

    for label in labels:  # warm-up: JIT compile (or cache load), thread pools, allocator
        if VARIANTS[label] is not None:
            kwargs, dtype = VARIANTS[label]
            tv_bregman(x[:2, :, :16, :16].to(dtype), 0.1, **kwargs)
    best = {(label, batch): float("inf") for label in labels for batch in batches}
    for _ in range(repeats):
        for label in labels:
            for batch in batches if VARIANTS[label] is not None else batches[:1]:
                best[label, batch] = min(best[label, batch], _timed(calls(label, batch)))
    for batch in batches[1:]:  # skimage's serial loop does not batch
        best["skimage serial", batch] = best["skimage serial", batches[0]]
    base = best["skimage serial", batches[0]] / n
    print(f"\n## {imgs.shape[1]}x{imgs.shape[2]}x3, {n} noisy photos, weights 0.01..2, "
          f"max_iter 100, eps 1e-3, torch threads {threads} (load {_load()})")
    head = "".join(f" {f'B={b} ms/img':>12s} {'speed-up':>8s}" for b in batches)
    print(f"{'variant':16s}{head}")
    for label in labels:
        row = ""
        for batch in batches:
            per = best[label, batch] / n
            row += f" {per * 1e3:12.1f} {base / per:8.2f}"
        print(f"{label:16s}{row}")


def bench_compile() -> None:
    """The numba kernels' first call in fresh processes: empty cache, then filled cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        rows = []
        for state in ("empty cache (compiles)", "filled cache (loads)"):
            out = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            rows.append((state, [float(v) for v in out]))
    print("\n## numba kernels, first call of a process (one 227x227x3 image, 1 iteration)")
    print(f"{'':24s} {'float32 s':>10s} {'float64 s':>10s}")
    for state, (f32, f64) in rows:
        print(f"{state:24s} {f32:10.2f} {f64:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append",
                        help="torch threads (repeatable; default 1 and 2)")
    parser.add_argument("--batch", type=int, action="append",
                        help="images per call (repeatable; default 1 and 10)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--only", choices=tuple(VARIANTS), action="append",
                        help="run only these variants (repeatable; skimage serial is the base)")
    parser.add_argument("--no-compile", action="store_true", help="skip the JIT compile probe")
    args = parser.parse_args()
    labels = ["skimage serial"] + [v for v in VARIANTS
                                   if v != "skimage serial" and (not args.only or v in args.only)]
    imgs = noisy_photos(10, args.size, noise=12.0)
    weights = np.geomspace(0.01, 2.0, len(imgs))
    print(f"# benchmarks/tv.py: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load {_load()}")
    if not args.no_compile:
        bench_compile()
    for threads in args.threads or [1, 2]:
        bench(threads, args.batch or [1, 10], labels, args.repeats, imgs, weights)
    print(f"\n(load {_load()})")


if __name__ == "__main__":
    main()

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
- skimage pool: the paper's call per sample in a thread pool (`skimage_pool`; once a backend of
  `tv_bregman`, removed when numba became a requirement).
- torch exact: backend="torch", float32; torch fast: the same iteration with a red-black
  Gauss-Seidel sweep (`RedBlackSweep`, here: not kept in mfv, see docs/benchmarks.md).
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from skimage import data, transform
from skimage.restoration import denoise_tv_bregman
from torch import Tensor

from mfv.render.tv import tv_bregman
from mfv.render.tv.sweep import _neighbours, torch_tv


def noisy_photos(n: int, size: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """n float64 0..255 (size, size, 3) photos from skimage's samples, plus Gaussian noise."""
    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat")
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = getattr(data, names[k % len(names)])()
        img = transform.resize(img, (size, size), anti_aliasing=True) * 255.0
        if k >= len(names):
            img = img[:, ::-1]  # mirrored copies for more than six
        out.append(np.clip(img + rng.normal(0.0, noise, img.shape), 0.0, 255.0))
    return np.stack(out)


def skimage_pool(images: Tensor, weight, max_iter: int = 100, eps: float = 1e-3) -> Tensor:
    """The paper's call on every sample of a CPU batch (float64), in a thread pool of
    `torch.get_num_threads()` workers (skimage's kernel releases the GIL)."""
    b, c, h, w = images.shape
    arrays = images.detach().double().permute(0, 2, 3, 1).numpy()
    weights = torch.as_tensor(weight, dtype=torch.float64).expand(b).tolist()

    def one(k: int) -> np.ndarray:
        return denoise_tv_bregman(arrays[k], weight=weights[k], max_num_iter=max_iter, eps=eps,
                                  channel_axis=None).reshape(h, w, c)

    with ThreadPoolExecutor(max(1, min(b, torch.get_num_threads()))) as pool:
        outs = list(pool.map(one, range(b)))
    return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).to(images.dtype)


class RedBlackSweep:
    """One red-black Gauss-Seidel sweep: red pixels ((row + col) even) from the old image, then
    black ones from the new red ones, each a Jacobi update restricted to its colour. The
    right-hand side uses the new ``d - b`` everywhere (with skimage's mix of old and new values
    the checkerboard ordering diverges at small weights). For `torch_tv(..., sweep=...)`."""

    def __init__(self, f: Tensor, wt: Tensor, lam: Tensor, norm: Tensor, grid: Tensor) -> None:
        h, w = f.shape[-2:]
        self.grid = grid
        self.half = grid.clone()  # same fixed border; its interior gets the red-updated image
        self.coupling = lam / norm
        self.data = wt * f / norm
        rows = torch.arange(h, device=f.device).view(-1, 1)
        cols = torch.arange(w, device=f.device).view(1, -1)
        red = (rows + cols) % 2 == 0
        self.red, self.black = red.to(f.dtype), (~red).to(f.dtype)  # lerp weights: exact 0 / 1
        self.base, self.acc, self.new = (torch.empty_like(f) for _ in range(3))

    def _relax(self, grid: Tensor) -> Tensor:
        """Jacobi update of every pixel from the image in `grid` (into self.new)."""
        _, up, down, left, right = _neighbours(grid)
        torch.add(up, down, out=self.acc).add_(left).add_(right)
        return torch.addcmul(self.base, self.acc, self.coupling, out=self.new)

    def __call__(self, p_pad: Tensor, q_pad: Tensor) -> Tensor:
        div = torch.sub(p_pad[..., :-1], p_pad[..., 1:], out=self.acc)
        div.add_(q_pad[..., :-1, :]).sub_(q_pad[..., 1:, :])
        torch.addcmul(self.data, div, self.coupling, out=self.base)
        half = self.half[..., 1:-1, 1:-1]
        torch.lerp(self.grid[..., 1:-1, 1:-1], self._relax(self.grid), self.red, out=half)
        return half.lerp_(self._relax(self.half), self.black)


def red_black(images: Tensor, weight, max_iter: int = 100, eps: float = 1e-3) -> Tensor:
    """Split-Bregman TV with the red-black sweep, whole batch at once (float32)."""
    wt = torch.as_tensor(weight, dtype=torch.float32, device=images.device)
    wt = wt.expand(len(images)).reshape(-1, 1, 1, 1)
    return torch_tv(images.float(), wt, max_iter, eps, True, sweep=RedBlackSweep
                    ).to(images.dtype)


# label: (a function of (images, weights), the images' dtype); None: skimage, image by image
VARIANTS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], torch.dtype] | None] = {
    "skimage serial": None,
    "skimage pool": (skimage_pool, torch.float32),
    "torch exact": (lambda x, w: tv_bregman(x, w, backend="torch"), torch.float32),
    "torch fast": (red_black, torch.float32),
    "numba f32": (lambda x, w: tv_bregman(x, w, backend="numba"), torch.float32),
    "numba f64": (lambda x, w: tv_bregman(x, w, backend="numba"), torch.float64),
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
        fn, dtype = VARIANTS[label]
        xs = x.to(dtype)
        return lambda: [fn(xs[s:s + batch], w[s:s + batch]) for s in range(0, n, batch)]

    for label in labels:  # warm-up: JIT compile (or cache load), thread pools, allocator
        if VARIANTS[label] is not None:
            fn, dtype = VARIANTS[label]
            fn(x[:2, :, :16, :16].to(dtype), torch.tensor([0.1, 0.1], dtype=torch.float64))
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

"""TV-Bregman on CUDA (issue 24, "fewer launches"): the torch backend's iterations launched one
kernel at a time against the same iterations replayed as CUDA graphs (`torch_tv(graphs=...)`,
the library's default on CUDA), side by side, and both against scikit-image's call.

Usage: python benchmarks/tv_gpu.py [--batch 10 --batch 64] [--size 227] [--repeats 15]

Inputs as `benchmarks/tv.py`: noisy photos from scikit-image's samples (N(0, 12^2) noise,
0..255), weights spread geometrically from 0.01 to 2 (the render schedules' range), max_iter
100, eps 1e-3, float32. Each call is timed alone (device synchronized before and after), the
two variants alternating, after two warm-up calls each; the table shows the median ms per call
and per image. Every graphed call captures its own graph (nothing is kept between calls), so
the capture's cost is inside its time. Agreement: the largest |difference| between the two
variants' outputs over the batch, and the mean |difference| of each against
`skimage.restoration.denoise_tv_bregman` on the first three images (grey levels).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch
from skimage.restoration import denoise_tv_bregman

from mfv.render.tv.sweep import torch_tv
from tv import noisy_photos

MAX_ITER, EPS = 100, 1e-3


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="time the plain loop in both columns (a check of this script "
                             "where there is no CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"# benchmarks/tv_gpu.py: {device} ({gpu}), torch {torch.__version__}, "
          f"{args.size}x{args.size}x3, max_iter {MAX_ITER}, eps {EPS}, median of "
          f"{args.repeats} calls each")
    print(f"{'batch':>5s} {'plain ms':>9s} {'graphs ms':>10s} {'speed-up':>9s} "
          f"{'ms/img':>7s} {'max |g-p|':>10s} {'vs skimage p/g':>15s}")
    for batch in args.batch or [10, 64]:
        imgs = noisy_photos(batch, args.size, noise=12.0)
        weights = np.geomspace(0.01, 2.0, batch)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().contiguous().to(device)
        wt = torch.from_numpy(weights).float().view(-1, 1, 1, 1).to(device)
        variants = {name: functools.partial(torch_tv, x, wt, MAX_ITER, EPS, True, graphs=flag)
                    for name, flag in (("plain", False), ("graphs", args.graphs))}
        for fn in variants.values():  # warm-up: cuFFT plans, the allocator, the first capture
            fn(), fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, sync))
        plain, graphs = (statistics.median(times[n]) for n in ("plain", "graphs"))
        out = {name: fn().cpu().numpy() for name, fn in variants.items()}
        gap = float(np.abs(out["graphs"] - out["plain"]).max())
        refs = [denoise_tv_bregman(imgs[k], weight=weights[k], max_num_iter=MAX_ITER, eps=EPS,
                                   channel_axis=None) for k in range(min(3, batch))]
        vs = [np.mean([np.abs(out[n][k].transpose(1, 2, 0) - refs[k]).mean()
                       for k in range(len(refs))]) for n in ("plain", "graphs")]
        print(f"{batch:5d} {plain * 1e3:9.2f} {graphs * 1e3:10.2f} {plain / graphs:9.2f} "
              f"{graphs / batch * 1e3:7.3f} {gap:10.2e} {vs[0]:7.4f}/{vs[1]:.4f}", flush=True)


if __name__ == "__main__":
    main()

"""Lite0's stride-2 convolutions without a padded copy (`SameConv2d`): the forward+backward of a
batch with the copy-free path against the padded copy, alternated, and their outputs compared.

Usage: python benchmarks/same_conv.py [--batch 10] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from mfv.models import load_model
from mfv.models.efficientnet_lite import SameConv2d
from mfv.models.passes import prepared
from mfv.render.batch import RenderOptions


def padded_copy(conv: SameConv2d, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """SAME padding as a padded copy of the input whenever it is uneven (the reference)."""
    pads = []
    for size, k, s in zip(reversed(x.shape[-2:]), reversed(conv.kernel_size),
                          reversed(conv.stride), strict=True):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    if pads[0] == pads[1] and pads[2] == pads[3]:
        return F.conv2d(x, weight, bias, conv.stride, (pads[2], pads[0]), 1, conv.groups)
    return F.conv2d(F.pad(x, pads), weight, bias, conv.stride, 0, 1, conv.groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    model = load_model("efficientnet_lite0")
    x = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 255
    variants = {"padded copy": padded_copy, "copy-free": SameConv2d._conv_forward}

    def step(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        SameConv2d._conv_forward = variants[name]
        xx = x.clone().requires_grad_(True)
        out = model(xx / 255.0)
        out[:, 1].sum().backward()
        return out.detach(), xx.grad

    try:
        with prepared(model, RenderOptions().forward(model.device)):
            (o1, g1), (o2, g2) = step("padded copy"), step("copy-free")
            times: dict[str, list[float]] = {name: [] for name in variants}
            for r in range(args.rounds):
                for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                    start = time.perf_counter()
                    step(name)
                    times[name].append(time.perf_counter() - start)
    finally:
        SameConv2d._conv_forward = variants["copy-free"]
    ratio = statistics.median(a / b for a, b in zip(times["copy-free"], times["padded copy"],
                                                    strict=True))
    print(f"# Lite0 forward+backward, batch {args.batch}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"outputs: max |difference| {(o1 - o2).abs().max().item():.3g}; input gradients: "
          f"relative difference {((g1 - g2).norm() / g1.norm()).item():.3g}")
    for name, values in times.items():
        print(f"{name:12s} {statistics.median(values) * 1e3:7.1f} ms (median of {args.rounds})")
    print(f"copy-free / padded copy: {ratio:.3f} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()

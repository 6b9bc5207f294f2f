"""Receptive fields: how much of the input a unit of a spatial layer sees.

Two sizes, both in input pixels:

* the theoretical field, from the kernels and strides of the convolutions and poolings up to the
  layer (`theoretical_rf`; exact for chain networks such as EfficientNet and VGG, where residual
  branches never widen the main path; an upper bound elsewhere);
* the effective field (Luo et al. 2016, `effective_rf`): the side of the centred square that
  holds a given share (90 %) of |d unit at the grid's centre / d input|, summed over colours and
  averaged over a few images. It is much smaller than the theoretical one in deep layers (the
  gradient falls off like a Gaussian), and it is what the patch facets crop
  (`mfv.facets.patches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mfv.models.activations import capture
from mfv.models.base import LoadedModel
from mfv.models.targets import LayerRef

ERF_MASS = 0.9  # share of the gradient inside the effective field
ERF_IMAGES = 4  # random images the gradient is averaged over


@dataclass(frozen=True)
class ReceptiveField:
    """A spatial layer's grid, its stride and its fields, in input pixels at `size`."""

    grid: tuple[int, int]
    stride: int
    theoretical: int
    effective: int | None = None  # None: not measured
    size: int = 0  # the input size the numbers hold for

    def side(self) -> int:
        """The field a crop uses: the effective one when measured, else the theoretical one,
        at most the input."""
        return min(self.effective or self.theoretical, self.size)


def _pair(value) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


def theoretical_rf(module: nn.Module, path: str) -> tuple[int, int]:
    """(field, stride) in input pixels of the module at `path`: every convolution and pooling
    registered before it (and inside it) grows the field by (kernel - 1) x dilation x the
    stride so far."""
    rf, jump, inside = 1, 1, False
    for name, m in module.named_modules():
        here = name == path or name.startswith(path + ".")
        if inside and not here:
            break
        inside = inside or here
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            dilation = _pair(getattr(m, "dilation", 1))
            rf += (_pair(m.kernel_size) - 1) * dilation * jump
            jump *= _pair(m.stride)
    return rf, jump


def random_images(model: LoadedModel, count: int = ERF_IMAGES, seed: int = 0,
                  size: int | None = None) -> torch.Tensor:
    """`count` seeded uniform-noise images in [0, 1] at the model's input size."""
    size = size or model.preprocess.input_size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=g).to(model.device)


def effective_rf(model: LoadedModel, refs: Sequence[LayerRef], images: torch.Tensor | None = None,
                 mass: float = ERF_MASS) -> dict[str, int | None]:
    """The effective field of each layer (by `LayerRef.key`): the side of the centred square
    holding `mass` of |d (sum of the layer's units at the grid's centre) / d input| (over
    `images`, default `random_images`); None for a layer that is not a spatial map. One
    forward pass, one backward pass per layer."""
    x = (images if images is not None else random_images(model)).detach().clone()
    x.requires_grad_(True)
    size_h, size_w = x.shape[-2:]
    out: dict[str, int | None] = {}
    with torch.enable_grad(), capture(model, refs, stop=True) as store:
        model(x)
        for i, ref in enumerate(refs):
            act = store[ref.key]
            if act.dim() != 4:
                out[ref.key] = None
                continue
            h, w = act.shape[-2:]
            (grad,) = torch.autograd.grad(act[:, :, h // 2, w // 2].sum(), x,
                                          retain_graph=i < len(refs) - 1)
            g = grad.abs().sum(1).mean(0)
            cy, cx = (h // 2 + 0.5) * size_h / h, (w // 2 + 0.5) * size_w / w
            yy = torch.arange(size_h, device=g.device) + 0.5
            xx = torch.arange(size_w, device=g.device) + 0.5
            dist = torch.maximum((yy[:, None] - cy).abs(), (xx[None] - cx).abs()).flatten()
            order = torch.argsort(dist)
            cum = torch.cumsum(g.flatten()[order].double(), 0)
            if float(cum[-1]) <= 0:  # a dead layer on these images: no gradient at all
                out[ref.key] = None
                continue
            at = int(torch.searchsorted(cum, mass * cum[-1]))
            side = 2 * float(dist[order][min(at, len(order) - 1)]) + 1  # pixels, not gaps
            out[ref.key] = max(1, min(round(side), max(size_h, size_w)))
    return out


def receptive_fields(model: LoadedModel, refs: Sequence[LayerRef], *, measure: bool = True,
                     images: torch.Tensor | None = None, mass: float = ERF_MASS
                     ) -> dict[str, ReceptiveField]:
    """Every spatial layer of `refs` (by key) with its grid, stride and fields; `measure`: also
    the effective field (`effective_rf`). Layers that are not spatial maps are left out."""
    size = model.preprocess.input_size
    shapes = {info.path: info.shape for info in model.layers()}
    spatial = [r for r in refs if not r.use_input and len(shapes.get(r.path, ())) == 3]
    effective = effective_rf(model, spatial, images, mass) if measure and spatial else {}
    out = {}
    for ref in spatial:
        rf, stride = theoretical_rf(model.module, ref.path)
        grid = tuple(shapes[ref.path][1:])
        out[ref.key] = ReceptiveField(grid, stride, rf, effective.get(ref.key), size)
    return out

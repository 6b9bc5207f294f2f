"""How a model's pass runs: memory layout, precision and batch-norm form — speed settings that
change results only by float rounding.

`Forward` and `prepared` serve the optimizers (a 0..255 batch, gradients through the pass);
`inference` serves every pass without gradients (scan, evaluate, embeddings): the layout that is
fastest on the device (`default_channels_last`), under `torch.inference_mode`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from mfv.errors import MfvError
from mfv.models.base import LoadedModel

PRECISIONS = ("float32", "bfloat16")  # what `Forward.precision` accepts


@dataclass(frozen=True)
class Forward:
    """How the model's own pass runs on a 0..255 batch: `precision` "float32", or "bfloat16"
    (autocast around the model only: on GPUs a ~2x faster pass; on CPUs without bf16 units a
    slower one); `channels_last` memory layout for the input; `affine_batchnorm`: eval-mode
    batch norms computed as the per-channel affine map they are (`x * s + t`, one fused
    multiply-add), whose backward is one multiplication (torch's CPU batch-norm backward is
    slow, in channels_last above all; with the multiply-add fused, Lite0's forward+backward at
    batch 8 takes ~0.9x the time of a separate multiply and add on 2 CPU cores).
    The model's side of the last two is `prepared`."""

    precision: str = "float32"
    channels_last: bool = False
    affine_batchnorm: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise MfvError(f"unknown precision {self.precision!r}; choose one of "
                           f"{', '.join(PRECISIONS)}")

    def __call__(self, model: LoadedModel, images: torch.Tensor) -> torch.Tensor:
        """The model's output for a (B, 3, S, S) batch in 0..255 (hooks see every layer)."""
        x = images / 255.0
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "float32":
            return model(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x)


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def prepared(model: LoadedModel, forward: Forward) -> Iterator[None]:
    """The model as `forward` runs it, inside the block; restored after. channels_last: its 4-D
    weights in that layout (so convolutions run on NHWC data end to end; a model already so is
    left as it is). affine_batchnorm: every eval-mode torch batch norm (exactly nn.BatchNorm1d /
    2d / 3d: subclasses may do more) runs as `x * s + t`, s = weight / sqrt(var + eps),
    t = bias - mean * s; hooks on it see the same output, to float rounding (measured on Lite0:
    its input gradient within 5e-7 of float64's, torch's own CPU batch norm within 3e-4)."""
    module = model.module
    tensors = [t for t in chain(module.parameters(), module.buffers()) if t.dim() == 4]
    relayout = forward.channels_last and not all(
        t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
    norms = [m for m in module.modules() if type(m) in _BATCHNORMS and not m.training
             and m.running_mean is not None and m.running_var is not None
             and "forward" not in m.__dict__] if forward.affine_batchnorm else []
    if relayout:
        module.to(memory_format=torch.channels_last)
    for norm in norms:
        norm.forward = _affine(norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward
        if relayout:
            module.to(memory_format=torch.contiguous_format)


def _affine(norm: nn.modules.batchnorm._BatchNorm):
    """An eval-mode batch norm's forward as the affine map it computes."""
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias

    def forward(x: torch.Tensor) -> torch.Tensor:  # one fused multiply-add
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))

    return forward


def default_channels_last(device: torch.device) -> bool:
    """channels_last by default on CUDA (the usual win for convolutions) and on the CPU (Lite0's
    forward+backward takes 0.75-0.9x the time of the standard layout on 2 cores,
    `benchmarks/sweep.py`); elsewhere (MPS, ...) the standard layout."""
    return device.type in ("cuda", "cpu")


@contextmanager
def laid_out(model: LoadedModel) -> Iterator[Forward]:
    """The model's weights in the device's layout (`default_channels_last`) inside the block,
    restored after: once around many passes, so that the `inference` passes inside it do not
    lay the weights out again each time."""
    layout = Forward(channels_last=default_channels_last(model.device))
    with prepared(model, layout):
        yield layout


@contextmanager
def inference(model: LoadedModel) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A no-gradient pass in the device's layout (`laid_out`): yields `forward(images)` for a
    [0, 1] batch (hooks see every layer as usual). On 2 CPU cores, with freed memory kept
    (`mfv.allocator`), Lite0's inference at batch 32 runs at the standard layout's speed
    (1.01x, `benchmarks/scan.py`); channels_last is the usual win on CUDA."""
    with laid_out(model) as layout, torch.inference_mode():

        def forward(images: torch.Tensor) -> torch.Tensor:
            if layout.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            return model(images)

        yield forward

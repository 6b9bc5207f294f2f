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
import torch.nn.functional as F
from torch import nn

from mfv.core.errors import MfvError
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
    batch 8 takes ~0.9x the time of a separate multiply and add on 2 CPU cores), or folded
    into the convolution that feeds it where the model declares the pair (another ~0.87x).
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
    its input gradient within 5e-7 of float64's, torch's own CPU batch norm within 3e-4).
    Where the model declares which convolutions feed a batch norm and nothing else
    (`conv_bn_pairs()`, as the built-in EfficientNet-Lite does), such a norm is folded into its
    convolution's weights and bias for every pass in which neither module has a hook (`_folded`);
    where it declares which activations read only a norm's output (`norm_act_pairs()`), such a
    ReLU / ReLU6 / Hardtanh runs in place, the same values without a new tensor, in every pass
    in which none of the three modules has a hook (`_in_place`).
    """
    module = model.module
    tensors = [t for t in chain(module.parameters(), module.buffers()) if t.dim() == 4]
    relayout = forward.channels_last and not all(
        t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
    norms = [m for m in module.modules() if type(m) in _BATCHNORMS and not m.training
             and m.running_mean is not None and m.running_var is not None
             and "forward" not in m.__dict__] if forward.affine_batchnorm else []
    eligible = {id(norm) for norm in norms}
    pairs = declared_pairs(module)
    folds = [(conv, norm) for conv, norm in pairs
             if id(norm) in eligible and isinstance(conv, nn.modules.conv._ConvNd)
             and "forward" not in conv.__dict__]
    convs = {id(norm): conv for conv, norm in pairs}
    acts = [(act, [act, norm, *([convs[id(norm)]] if id(norm) in convs else [])])
            for norm, act in declared_pairs(module, "norm_act_pairs")
            if id(norm) in eligible and type(act) in _IN_PLACE and "forward" not in act.__dict__]
    if relayout:
        module.to(memory_format=torch.channels_last)
    for norm in norms:
        norm.forward = _affine(norm)
    for conv, norm in folds:
        conv.forward, norm.forward = _folded(conv, norm, norm.forward)
    for act, watched in acts:
        act.forward = _in_place(act, watched)
    try:
        yield
    finally:
        for act, _ in acts:
            del act.forward
        for conv, _ in folds:
            del conv.forward
        for norm in norms:
            del norm.forward
        if relayout:
            module.to(memory_format=torch.contiguous_format)


def declared_pairs(module: nn.Module, kind: str = "conv_bn_pairs"
                   ) -> list[tuple[nn.Module, nn.Module]]:
    """The pairs a module declares through `conv_bn_pairs()` (convolution, batch norm: each
    convolution feeding only its norm, what `prepared` may fold) or `norm_act_pairs()` (batch
    norm, activation: each norm's output read only by its activation, which `prepared` may run
    in place); none if it declares none."""
    pairs = getattr(module, kind, None)
    return list(pairs()) if callable(pairs) else []


def _scale_shift(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm as the per-channel affine map it is: (s, t), y = x * s + t."""
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
    return scale, shift


def _affine(norm: nn.modules.batchnorm._BatchNorm):
    """An eval-mode batch norm's forward as the affine map it computes."""
    scale, shift = _scale_shift(norm)

    def forward(x: torch.Tensor) -> torch.Tensor:  # one fused multiply-add
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))

    return forward


def _folded(conv: nn.modules.conv._ConvNd, norm: nn.modules.batchnorm._BatchNorm,
            affine: Callable[[torch.Tensor], torch.Tensor]):
    """(conv's forward, norm's forward) for a convolution whose output only feeds `norm`: the
    convolution with weights w * s and bias b * s + t and the norm an identity — the same
    function, without the norm's pass over the activations and its backward — as long as
    neither module has a hook (one would see the convolution's output post-norm); a pass with
    a hook on either runs both as they are (`affine` for the norm)."""
    scale, shift = _scale_shift(norm)
    with torch.no_grad():
        weight = conv.weight * scale.view(-1, *(1,) * (conv.weight.dim() - 1))
        if conv.weight.dim() == 4 and conv.weight.is_contiguous(
                memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        bias = shift if conv.bias is None else conv.bias * scale + shift
    plain = type(conv).forward.__get__(conv)

    def conv_forward(x: torch.Tensor) -> torch.Tensor:
        return plain(x) if _hooked(conv, norm) else conv._conv_forward(x, weight, bias)

    def norm_forward(x: torch.Tensor) -> torch.Tensor:
        return affine(x) if _hooked(conv, norm) else x

    return conv_forward, norm_forward


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of the modules has a forward hook or pre-hook (a pass that must run them as
    they are, for a hook to see what they compute)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


_IN_PLACE = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # exactly these (subclasses may do more)


def _in_place(act: nn.Module, watched: list[nn.Module]):
    """An activation's forward that overwrites its input (`F.relu_`, `F.hardtanh_`) instead of
    writing a new map of the same size (memory and traffic the pass does not need; measured in
    benchmarks/results/steps-in-place.md), unless a module of `watched` (the activation, the
    norm it reads, that norm's convolution) has a hook: a hook may keep the tensor that would
    be overwritten, or read the activation's input."""
    plain = type(act).forward.__get__(act)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.is_leaf and x.requires_grad or _hooked(*watched):
            return plain(x)
        if isinstance(act, nn.ReLU):
            return F.relu_(x)
        return F.hardtanh_(x, act.min_val, act.max_val)

    return forward


def default_channels_last(device: torch.device) -> bool:
    """channels_last by default on CUDA (the usual win for convolutions) and on the CPU (Lite0's
    forward+backward takes 0.75-0.9x the time of the standard layout on 2 cores,
    `benchmarks/steps.py`); elsewhere (MPS, ...) the standard layout."""
    return device.type in ("cuda", "cpu")


@contextmanager
def laid_out(model: LoadedModel) -> Iterator[Forward]:
    """The model's weights in the device's layout (`default_channels_last`), its batch norms
    affine or folded (`prepared`), inside the block, restored after: once around many passes,
    so that the `inference` passes inside it do not prepare the model again each time."""
    layout = Forward(channels_last=default_channels_last(model.device), affine_batchnorm=True)
    with prepared(model, layout):
        yield layout


@contextmanager
def inference(model: LoadedModel) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A no-gradient pass in the device's layout (`laid_out`): yields `forward(images)` for a
    [0, 1] batch (hooks see every layer as usual). On 2 CPU cores, with freed memory kept
    (`mfv.core.allocator`), Lite0's inference at batch 32 in channels_last ran at the standard
    layout's speed (1.01x, `benchmarks/scan.py`) and 1.13x with symmetric padding done by the
    convolutions; channels_last is the usual win on CUDA."""
    with laid_out(model) as layout, torch.inference_mode():

        def forward(images: torch.Tensor) -> torch.Tensor:
            if layout.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            return model(images)

        yield forward

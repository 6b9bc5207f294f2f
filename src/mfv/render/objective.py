"""What every optimizer maximizes: per-sample objectives on a batch of images in 0..255.

Sample b of a batch maximizes `targets[assign[b]]`, so one batch can hold the facets of many
targets. Images live in the 0..255 RGB domain (the paper's: its step sizes and TV weights are in
grey levels); the model's own preprocessing runs inside the forward pass.

How that pass runs (`Forward`) is a speed setting, not part of the objective: the memory layout
(`channels_last`: the same values up to float rounding) and the precision (`"bfloat16"`: the
model's pass under autocast, the images, their gradients and everything computed from the
captured activations stay float32).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mfv.activations import TargetBank, capture
from mfv.errors import MfvError
from mfv.models import LoadedModel
from mfv.targets import LayerRef, Target

PRECISIONS = ("float32", "bfloat16")  # what `Forward.precision` accepts


@dataclass(frozen=True)
class Forward:
    """How the model's own pass runs on a 0..255 batch: `precision` "float32", or "bfloat16"
    (autocast around the model only: on GPUs a ~2x faster pass; on CPUs without bf16 units a
    slower one); `channels_last` memory layout for the input; `affine_batchnorm`: eval-mode
    batch norms computed as the per-channel affine map they are (`x * s + t`), whose backward
    is one multiplication (torch's CPU batch-norm backward is slow, in channels_last above all).
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

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    return forward


def as_float(store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Captured activations in float32 (a no-op for a float32 pass), so objectives are computed
    at full precision whatever the pass ran in."""
    return {k: v.float() if v.is_floating_point() else v for k, v in store.items()}


class Objective:
    """Per-sample objectives: sample b maximizes `targets[assign[b]]`.

    `kind="prob"` uses the softmax probability of the target's class (the center-bias recipe's
    first octaves); targets that are not a single class logit keep their own value.
    """

    def __init__(self, model: LoadedModel, targets: Sequence[Target], assign: Sequence[int],
                 forward: Forward | None = None):
        self.model = model
        self.forward = forward or Forward()
        self.bank = TargetBank(targets)
        device = model.device  # indices live there: no host-to-device copy per step
        self.assign = torch.as_tensor(list(assign), dtype=torch.long).to(device)
        classes = [targets[a].class_index for a in assign]
        self.class_of = torch.tensor([-1 if c is None else c for c in classes],
                                     dtype=torch.long).to(device)
        self.logits = LayerRef(model.logits_layer) if model.logits_layer else None
        self.layers = list(dict.fromkeys([*self.bank.layers, *([self.logits] if
                                          self.logits else [])]))

    def values(self, store: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Each sample's own target, from a captured batch (differentiable, float32)."""
        values = self.bank(as_float(store))
        rows = torch.arange(batch, device=values.device)
        return values[rows, self.assign.to(values.device)]

    def __call__(self, images: torch.Tensor, kind: str = "target") -> torch.Tensor:
        """Objective value per sample for a (B, 3, S, S) batch in 0..255 (differentiable)."""
        with capture(self.model, self.layers) as store:
            self.forward(self.model, images)
            value = self.values(store, len(images))
            if kind == "prob" and self.logits is not None:
                rows = torch.arange(len(images), device=value.device)
                class_of = self.class_of.to(value.device)
                probs = store[self.logits.key].float().softmax(-1)
                prob = probs[rows, class_of.clamp(min=0)]
                value = torch.where(class_of >= 0, prob, value)
        return value

    def tiled(self, count: int) -> Objective:
        """The same objectives for `count` views of every sample, view-major (row j·B + b is a
        view of sample b)."""
        tiled = copy.copy(self)
        tiled.assign = self.assign.repeat(count)
        tiled.class_of = self.class_of.repeat(count)
        return tiled

    def exact(self) -> Objective:
        """The same objectives with a float32 pass (what results report)."""
        if self.forward.precision == "float32":
            return self
        exact = copy.copy(self)
        exact.forward = replace(self.forward, precision="float32")
        return exact

    def maximize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what an optimizer ascends, the target's value): the same for a plain objective."""
        value = self(images)
        return value, value


@dataclass
class Rendered:
    """Final canvases (B, 3, H, W) in 0..255 and the objective traced at every step (B, steps);
    optionally a per-pixel importance map (B, H, W) in 0..1 (MACO's transparency)."""

    images: torch.Tensor
    trace: np.ndarray
    alpha: torch.Tensor | None = None


def central_box(height: int, width: int, size: int) -> tuple[slice, slice]:
    """Rows and columns of the central size×size window of a height×width canvas: the view the
    optimizers drive (crops of a larger canvas are centred on it on average) and on which
    activations are reported."""
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return slice(top, top + size), slice(left, left + size)


def central_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central window (`central_box`) of (..., H, W) images."""
    rows, cols = central_box(images.shape[-2], images.shape[-1], size)
    return images[..., rows, cols]


def measure(objective: Objective, images: torch.Tensor, whole: bool = False) -> np.ndarray:
    """The objective on what the optimizer drove: the central input-size crop of each canvas,
    or (`whole`, for recipes that see crops of every scale: MACO) the canvas resized to it."""
    size = objective.model.preprocess.input_size
    view = images.to(objective.model.device, torch.float32)
    if whole and view.shape[-1] != size:
        view = F.interpolate(view, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)
    else:
        view = central_crop(view, size)
    with torch.no_grad():
        return objective.exact()(view).float().cpu().numpy()

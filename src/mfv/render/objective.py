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
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from mfv.models import LoadedModel
from mfv.models.activations import TargetBank, capture
from mfv.models.passes import Forward
from mfv.models.targets import LayerRef, Target


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

"""What every optimizer maximizes: per-sample objectives on a batch of images in 0..255.

Sample b of a batch maximizes `targets[assign[b]]`, so one batch can hold the facets of many
targets. Images live in the 0..255 RGB domain (the paper's: its step sizes and TV weights are in
grey levels); the model's own preprocessing runs inside the forward pass.

How that pass runs (`Forward`) is a speed setting, not part of the objective: the memory layout
(`channels_last`: the same values up to float rounding) and the precision (`"bfloat16"`: the
model's pass under autocast, the images, their gradients and everything computed from the
captured activations stay float32).

A hidden unit's facets are crops around its peaks, shown (and coded) resized to the input size;
the unit saw them at their own size. Its pictures are painted on the same magnified canvas, and
the unit reads them as it read the crops: shrunk to the crop's side at the centre of a neutral
frame (`unit_view`), so a unit that sees 48 px is shown 48 px of picture, not a wallpaper of
48 px motifs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from mfv.core.errors import MfvError
from mfv.models import LoadedModel
from mfv.models.activations import TargetBank, capture
from mfv.models.passes import Forward
from mfv.models.targets import LayerRef, Target, resolve_layer


def as_float(store: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Captured activations in float32 (a no-op for a float32 pass), so objectives are computed
    at full precision whatever the pass ran in."""
    return {k: v.float() if v.is_floating_point() else v for k, v in store.items()}


class _Unread(MfvError):
    """A target function read a layer that was not captured."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the target function read layer {name!r}, which it did not read on "
                         "its first call; read the same layers on every call")
        self.name = name


class Activations:
    """A captured batch as a target function sees it: `acts[name]` is a layer's output, float32
    and differentiable (`name` a module path as `mfv layers` lists it, or `penultimate`, the
    classifier's input, or `logits`)."""

    def __init__(self, refs: dict[str, LayerRef], store: dict[str, torch.Tensor]) -> None:
        self.refs, self.store = refs, store

    def __getitem__(self, name: str) -> torch.Tensor:
        ref = self.refs.get(name)
        if ref is None or ref.key not in self.store:
            raise _Unread(name)
        return self.store[ref.key]


class FunctionTarget:
    """A target given as a function of the model's activations: `fn(acts)` returns one value per
    sample, (B,), from `acts` (`Activations`), as Lucent's objectives do. Only the layers it
    reads (`function_target` finds them) are captured."""

    class_index = None  # never a class logit: `kind="prob"` keeps its own value

    def __init__(self, fn: Callable[[Activations], torch.Tensor], refs: dict[str, LayerRef],
                 spec: str = "function") -> None:
        self.fn, self.refs, self.spec = fn, refs, spec

    @property
    def layers(self) -> list[LayerRef]:
        return list(self.refs.values())

    def __call__(self, store: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        value = self.fn(Activations(self.refs, store))
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise MfvError(f"a target function must return one value per sample, a tensor of "
                           f"shape ({batch},); got {shape}")
        return value.float()


def function_target(model: LoadedModel, fn: Callable[[Activations], torch.Tensor]
                    ) -> FunctionTarget:
    """`fn` as a target of `model`: called on a grey image, each layer it reads is captured on
    the next try, until it runs (names that are not layers of the model say which are)."""
    size = model.preprocess.input_size
    grey = torch.full((1, 3, size, size), 0.5, device=model.device)
    target = FunctionTarget(fn, {}, getattr(fn, "__name__", "function"))
    while True:
        with capture(model, target.layers) as store, torch.no_grad():
            model(grey)
            try:
                target(as_float(store), 1)
                return target
            except _Unread as unread:
                if unread.name in target.refs:
                    raise
                target.refs[unread.name] = resolve_layer(model, unread.name)


NEUTRAL = 127.5  # the grey a unit-scale view's frame is filled with (0..255)


def unit_view(images: torch.Tensor, sides: Sequence[int | None], size: int) -> torch.Tensor:
    """What a hidden unit sees of (B, 3, H, W) canvases in 0..255: each sample with a side is
    its central `size` window shrunk to side x side (antialiased, differentiable) and placed at
    the centre of a `size` x `size` frame of `NEUTRAL` grey; samples without one pass as they
    are (their central window)."""
    images = central_crop(images, size)
    if all(side is None for side in sides):
        return images
    out = images.clone()
    for side in sorted({s for s in sides if s is not None}):
        rows = [b for b, s in enumerate(sides) if s == side]
        index = torch.tensor(rows, device=images.device)
        small = F.interpolate(images.index_select(0, index), size=(side, side), mode="bilinear",
                              antialias=side < size, align_corners=False)
        frame = torch.full_like(images[:len(rows)], NEUTRAL)
        top = (size - side) // 2
        frame[:, :, top:top + side, top:top + side] = small
        out = out.index_copy(0, index, frame)
    return out


class Objective:
    """Per-sample objectives: sample b maximizes `targets[assign[b]]`, read on the canvas as it
    is or (`views[b]`, a side in px) at the unit's scale (`unit_view`).

    `kind="prob"` uses the softmax probability of the target's class (the center-bias recipe's
    first octaves); targets that are not a single class logit keep their own value.
    """

    def __init__(self, model: LoadedModel, targets: Sequence[Target | FunctionTarget],
                 assign: Sequence[int], forward: Forward | None = None,
                 views: Sequence[int | None] | None = None):
        self.model = model
        self.views = list(views) if views is not None else [None] * len(assign)
        if len(self.views) != len(assign):
            raise MfvError(f"got {len(self.views)} views for {len(assign)} samples")
        self.forward = forward or Forward()
        self.targets = list(targets)
        self.bank = TargetBank([t for t in targets if isinstance(t, Target)])
        functions = [t for t in targets if isinstance(t, FunctionTarget)]
        device = model.device  # indices live there: no host-to-device copy per step
        self.assign = torch.as_tensor(list(assign), dtype=torch.long).to(device)
        classes = [targets[a].class_index for a in assign]
        self.class_of = torch.tensor([-1 if c is None else c for c in classes],
                                     dtype=torch.long).to(device)
        self.logits = LayerRef(model.logits_layer) if model.logits_layer else None
        self.layers = list(dict.fromkeys([*self.bank.layers, *(r for f in functions
                                                               for r in f.layers)]))

    def values(self, store: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Each sample's own target, from a captured batch (differentiable, float32)."""
        values = self._table(as_float(store), batch)
        rows = torch.arange(batch, device=values.device)
        return values[rows, self.assign.to(values.device)]

    def _table(self, store: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Every target's value for every sample, (B, T)."""
        if len(self.bank.targets) == len(self.targets):
            return self.bank(store)
        bank = iter(self.bank(store).unbind(1) if self.bank.targets else ())
        return torch.stack([t(store, batch) if isinstance(t, FunctionTarget) else next(bank)
                            for t in self.targets], dim=1)

    @property
    def at_unit_scale(self) -> bool:
        """Whether some sample's target reads its canvas at a unit's scale (`unit_view`)."""
        return any(side is not None for side in self.views)

    def viewed(self, images: torch.Tensor) -> torch.Tensor:
        """A (B, 3, S, S) batch as the samples' targets read it (`unit_view`)."""
        if not self.at_unit_scale:
            return images
        return unit_view(images, self.views, self.model.preprocess.input_size)

    def __call__(self, images: torch.Tensor, kind: str = "target") -> torch.Tensor:
        """Objective value per sample for a (B, 3, S, S) batch in 0..255 (differentiable)."""
        as_prob = kind == "prob" and self.logits is not None
        # the pass stops at the deepest layer read (benchmarks/results/truncated-pass.md)
        with capture(self.model, [*self.layers, *([self.logits] if as_prob else [])],
                     stop=True) as store:
            self.forward(self.model, self.viewed(images))
            value = self.values(store, len(images))
            if as_prob:
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
        tiled.views = self.views * count
        return tiled

    def exact(self) -> Objective:
        """The same objectives with a float32 pass (what results report)."""
        if self.forward.precision == "float32":
            return self
        exact = copy.copy(self)
        exact.forward = replace(self.forward, precision="float32")
        return exact

    def maximize(self, images: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(what an optimizer ascends, the target's value) at optimization step `step`: the
        same for a plain objective."""
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

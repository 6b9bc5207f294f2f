"""Reading activations: hooks that capture layers during a forward pass, the spatial or token
reductions that turn a unit's map into one number, and `TargetBank`, which evaluates many
targets at once.

What a target *is* (its grammar, its layers and units) lives in `mfv.models.targets`; this module is
how its value is computed from a captured batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mfv.core.errors import MfvError
from mfv.models.base import LoadedModel
from mfv.models.targets import LayerRef, Target


def reduce_layer(activation: torch.Tensor, reduction: str) -> torch.Tensor:
    """Every unit of a layer reduced to one value per sample: (B, units)."""
    if activation.dim() == 2:
        return activation
    if activation.dim() == 3:  # tokens (B, N, C)
        if reduction == "center":
            return activation[:, activation.shape[1] // 2]
        if reduction == "cls":
            return activation[:, 0]
        return activation.amax(1) if reduction == "max" else activation.mean(1)
    if activation.dim() == 4:
        if reduction in ("center", "cls"):
            return activation[:, :, activation.shape[2] // 2, activation.shape[3] // 2]
        flat = activation.flatten(2)
        return flat.amax(2) if reduction == "max" else flat.mean(2)
    raise MfvError(f"cannot address units of an activation of shape {tuple(activation.shape)}")


def reduce_unit(activation: torch.Tensor, unit: int, reduction: str) -> torch.Tensor:
    """One value per sample from a (B, C), (B, N, C) or (B, C, H, W) activation: `reduce_layer`
    on that unit alone (sliced first, so only it is reduced)."""
    if activation.dim() in (2, 3, 4):
        activation = activation.narrow(2 if activation.dim() == 3 else 1, unit, 1)
    return reduce_layer(activation, reduction)[:, 0]


def target_value(target: Target, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """One target's value for each sample of a captured batch, shape (B,)."""
    total = None
    for term in target.terms:
        value = term.weight * reduce_unit(store[term.layer.key], term.unit, target.reduction)
        total = value if total is None else total + value
    return total


class TargetBank:
    """Many targets evaluated at once: per layer, reduced units times a weight matrix.

    Scanning all 1000 logits or every channel of a layer costs one matrix product per layer,
    not one Python call per target.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self._groups: dict[tuple[LayerRef, str], list[tuple[int, int, float]]] = {}
        for t_index, target in enumerate(self.targets):
            for term in target.terms:
                key = (term.layer, target.reduction)
                self._groups.setdefault(key, []).append((t_index, term.unit, term.weight))
        self._weights: dict = {}

    @property
    def layers(self) -> list[LayerRef]:
        return list(dict.fromkeys(ref for ref, _ in self._groups))

    def _matrix(self, key, units: int, like: torch.Tensor) -> torch.Tensor:
        cache_key = (key, units, like.device, like.dtype)
        if cache_key not in self._weights:
            w = torch.zeros(len(self.targets), units, dtype=like.dtype)
            for t_index, unit, weight in self._groups[key]:
                w[t_index, unit] += weight
            self._weights[cache_key] = w.to(like.device)
        return self._weights[cache_key]

    def __call__(self, store: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values of every target for every sample: (B, T)."""
        total = None
        for key in self._groups:
            ref, reduction = key
            reduced = reduce_layer(store[ref.key], reduction)
            part = reduced @ self._matrix(key, reduced.shape[1], reduced).T
            total = part if total is None else total + part
        return total


@contextmanager
def capture(model: LoadedModel | nn.Module, layers: Sequence[LayerRef]
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the given layers' activations during forward passes inside the block, keyed by
    `LayerRef.key`. The hooks are removed when the block ends, normally or by an exception."""
    module = model.module if isinstance(model, LoadedModel) else model
    named = dict(module.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(ref: LayerRef):
        activation = named[ref.post_activation] if ref.post_activation else None

        def hook(_module, inputs, output):
            value = inputs[0] if ref.use_input else output
            store[ref.key] = activation(value) if activation is not None else value
        return hook

    try:
        for ref in dict.fromkeys(layers):
            handles.append(named[ref.path].register_forward_hook(hook_for(ref)))
        yield store
    finally:
        for handle in handles:
            handle.remove()

"""Reading activations: hooks that capture layers during a forward pass, the spatial or token
reductions that turn a unit's map into one number, and `TargetBank`, which evaluates many
targets at once.

What a target *is* (its grammar, its layers and units) lives in `mfv.models.targets`; this module is
how its value is computed from a captured batch.
"""

from __future__ import annotations

from collections import Counter
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
    if target.sum_mode == "maps":
        return TargetBank([target])(store)[:, 0]
    total = None
    for term in target.terms:
        value = term.weight * reduce_unit(store[term.layer.key], term.unit, target.reduction)
        total = value if total is None else total + value
    return total


def combined_maps(activation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sums of a layer's unit maps, one per row of `weights` (T, C): (B, T, H, W)
    from (B, C, H, W), (B, N, T) from tokens (B, N, C), (B, T) from (B, C)."""
    if activation.dim() == 3:
        return activation @ weights.T
    units = weights.abs().argmax(1)
    scale = weights.gather(1, units[:, None])[:, 0]
    if activation.dim() == 4 and bool(((weights != 0).sum(1) == 1).all()):  # one unit each
        return activation.index_select(1, units) * scale.view(1, -1, 1, 1)
    return torch.einsum("bc...,tc->bt...", activation, weights)


def first_layer_map(target: Target, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weighted sum of a target's terms on its first layer (`combined_maps`): (B, H, W) for
    a spatial map, (B, N) for tokens, (B,) for a vector; what the scan's peaks and the patches'
    firing centres are read on."""
    first = target.terms[0].layer
    act = store[first.key]
    weights = act.new_zeros(1, act.shape[-1 if act.dim() == 3 else 1])
    for term in target.terms:
        if term.layer == first:
            weights[0, term.unit] += term.weight
    return combined_maps(act, weights)[:, 0]


def peak_cells(maps: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, T, 2) the (row, column) where each (B, T, H, W) map is read: its centre for the
    `center` reduction, else where it is largest (first such cell)."""
    b, t, h, w = maps.shape
    if reduction in ("center", "cls"):
        flat = torch.full((b, t), (h // 2) * w + w // 2, dtype=torch.long, device=maps.device)
    else:
        flat = maps.flatten(2).argmax(2)
    return torch.stack([flat // w, flat % w], dim=2)


class TargetBank:
    """Many targets evaluated at once: per layer, reduced units times a weight matrix.

    Scanning all 1000 logits or every channel of a layer costs one matrix product per layer,
    not one Python call per target. A `maps` sum (`mfv.models.targets.SUMS`) first combines its
    layer's maps with its weights, then reduces the combined map once.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self._groups: dict[tuple[LayerRef, str, bool], list[tuple[int, int, float]]] = {}
        self._peaks: dict[tuple[LayerRef, str], list[tuple[int, int, float]]] = {}
        for t_index, target in enumerate(self.targets):
            first = target.terms[0].layer
            for term in target.terms:
                key = (term.layer, target.reduction, target.sum_mode == "maps")
                self._groups.setdefault(key, []).append((t_index, term.unit, term.weight))
                if term.layer == first:
                    self._peaks.setdefault((first, target.reduction), []).append(
                        (t_index, term.unit, term.weight))
        self._weights: dict = {}

    @property
    def layers(self) -> list[LayerRef]:
        return list(dict.fromkeys(ref for ref, *_ in self._groups))

    def _matrix(self, key, entries, units: int, like: torch.Tensor, compact: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of a group's terms, (T, units) (`compact`: only the group's targets, as
        rows) and the target index of each row."""
        cache_key = (key, compact, units, like.device, like.dtype)
        if cache_key not in self._weights:
            rows = list(dict.fromkeys(t for t, _, _ in entries)) if compact else \
                list(range(len(self.targets)))
            where = {t: i for i, t in enumerate(rows)}
            w = torch.zeros(len(rows), units, dtype=like.dtype)
            for t_index, unit, weight in entries:
                w[where[t_index], unit] += weight
            self._weights[cache_key] = (w.to(like.device),
                                        torch.tensor(rows, device=like.device))
        return self._weights[cache_key]

    def __call__(self, store: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values of every target for every sample: (B, T)."""
        total = None
        for key, entries in self._groups.items():
            ref, reduction, maps = key
            act = store[ref.key]
            if maps and act.dim() > 2:  # combine the maps, then reduce once
                w, rows = self._matrix(key, entries, act.shape[-1 if act.dim() == 3 else 1],
                                       act, compact=True)
                reduced = reduce_layer(combined_maps(act, w), reduction)
                part = act.new_zeros(act.shape[0], len(self.targets)).index_add(1, rows,
                                                                                 reduced)
            else:
                reduced = reduce_layer(act, reduction)
                part = reduced @ self._matrix(key, entries, reduced.shape[1], reduced,
                                              compact=False)[0].T
            total = part if total is None else total + part
        return total

    def peaks(self, store: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
        """Where each target peaks on each sample: (B, T, 2) (row, column) in its grid, -1
        for a target whose first term's layer is not a spatial map, and each target's grid
        (H, W) or None. The map is the weighted sum of the target's terms on that layer
        (`combined_maps`); the place is its centre for `center`, else its argmax."""
        batch = next(iter(store.values())).shape[0]
        device = next(iter(store.values())).device
        out = torch.full((batch, len(self.targets), 2), -1, dtype=torch.long, device=device)
        grids: list = [None] * len(self.targets)
        for key, entries in self._peaks.items():
            ref, reduction = key
            act = store[ref.key]
            if act.dim() != 4:
                continue
            w, rows = self._matrix(("peak", *key), entries, act.shape[1], act, compact=True)
            out[:, rows] = peak_cells(combined_maps(act.detach(), w), reduction)
            for t in rows.tolist():
                grids[t] = (int(act.shape[2]), int(act.shape[3]))
        return out, grids


class _Produced(Exception):
    """Raised by a capturing hook when every layer the open captures wait for is produced."""


class _Captures:
    """The captures open on one network (kept on its root module while any is open): the layers
    each waits for and whether it lets the pass stop there. While every open capture does, and
    every layer they wait for is known to run once a pass (`calls`, counted on full passes: a
    module called twice, as a shared ReLU, is read at its last call), the root's forward ends
    (returns None) as soon as the last of their layers is produced."""

    ATTRIBUTE = "_mfv_captures"

    def __init__(self, module: nn.Module, calls: dict[str, int]) -> None:
        self.module, self.forward, self.calls = module, module.forward, calls
        self.previous = module.__dict__.get("forward")  # an instance's own forward, if any
        self.open: list[tuple[frozenset[str], bool]] = []
        self.pending: Counter[str] = Counter()  # hooks still to fire a pass, per layer
        self.counted: Counter[tuple[int, str]] = Counter()  # calls a pass, per capture and layer

    @classmethod
    def of(cls, module: nn.Module, calls: dict[str, int]) -> _Captures:
        found = module.__dict__.get(cls.ATTRIBUTE)
        if found is None:
            found = cls(module, calls)
            module.__dict__[cls.ATTRIBUTE] = found
            module.__dict__["forward"] = found.run  # nn.Module calls the instance's forward
        return found

    def run(self, *args, **kwargs):
        keys = set().union(*(keys for keys, _ in self.open))
        stop = all(stops for _, stops in self.open) and all(
            self.calls.get(key) == 1 for key in keys)
        waiting = Counter(key for keys_, _ in self.open for key in keys_)
        self.pending, self.counted = (waiting if stop else Counter()), Counter()
        try:
            out = self.forward(*args, **kwargs)
        except _Produced:
            return None
        finally:
            self.pending = Counter()
        for key in keys:  # a full pass: how often each layer ran in it
            self.calls[key] = max((n for (_, k), n in self.counted.items() if k == key),
                                  default=0)
        return out

    def produced(self, entry: tuple[frozenset[str], bool], key: str) -> None:
        self.counted[id(entry), key] += 1
        if self.pending[key] > 0:  # every open capture's hook on the layer must see it
            self.pending[key] -= 1
            if not +self.pending:
                raise _Produced

    def close(self, entry: tuple[frozenset[str], bool]) -> None:
        self.open.remove(entry)
        if not self.open:
            del self.module.__dict__[self.ATTRIBUTE]
            if self.previous is None:
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = self.previous


@contextmanager
def capture(model: LoadedModel | nn.Module, layers: Sequence[LayerRef], *, stop: bool = False
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the given layers' activations during forward passes inside the block, keyed by
    `LayerRef.key`. The hooks are removed when the block ends, normally or by an exception.

    `stop=True`: a pass ends once these layers are produced (the model then returns None), so
    nothing after the deepest of them is computed: reading an early layer costs a fraction of
    the network. It runs to the end while another capture without `stop` is open on the same
    network, and until a full pass has shown that each of the layers runs once a pass."""
    module = model.module if isinstance(model, LoadedModel) else model
    calls = model._cache.setdefault("calls_per_pass", {}) if isinstance(model, LoadedModel) \
        else {}
    named = dict(module.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []
    refs = list(dict.fromkeys(layers))
    captures = _Captures.of(module, calls)
    # a hook on the root itself runs after its forward: such a pass cannot stop early
    entry = (frozenset(ref.key for ref in refs), stop and all(ref.path for ref in refs))
    captures.open.append(entry)

    def hook_for(ref: LayerRef):
        activation = named[ref.post_activation] if ref.post_activation else None

        def hook(_module, inputs, output):
            value = inputs[0] if ref.use_input else output
            store[ref.key] = activation(value) if activation is not None else value
            captures.produced(entry, ref.key)
        return hook

    try:
        for ref in refs:
            handles.append(named[ref.path].register_forward_hook(hook_for(ref)))
        yield store
    finally:
        for handle in handles:
            handle.remove()
        captures.close(entry)

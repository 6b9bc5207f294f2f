"""Neurons as objectives: parse `LAYER:UNIT` expressions, capture activations with hooks.

A target is a weighted sum of units, `"_fc:0 + _fc:701"`, `"_fc:1 - 0.5*_fc:2"`, or a class name
(`"bell pepper"` → the model's logit for that class). Spatial maps (B, C, H, W) and token maps
(B, N, C) reduce to one number per image by a policy: `center` (the paper: the unit at the
central position), `max` or `mean` (and `cls`, token 0, for transformers).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mfv.errors import MfvError
from mfv.models.base import LoadedModel, units_of

REDUCTIONS = ("center", "max", "mean", "cls")
ALIASES = ("logits", "penultimate")
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardsigmoid)
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


@dataclass(frozen=True)
class LayerRef:
    """A place to read activations: a module's output, or its input (`penultimate`)."""

    path: str
    use_input: bool = False
    post_activation: str | None = None  # path of an activation module applied to the output

    @property
    def key(self) -> str:
        return f"{self.path}#in" if self.use_input else self.path


@dataclass(frozen=True)
class Term:
    weight: float
    layer: LayerRef
    unit: int


@dataclass(frozen=True)
class Target:
    """A weighted sum of units, with the spatial reduction policy and its original spelling."""

    spec: str
    terms: tuple[Term, ...]
    reduction: str = "center"
    class_index: int | None = None  # set when the target is one logit of a classifier
    _logit_units: tuple[int, ...] = ()  # positively weighted logits, when all terms are logits

    @property
    def layers(self) -> list[LayerRef]:
        return list(dict.fromkeys(t.layer for t in self.terms))

    @property
    def classes(self) -> tuple[int, ...]:
        """Classes whose images drive this target: its positively weighted logits (empty unless
        every term is a class logit), e.g. (0, 701) for "_fc:0 + _fc:701"."""
        if self.class_index is not None:
            return (self.class_index,)
        return self._logit_units

    def to_dict(self) -> dict:
        return {"spec": self.spec, "reduction": self.reduction, "class_index": self.class_index,
                "terms": [{"weight": t.weight, "layer": t.layer.key, "unit": t.unit}
                          for t in self.terms]}


def reduce_unit(activation: torch.Tensor, unit: int, reduction: str) -> torch.Tensor:
    """One value per sample from a (B, C), (B, N, C) or (B, C, H, W) activation: `reduce_layer`
    on that unit alone (sliced first, so only it is reduced)."""
    if activation.dim() in (2, 3, 4):
        activation = activation.narrow(2 if activation.dim() == 3 else 1, unit, 1)
    return reduce_layer(activation, reduction)[:, 0]


def evaluate(target: Target, activations: dict[str, torch.Tensor]) -> torch.Tensor:
    """The target's value for each sample of a captured batch, shape (B,)."""
    total = None
    for term in target.terms:
        value = term.weight * reduce_unit(activations[term.layer.key], term.unit, target.reduction)
        total = value if total is None else total + value
    return total


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

    def __call__(self, activations: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values of every target for every sample: (B, T)."""
        total = None
        for key in self._groups:
            ref, reduction = key
            reduced = reduce_layer(activations[ref.key], reduction)
            part = reduced @ self._matrix(key, reduced.shape[1], reduced).T
            total = part if total is None else total + part
        return total


def evaluate_all(targets: Sequence[Target], activations: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every target on every sample, shape (B, T)."""
    return TargetBank(targets)(activations)


@contextmanager
def capture(model: LoadedModel | nn.Module, layers: Sequence[LayerRef]
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Record the given layers' activations during forward passes inside the block.

    The hooks are removed when the block ends, normally or by an exception.
    """
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


def _closest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if name.split(".")[0] in n][:5] or list(names[:5])
    return ", ".join(close)


def resolve_layer(model: LoadedModel, path: str, activation: str = "pre") -> LayerRef:
    """Turn a module path or alias into a LayerRef; unknown names list the closest valid ones."""
    modules = model.modules()
    if path in ALIASES:
        if model.logits_layer is None:
            raise MfvError(f"model {model.name} has no classifier layer, so {path!r} is "
                           "undefined; address a layer by its module path (see `mfv layers`)")
        return LayerRef(model.logits_layer, use_input=(path == "penultimate"))
    if path not in modules:
        raise MfvError(f"model {model.name} has no layer {path!r}; closest: "
                       f"{_closest(path, list(modules))} (see `mfv layers {model.name}`)")
    if activation == "post" and not isinstance(modules[path], _ACTIVATIONS):
        follower = _next_activation(model.module, path)
        if follower is None:
            raise MfvError(f"no activation module directly follows {path!r}; "
                           "use activation='pre' or address the activation layer itself")
        return LayerRef(path, post_activation=follower)
    return LayerRef(path)


def _next_activation(module: nn.Module, path: str) -> str | None:
    """The activation module registered right after `path` in the same parent, if any."""
    parent_path, _, _ = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    names = list(parent._modules)
    local = path.rpartition(".")[2]
    i = names.index(local)
    if i + 1 < len(names) and isinstance(parent._modules[names[i + 1]], _ACTIVATIONS):
        return f"{parent_path}.{names[i + 1]}" if parent_path else names[i + 1]
    return None


def _parse_term(text: str, model: LoadedModel, activation: str) -> tuple[float, LayerRef, int,
                                                                      int | None]:
    weight = 1.0
    m = re.fullmatch(rf"({_NUMBER})\s*\*\s*(.+)", text) or None
    if m:
        weight, text = float(m.group(1)), m.group(2).strip()
    else:
        m = re.fullmatch(rf"(.+?)\s*\*\s*({_NUMBER})", text)
        if m:
            text, weight = m.group(1).strip(), float(m.group(2))
    text = text.strip().strip("\"'")
    m = re.fullmatch(r"(.+):(-?\d+)", text)
    if m:
        ref = resolve_layer(model, m.group(1), activation)
        unit = int(m.group(2))
        class_index = unit if ref.path == model.logits_layer and not ref.use_input else None
        return weight, ref, unit, class_index
    if model.classes is None or model.logits_layer is None:
        raise MfvError(f"{text!r} is not LAYER:UNIT, and model {model.name} has no class names "
                       "to look it up in")
    index = model.classes.resolve(text)
    return weight, LayerRef(model.logits_layer), index, index


def parse_target(spec: str, model: LoadedModel, reduction: str = "center",
                 activation: str = "pre") -> Target:
    """Parse `"_blocks.10:37"`, `"bell pepper"`, `"_fc:0 + _fc:701"`, `"_fc:1 - 0.5*_fc:2"`.

    Binary `+`/`-` need spaces around them, so hyphenated class names stay whole.
    """
    if reduction not in REDUCTIONS:
        raise MfvError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    text = spec.strip()
    if not text:
        raise MfvError("empty target; write LAYER:UNIT, a class name, or a sum such as "
                       "'_fc:0 + _fc:701'")
    sign = 1.0
    if text[0] in "+-" and not re.match(rf"[+-]{_NUMBER}\s*$", text):
        sign, text = (-1.0 if text[0] == "-" else 1.0), text[1:].strip()
    pieces = re.split(r"\s+([+-])\s+", text)
    signs = [sign] + [1.0 if s == "+" else -1.0 for s in pieces[1::2]]
    terms, classes = [], []
    shapes = None
    for s, piece in zip(signs, pieces[0::2], strict=True):
        weight, ref, unit, class_index = _parse_term(piece, model, activation)
        if shapes is None:
            shapes = {info.path: info.units for info in model.layers()}
        units = _units(model, ref, shapes)
        if not 0 <= unit < units:
            raise MfvError(f"unit {unit} is out of range for layer {ref.key.replace('#in', '')}"
                           f" of {model.name}: valid units are 0..{units - 1}")
        terms.append(Term(s * weight, ref, unit))
        classes.append(class_index)
    single_class = classes[0] if len(terms) == 1 and terms[0].weight > 0 else None
    logit_units = (tuple(c for c, t in zip(classes, terms, strict=True) if t.weight > 0)
                   if all(c is not None for c in classes) else ())
    return Target(spec.strip(), tuple(terms), reduction, single_class, logit_units)


def _units(model: LoadedModel, ref: LayerRef, shapes: dict[str, int]) -> int:
    if ref.use_input:
        layer = model.modules()[ref.path]
        if isinstance(layer, nn.Linear):
            return layer.in_features
        raise MfvError(f"cannot tell the input size of layer {ref.path!r}")
    return shapes[ref.path]


def parse_targets(specs: Sequence[str], model: LoadedModel, reduction: str = "center",
                  activation: str = "pre") -> list[Target]:
    """Parse several targets; `LAYER:*` expands to every unit of the layer."""
    targets = []
    for spec in specs:
        m = re.fullmatch(r"\s*(.+):\*\s*", spec)
        if m:
            ref = resolve_layer(model, m.group(1), activation)
            units = _units(model, ref, {i.path: i.units for i in model.layers()})
            targets += [parse_target(f"{m.group(1)}:{u}", model, reduction, activation)
                        for u in range(units)]
        else:
            targets.append(parse_target(spec, model, reduction, activation))
    return targets


__all__ = ["Target", "Term", "LayerRef", "TargetBank", "parse_target", "parse_targets", "capture",
           "evaluate", "evaluate_all", "reduce_unit", "reduce_layer", "resolve_layer", "units_of"]

"""Targets: what a neuron is, parsed from `LAYER:UNIT` expressions against a model.

A target is a weighted sum of units, `"_fc:0 + _fc:701"`, `"_fc:1 - 0.5*_fc:2"`, or a class name
(`"bell pepper"` → the model's logit for that class). Spatial maps (B, C, H, W) and token maps
(B, N, C) reduce to one number per image by a policy: `center` (the paper: the unit at the
central position), `max` or `mean` (and `cls`, token 0, for transformers). A sum of units of a
spatial layer reads in one of two ways (`SUMS`): `terms` (the default) reduces each term's map
on its own, then sums, so with `max` "A + B" is max(A) + max(B); `maps` sums the weighted maps
first and reduces the combined map once, max(A + B): a direction in the layer's space (Lucent's
`direction` objective), every term on one layer. Reading the values
(hooks, reductions) is `mfv.models.activations`; this module needs no torch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mfv.core.errors import MfvError

if TYPE_CHECKING:
    from mfv.models.base import LoadedModel

REDUCTIONS = ("center", "max", "mean", "cls")  # how a spatial or token map gives one number
ACTIVATIONS = ("pre", "post")  # a layer's output as is, or after the activation that follows it
ALIASES = ("logits", "penultimate")
SUMS = ("terms", "maps")  # reduce each term, then sum; or sum the maps, then reduce once
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


@dataclass(frozen=True)
class LayerRef:
    """A place to read activations: a module's output, or its input (`penultimate`)."""

    path: str
    use_input: bool = False
    post_activation: str | None = None  # path of an activation module applied to the output

    @property
    def key(self) -> str:
        """Where a captured batch stores this layer: unique per path, input/output, activation."""
        if self.use_input:
            return f"{self.path}#in"
        return f"{self.path}>{self.post_activation}" if self.post_activation else self.path


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
    sum_mode: str = "terms"  # `SUMS`: how the terms of a spatial sum combine

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
        doc = {"spec": self.spec, "reduction": self.reduction, "class_index": self.class_index,
               "terms": [{"weight": t.weight, "layer": t.layer.key, "unit": t.unit}
                         for t in self.terms]}
        return {**doc, "sum": self.sum_mode} if self.sum_mode != "terms" else doc


def _closest(name: str, names: Sequence[str]) -> str:
    """The five names most like `name` (difflib's similarity, best first)."""
    return ", ".join(difflib.get_close_matches(name, [n for n in names if n], n=5, cutoff=0.0))


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
    if activation not in ACTIVATIONS:
        raise MfvError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if activation == "post" and not model.is_activation(path):
        follower = model.next_activation(path)
        if follower is None:
            raise MfvError(f"no activation module directly follows {path!r}; "
                           "use activation='pre' or address the activation layer itself")
        return LayerRef(path, post_activation=follower)
    return LayerRef(path)


def _parse_term(text: str, model: LoadedModel, activation: str) -> tuple[float, LayerRef, int,
                                                                      int | None]:
    weight = 1.0
    m = re.fullmatch(rf"([+-]?{_NUMBER})\s*\*\s*(.+)", text) or None  # a signed weight too:
    if m:  # `_fc:0 + -0.5*_fc:1` reads as `_fc:0 - 0.5*_fc:1`
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
                 activation: str = "pre", sum_mode: str = "terms") -> Target:
    """Parse `"_blocks.10:37"`, `"bell pepper"`, `"_fc:0 + _fc:701"`, `"_fc:1 - 0.5*_fc:2"`.

    Binary `+`/`-` need spaces around them, so hyphenated class names stay whole. `sum_mode`
    says how the terms of a sum combine (`SUMS`).
    """
    if reduction not in REDUCTIONS:
        raise MfvError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if sum_mode not in SUMS:
        raise MfvError(f"unknown sum {sum_mode!r}; choose one of {', '.join(SUMS)}")
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
    if sum_mode == "maps" and len({t.layer for t in terms}) > 1:
        raise MfvError(f"--sum maps adds the terms' maps, so every term of {spec.strip()!r} "
                       "must be on one layer; use --sum terms for a sum across layers")
    return Target(spec.strip(), tuple(terms), reduction, single_class, logit_units,
                  sum_mode if len(terms) > 1 else "terms")


def _units(model: LoadedModel, ref: LayerRef, shapes: dict[str, int]) -> int:
    if ref.use_input:
        units = model.input_units(ref.path)
        if units is None:
            raise MfvError(f"cannot tell the input size of layer {ref.path!r}")
        return units
    return shapes[ref.path]


def parse_targets(specs: Sequence[str], model: LoadedModel, reduction: str = "center",
                  activation: str = "pre", sum_mode: str = "terms") -> list[Target]:
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
            targets.append(parse_target(spec, model, reduction, activation, sum_mode))
    return targets


def negated_spec(target: Target, logits_layer: str | None = None) -> str:
    """The spelling of −1 × `target` (what it shuns): each term's weight negated, e.g.
    "-1*_fc:0" or "-1*_blocks.2:5 + 0.5*_blocks.2:7"; it parses back (`parse_target`, with
    the same reduction, activation and sum) to the negation. Its top images are the target's
    least activating ones (exactly so for one term, or a sum of terms, whatever the
    reduction; `--sum maps` reduces the negated map, so with `max` it is −min)."""
    terms = []
    for t in target.terms:
        if t.layer.use_input and t.layer.path == logits_layer:
            layer = "penultimate"
        elif t.layer.use_input:
            raise MfvError(f"cannot spell the negation of {target.spec!r}: a term reads the "
                           f"input of {t.layer.path!r}")
        else:
            layer = t.layer.path
        terms.append(f"{-t.weight:g}*{layer}:{t.unit}")
    return " + ".join(terms)


def negation_pairs(targets: Sequence[Target], logits_layer: str | None = None
                   ) -> dict[int, int]:
    """Index of each target → index of its negation among `targets`, for targets whose
    negation comes after them (a negation is not paired again with its positive)."""
    where = {t.spec: i for i, t in enumerate(targets)}
    pairs: dict[int, int] = {}
    for i, target in enumerate(targets):
        try:
            j = where.get(negated_spec(target, logits_layer))
        except MfvError:
            continue
        if j is not None and j > i and i not in pairs.values():
            pairs[i] = j
    return pairs


__all__ = ["Target", "Term", "LayerRef", "parse_target", "parse_targets", "resolve_layer",
           "REDUCTIONS", "ACTIVATIONS", "SUMS", "negated_spec",
           "negation_pairs"]

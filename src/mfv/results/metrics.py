"""The metric registry: every number a run or a sweep reports, named, explained, formatted and
averaged in one place.

`METRICS` maps a metric's key in results.json (as `mfv.evaluate.evaluation` writes it, without
its view suffix `_central`) to a `Metric`; `SWEEP_MEASURES` does the same for the layer sweep's
measures (sweep.json). Evaluate's summary, the report's tables, verdicts and glossary, the
layer study and the README's tables (`markdown_table`) all read them, so a metric is averaged
and explained the same way everywhere. A key missing from a table still gets a readable label
(`describe`), but every key evaluate writes belongs here (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

CENTRAL = "_central"  # the view suffix: the metric on the picture's central crop
AVERAGES = {  # how a metric averages over pictures, facets or targets, in words
    "mean": "mean",
    "share": "share of yes",  # a yes/no per picture: the fraction that say yes
    "max": "maximum",
    "none": "not averaged",  # lists and per-network values stay per picture
}


@dataclass(frozen=True)
class Metric:
    """One metric: its plain name, a one-line explanation, how its value reads and how it
    averages.

    `kind`: "value" (a raw activation), "number", "unit" (a similarity in [-1, 1]), "ratio"
    (n×), "share" (a percentage; a single yes/no for one picture), "ranks" or "layers" (lists).
    `average`: a key of `AVERAGES`.
    """

    label: str
    explanation: str
    kind: str = "number"
    average: str = "mean"

    def combine(self, values: Iterable[Any]) -> float | None:
        """The average of `values` by this metric's rule, over the finite numbers among them
        (yes/no count 1/0); None when there is none, or the metric is not averaged."""
        if self.average == "none":
            return None
        finite = [float(v) for v in values if finite_number(v) is not None]
        if not finite:
            return None
        return max(finite) if self.average == "max" else math.fsum(finite) / len(finite)

    def markdown_row(self, *values: Any) -> str:
        """`| label | explanation | averaged |` (then `values`, formatted) for a README table."""
        cells = [self.label, self.explanation, AVERAGES[self.average],
                 *(format_value(v, self.kind) for v in values)]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _m(label: str, explanation: str, kind: str = "number", average: str = "mean") -> Metric:
    return Metric(label, explanation, kind, average)


METRICS: Mapping[str, Metric] = MappingProxyType({
    "activation_max_real": _m(
        "best photo's activation",
        "The target's highest value on any of its selected real photos: the bar to reach.",
        "value", "max"),
    "activation": _m("activation", "The target's value on the picture.", "value"),
    "activation_ratio": _m(
        "vs best photo",
        "Activation over the target's highest activation on any selected real photo; "
        "above 1× the picture beats every photo.", "ratio"),
    "activation_ratio_facet": _m(
        "vs best photo of its facet",
        "Activation over the highest activation among the photos of the picture's own facet "
        "(for a random start: of the facet with its number).", "ratio"),
    "fidelity": _m(
        "stays in its facet",
        "Whether the picture's features (the network's code) lie nearer its own facet's centre "
        "than any other facet's; over several pictures, the share that do.", "share", "share"),
    "fidelity_margin": _m(
        "facet margin",
        "How much nearer its own facet's centre the picture's code lies than the nearest other "
        "facet's, in units of the distance between those facets; above 0 = in its facet."),
    "centre_dominance": _m(
        "centre dominance",
        "The target on the picture's central crop against its four corner crops: 1 = only the "
        "centre drives it, 0 = centre and borders alike, -1 = only the borders.", "unit"),
    "transfer_top1": _m(
        "other networks: top-1",
        "Share of the independent networks (not the optimized one) whose top class for the "
        "picture is the target class.", "share"),
    "transfer_top5": _m(
        "other networks: top-5",
        "Share of the independent networks that rank the target class among their five top "
        "classes for the picture.", "share"),
    "judge_ranks": _m(
        "rank by other networks",
        "Where each independent network ranks the target class for the picture "
        "(1 = its top class).", "ranks", "none"),
    "plausibility": _m(
        "plausibility",
        "Mean cosine similarity of the picture to the five most similar photos of its facet in "
        "an independent network's features (MACO's measure): 1 = like a real photo.", "unit"),
    "path_similarity": _m(
        "path similarity",
        "Whether the picture drives the target through the same internal features as its "
        "facet's photos: cosine similarity of their channel means, averaged over layers along "
        "the depth (Geirhos et al. 2023); low = another path.", "unit"),
    "path_similarity_layers": _m(
        "path similarity per layer",
        "The path similarity layer by layer, from shallow to deep: where it drops, the "
        "picture's path parts from the photos'.", "layers", "none"),
    "diversity": _m(
        "diversity",
        "Mean pairwise cosine distance of the pictures' codes: 0 = identical pictures, higher = "
        "more different pictures; undefined for a single picture."),
    "coverage": _m(
        "coverage",
        "Share of the target's classes that some picture is classified as (among those "
        "classes) by the named network.", "share"),
    "recovery.ari": _m(
        "facet recovery (ARI)",
        "Adjusted Rand index of the facets against the photos' true sub-types: 1 = found "
        "exactly, 0 = no better than chance."),
    "recovery.nmi": _m(
        "facet recovery (NMI)",
        "Normalized mutual information of the facets and the photos' true sub-types: "
        "1 = the same grouping, 0 = unrelated."),
    "recovery.purity": _m(
        "facet recovery (purity)",
        "Share of the photos whose facet's most common true sub-type is their own.", "share"),
})

# The layer sweep's multifacetedness measures (one value per unit, averaged per layer with a
# bootstrap interval), for the Layers page.
SWEEP_MEASURES: Mapping[str, Metric] = MappingProxyType({
    "k": _m(
        "number of facets",
        "How many facets the paper's clustering found among the unit's top images, choosing "
        "their number itself: 1 = one kind of image, more = several kinds."),
    "silhouette": _m(
        "facet silhouette",
        "How cleanly the unit's top images fall into their facets in the space the clustering "
        "ran in, from −1 to 1: near 1 = well apart; undefined for a single facet.", "unit"),
    "polysemanticity": _m(
        "1 − MonoScore",
        "One minus the activation-weighted mean cosine similarity of the unit's top images in "
        "an independent network's features (Pach et al. 2025): 0 = all alike, higher = more "
        "different images, a more polysemantic unit.", "unit"),
    "separation": _m(
        "separation ratio",
        "Mean distance between images of different facets over mean distance within a facet, "
        "in an independent network's features (PURE, Dreyer et al. 2024): 1 = facets no more "
        "apart than their own images, higher = more distinct facets.", "ratio"),
})


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite number (yes/no as 1/0), else None."""
    if not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def split_view(key: str) -> tuple[str, str]:
    """("fidelity_margin", "_central") for "fidelity_margin_central"; view "" = as seen."""
    if key.endswith(CENTRAL) and len(key) > len(CENTRAL):
        return key[: -len(CENTRAL)], CENTRAL
    return key, ""


def describe(key: str, table: Mapping[str, Metric] = METRICS) -> Metric:
    """The entry for `key` (view suffix allowed) in `table`, or a readable stand-in for a key
    it does not know (averaged by its mean)."""
    return table.get(key) or table.get(split_view(key)[0]) or Metric(
        key.replace("_", " ").replace(".", ": "), "(no description)")


def means(pictures: Sequence[Mapping[str, Any]],
          table: Mapping[str, Metric] = METRICS) -> dict[str, float | None]:
    """Every scalar metric of several pictures (or facets, targets) averaged by its own rule,
    keys in order of first appearance; lists and nested values are left out."""
    keys = dict.fromkeys(k for m in pictures for k, v in m.items() if isinstance(v, (int, float)))
    out = {}
    for key in keys:
        info = describe(key, table)
        if info.average != "none":
            out[key] = info.combine(m.get(key) for m in pictures)
    return out


def markdown_table(keys: Iterable[str] | None = None, table: Mapping[str, Metric] = METRICS
                   ) -> str:
    """A README table of metrics (every one of `table` by default): name, meaning, averaging."""
    lines = ["| metric | what it says | averaged over facets |", "|---|---|---|"]
    return "\n".join([*lines, *(describe(k, table).markdown_row() for k in keys or table)])


def number(value: Any, digits: int = 3) -> str:
    """A number in `digits` significant digits; "–" when missing, "n/a" when not finite."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}g}"
    return text.replace("-", "−") if text.startswith("-") else text


def format_value(value: Any, kind: str) -> str:
    """A metric's value as a page or table shows it (not escaped)."""
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        item = "value" if kind == "ranks" else ("unit" if kind == "layers" else kind)
        return " · ".join(format_value(v, item) for v in value) or "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return number(value)
    if kind == "ratio":
        return f"{number(value)}×"
    if kind == "share":
        return f"{value * 100:.0f} %"
    if kind == "unit":
        return f"{value:.3f}".replace("-", "−")
    if kind == "value":
        return number(value, 4)
    return number(value)

"""Plain names and one-line explanations of every metric the report shows, kept in one table.

`METRICS` maps a metric's key in results.json (as `mfv.evaluate.evaluation` writes it, without its
view suffix) to a label, the explanation the page shows on hover, and how its value reads. Every
picture is judged twice: as seen (the key as is) and on its central crop (the key + `_central`);
`metric_table` puts both views of a metric in one row and shows the central one only where it
differs. A key missing from the table still gets a readable label (underscores become spaces), so
no raw key reaches the page, but every key evaluate writes belongs here (a test checks it).
`SWEEP_MEASURES` does the same for the layer sweep's measures (the Layers page).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Metric:
    """How the page names, explains and formats one metric.

    `kind`: "value" (a raw activation), "number", "unit" (a similarity in [-1, 1]), "ratio"
    (n×), "share" (a percentage; a single yes/no for one picture), "ranks" or "layers" (lists).
    """

    label: str
    explanation: str
    kind: str = "number"


METRICS: Mapping[str, Metric] = MappingProxyType({
    "activation_max_real": Metric(
        "best photo's activation",
        "The target's highest value on any of its selected real photos: the bar to reach.",
        "value"),
    "activation": Metric("activation", "The target's value on the picture.", "value"),
    "activation_ratio": Metric(
        "vs best photo",
        "Activation over the target's highest activation on any selected real photo; "
        "above 1× the picture beats every photo.", "ratio"),
    "activation_ratio_facet": Metric(
        "vs best photo of its facet",
        "Activation over the highest activation among the photos of the picture's own facet "
        "(for a random start: of the facet with its number).", "ratio"),
    "fidelity": Metric(
        "stays in its facet",
        "Whether the picture's features (the network's code) lie nearer its own facet's centre "
        "than any other facet's; over several pictures, the share that do.", "share"),
    "fidelity_margin": Metric(
        "facet margin",
        "How much nearer its own facet's centre the picture's code lies than the nearest other "
        "facet's, in units of the distance between those facets; above 0 = in its facet."),
    "centre_dominance": Metric(
        "centre dominance",
        "The target on the picture's central crop against its four corner crops: 1 = only the "
        "centre drives it, 0 = centre and borders alike, -1 = only the borders.", "unit"),
    "transfer_top1": Metric(
        "other networks: top-1",
        "Share of the independent networks (not the optimized one) whose top class for the "
        "picture is the target class.", "share"),
    "transfer_top5": Metric(
        "other networks: top-5",
        "Share of the independent networks that rank the target class among their five top "
        "classes for the picture.", "share"),
    "judge_ranks": Metric(
        "rank by other networks",
        "Where each independent network ranks the target class for the picture "
        "(1 = its top class).", "ranks"),
    "plausibility": Metric(
        "plausibility",
        "Mean cosine similarity of the picture to the five most similar photos of its facet in "
        "an independent network's features (MACO's measure): 1 = like a real photo.", "unit"),
    "path_similarity": Metric(
        "path similarity",
        "Whether the picture drives the target through the same internal features as its "
        "facet's photos: cosine similarity of their channel means, averaged over layers along "
        "the depth (Geirhos et al. 2023); low = another path.", "unit"),
    "path_similarity_layers": Metric(
        "path similarity per layer",
        "The path similarity layer by layer, from shallow to deep: where it drops, the "
        "picture's path parts from the photos'.", "layers"),
    "diversity": Metric(
        "diversity",
        "Mean pairwise cosine distance of the pictures' codes: 0 = identical pictures, higher = "
        "more different pictures."),
    "coverage": Metric(
        "coverage",
        "Share of the target's classes that some picture is classified as (among those "
        "classes) by the named network.", "share"),
    "recovery.ari": Metric(
        "facet recovery (ARI)",
        "Adjusted Rand index of the facets against the photos' true sub-types: 1 = found "
        "exactly, 0 = no better than chance."),
    "recovery.nmi": Metric(
        "facet recovery (NMI)",
        "Normalized mutual information of the facets and the photos' true sub-types: "
        "1 = the same grouping, 0 = unrelated."),
    "recovery.purity": Metric(
        "facet recovery (purity)",
        "Share of the photos whose facet's most common true sub-type is their own.", "share"),
})

# The layer sweep's multifacetedness measures (`mfv.study.layers.MEASURES`, one value per unit,
# averaged per layer), for the Layers page.
SWEEP_MEASURES: Mapping[str, Metric] = MappingProxyType({
    "k": Metric(
        "number of facets",
        "How many facets the paper's clustering found among the unit's top images, choosing "
        "their number itself: 1 = one kind of image, more = several kinds."),
    "silhouette": Metric(
        "facet silhouette",
        "How cleanly the unit's top images fall into their facets in the space the clustering "
        "ran in, from −1 to 1: near 1 = well apart; undefined for a single facet.", "unit"),
    "polysemanticity": Metric(
        "1 − MonoScore",
        "One minus the activation-weighted mean cosine similarity of the unit's top images in "
        "an independent network's features (Pach et al. 2025): 0 = all alike, higher = more "
        "different images, a more polysemantic unit.", "unit"),
    "separation": Metric(
        "separation ratio",
        "Mean distance between images of different facets over mean distance within a facet, "
        "in an independent network's features (PURE, Dreyer et al. 2024): 1 = facets no more "
        "apart than their own images, higher = more distinct facets.", "ratio"),
})

CENTRAL = "_central"
VIEWS: Mapping[str, str] = MappingProxyType({
    "as seen": "The saved picture, resized and centre-cropped the way a photo is.",
    "central crop": "The pixels the optimizer drove, at their own scale (shown in grey where "
                    "it differs).",
})


def split_view(key: str) -> tuple[str, str]:
    """("fidelity_margin", "_central") for "fidelity_margin_central"; view "" = as seen."""
    if key.endswith(CENTRAL) and len(key) > len(CENTRAL):
        return key[: -len(CENTRAL)], CENTRAL
    return key, ""


def describe(key: str, table: Mapping[str, Metric] = METRICS) -> Metric:
    """The entry for `key` in `table` (`METRICS` or `SWEEP_MEASURES`), or a readable stand-in
    for a key it does not know."""
    return table.get(key) or Metric(key.replace("_", " ").replace(".", ": "),
                                    "(no description)")


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
    """A metric's value as the page shows it (not yet escaped)."""
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


@dataclass(frozen=True)
class Cell:
    """One metric of one column: its value as seen, and centrally where that differs."""

    seen: str
    central: str | None = None


@dataclass(frozen=True)
class Row:
    key: str  # the metric's key in METRICS (or the raw key it stands for)
    label: str
    explanation: str
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class MetricTable:
    columns: tuple[str, ...]
    rows: tuple[Row, ...]

    @property
    def has_central(self) -> bool:
        return any(c.central is not None for r in self.rows for c in r.cells)

    @property
    def keys(self) -> set[str]:
        return {r.key for r in self.rows}


def _entries(metrics: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(metric key, sub-item): {view: value}}: nested values become their own rows (coverage
    per network, recovery's three scores)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for raw, value in metrics.items():
        base, view = split_view(str(raw))
        if isinstance(value, Mapping):
            for sub, v in value.items():
                joined = f"{base}.{sub}"
                slot = (joined, "") if joined in METRICS else (base, str(sub))
                out.setdefault(slot, {})[view] = v
        else:
            out.setdefault((base, ""), {})[view] = value
    return out


def metric_table(columns: Mapping[str, Mapping[str, Any]], *,
                 judges: Sequence[str] = ()) -> MetricTable:
    """Rows of plain-named metrics with a cell per column (e.g. per recipe), in the order of
    `METRICS`; `judges` names the independent networks whose ranks `judge_ranks` lists."""
    per_column = {name: _entries(m) for name, m in columns.items() if isinstance(m, Mapping)}
    order = {key: i for i, key in enumerate(METRICS)}
    slots = list(dict.fromkeys(s for entries in per_column.values() for s in entries))
    slots.sort(key=lambda s: order.get(s[0], len(order)))
    rows = []
    for key, sub in slots:
        info = describe(key)
        label = info.label
        if sub:
            label += f" by {sub}" if key == "coverage" else f": {sub.replace('_', ' ')}"
        explanation = info.explanation
        if key == "judge_ranks" and judges:
            explanation += " In order: " + ", ".join(judges) + "."
        cells = []
        for entries in per_column.values():
            views = entries.get((key, sub), {})
            seen = format_value(views.get(""), info.kind)
            central = (format_value(views[CENTRAL], info.kind) if CENTRAL in views else None)
            cells.append(Cell(seen, None if central == seen else central))
        rows.append(Row(key, label, explanation, tuple(cells)))
    return MetricTable(tuple(per_column), tuple(rows))


def facet_means(per_facet: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over facets of each numeric or yes/no metric (a yes/no becomes a share)."""
    values: dict[str, list[float]] = {}
    for metrics in per_facet:
        for key, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)):
                values.setdefault(key, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in values.items()}

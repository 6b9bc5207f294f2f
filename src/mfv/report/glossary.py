"""The report's metric tables: plain names and explanations (from the metric registry,
`mfv.results.metrics`) in rows, one cell per column (e.g. per recipe).

Every picture is judged twice: as seen (the key as is) and on its central crop (the key +
`_central`); `metric_table` puts both views of a metric in one row and shows the central one only
where it differs. A key the registry does not know still gets a readable label (underscores
become spaces), so no raw key reaches the page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mfv.results.metrics import CENTRAL, METRICS, describe, format_value, split_view

VIEWS: Mapping[str, str] = MappingProxyType({
    "as seen": "The saved picture, resized and centre-cropped the way a photo is.",
    "central crop": "The pixels the optimizer drove, at their own scale (shown in grey where "
                    "it differs).",
})


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

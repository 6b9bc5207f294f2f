"""Figures of a sweep: each multifacetedness measure per layer, against depth, as PNG and SVG.

Drawn with matplotlib's object API (`Figure` + `FigureCanvasAgg`), never pyplot, so no global
backend or figure registry is touched (safe inside other programs and threads). Each plotted
series carries an SVG id (`mean-<panel>` / `chance-<panel>`) so the file can be checked.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mfv.core.errors import MfvError
from mfv.core.io import atomic_write_bytes

PANEL_WIDTH_IN = 4.2
PANEL_HEIGHT_IN = 3.4
DPI = 120


def panel_id(measure: str) -> str:
    """The id suffix of a measure's series in the SVG: its name with non-word characters as -."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", measure).strip("-") or "measure"


def plot_layer_measures(
    layers: list[str],
    measures: Mapping[str, Sequence[tuple[float, float, float]]],
    chance: Mapping[str, Sequence[float]] | None,
    out_stem: Path,
    calibration: Mapping[str, Sequence[tuple[float, float, bool | None]]] | None = None,
) -> list[Path]:
    """Write `out_stem.png` and `out_stem.svg`: one panel per measure, layers in depth order.

    `measures[name][i]` is (mean, low, high) of that measure over layer `layers[i]`'s units
    (drawn as a point with a CI error bar; NaN is left out); `chance[name][i]`, when given, is
    the measure's chance level at that layer (a dashed line). `calibration[name][i]`, when
    given, is (mean over the layer's one-kind constructed units, mean over its two-kind ones,
    power): drawn as small down / up triangles, and a layer where the measure has no power
    (False) is shaded and its point drawn hollow (None: not calibrated). Files are written
    atomically.
    """
    if not layers:
        raise MfvError("no layers to plot")
    if not measures:
        raise MfvError("no measures to plot")
    for name, rows in measures.items():
        if len(rows) != len(layers) or any(len(r) != 3 for r in rows):
            raise MfvError(f"measure {name!r} needs one (mean, low, high) per layer "
                           f"({len(layers)}), got {len(rows)} rows")
    for name, rows in (chance or {}).items():
        if name not in measures:
            raise MfvError(f"chance level given for {name!r}, which is not a plotted measure")
        if len(rows) != len(layers):
            raise MfvError(f"chance level of {name!r} needs one value per layer "
                           f"({len(layers)}), got {len(rows)}")

    for name, rows in (calibration or {}).items():
        if name not in measures:
            raise MfvError(f"calibration given for {name!r}, which is not a plotted measure")
        if len(rows) != len(layers) or any(len(r) != 3 for r in rows):
            raise MfvError(f"calibration of {name!r} needs one (one-kind, two-kind, power) per "
                           f"layer ({len(layers)}), got {len(rows)} rows")

    fig = _figure(layers, measures, chance or {}, calibration or {})
    out_stem = Path(out_stem)
    paths = []
    for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
        paths.append(atomic_write_bytes(out_stem.with_name(f"{out_stem.name}.{fmt}"),
                                        buf.getvalue()))
    return paths


def _figure(layers, measures, chance, calibration) -> Figure:
    n = len(measures)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    width = max(PANEL_WIDTH_IN, 0.35 * len(layers) + 1.5)
    fig = Figure(figsize=(width * cols, PANEL_HEIGHT_IN * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = list(range(len(layers)))
    for ax, (name, stats) in zip(axes, measures.items(), strict=False):
        mean = [float(s[0]) for s in stats]
        err = [[_gap(m, float(s[1])) for m, s in zip(mean, stats, strict=True)],
               [_gap(float(s[2]), m) for m, s in zip(mean, stats, strict=True)]]
        bars = ax.errorbar(x, mean, yerr=err, fmt="o-", color="C0", ecolor="C0", capsize=3,
                           markersize=5, linewidth=1.2, label="mean over units, bootstrap CI")
        bars.lines[0].set_gid(f"mean-{panel_id(name)}")
        if name in chance:
            levels = [math.nan if c is None else float(c) for c in chance[name]]
            (line,) = ax.plot(x, levels, linestyle="--", color="0.45",
                              marker="", linewidth=1.2, label="chance")
            line.set_gid(f"chance-{panel_id(name)}")
        if name in calibration:
            _calibration(ax, x, mean, calibration[name], panel_id(name))
        ax.set_title(name)
        ax.set_xticks(x)
        ax.set_xticklabels(layers, rotation=45 if len(layers) > 4 else 0, ha="right"
                           if len(layers) > 4 else "center", fontsize=8)
        ax.set_xlabel("layer (input → output)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _calibration(ax, x, mean, rows, pid: str) -> None:
    """One-kind and two-kind constructed units' means as triangles; layers without power
    shaded, their points hollow."""
    one = [float(r[0]) for r in rows]
    two = [float(r[1]) for r in rows]
    (low,) = ax.plot(x, one, linestyle="", marker="v", markersize=4, color="C3",
                     label="constructed: one kind")
    (high,) = ax.plot(x, two, linestyle="", marker="^", markersize=4, color="C2",
                      label="constructed: two kinds")
    low.set_gid(f"one-kind-{pid}")
    high.set_gid(f"two-kind-{pid}")
    blind = [i for i, r in zip(x, rows, strict=True) if r[2] is False]
    for i in blind:
        ax.axvspan(i - 0.45, i + 0.45, color="0.85", zorder=0)
    if blind:
        (hollow,) = ax.plot(blind, [mean[i] for i in blind], linestyle="", marker="o",
                            markersize=7, markerfacecolor="white", markeredgecolor="C0",
                            label="no power (two kinds not above one)")
        hollow.set_gid(f"no-power-{pid}")


def _gap(a: float, b: float) -> float:
    """Error-bar length a - b, 0 when undefined (NaN bound) or negative."""
    d = a - b
    return d if d > 0 else 0.0

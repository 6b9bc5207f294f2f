"""Does multifacetedness grow with depth? The sweep's answer per measure (docs/sweep.md, *The
answer*): the slope of the layers' means against depth with a bootstrap interval over units, the
first-vs-last quarter contrast, and the same over only the layers where the calibration gives
the measure power."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mfv.study.calibration import POWER_MEASURES
from mfv.study.measures import MEASURES, number, percentile_ci


def answer(per_layer: Sequence[dict], level: dict) -> dict:
    """Does multifacetedness grow with depth? The slope of each measure's layer means against
    depth (per layer of depth), with a bootstrap interval over units, and the first-vs-last
    quarter contrast; for the measures the calibration tests, the same over only the layers
    where the measure has power (`with_power`)."""
    out = {}
    for name in MEASURES:
        out[name] = trend(per_layer, name)
        if name in out and "first_quarter" in out[name]:
            out[name]["chance"] = level[name]["mean"]
        if name in POWER_MEASURES:
            powered = [e for e in per_layer
                       if e["calibration"]["measures"][name]["power"]]
            over = trend(powered, name)
            out[name]["with_power"] = {"layers": [e["layer"] for e in powered],
                                       **{k: over[k] for k in ("slope", "low", "high")}}
    return out


def trend(per_layer: Sequence[dict], name: str) -> dict:
    """One measure's slope against depth over the given layers (`answer`)."""
    depth = np.array([e["depth"] for e in per_layer], np.float64)
    per_unit = [np.array([number(u[name]) for u in e["units"]], np.float64) for e in per_layer]
    means = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in per_unit])
    ok = np.isfinite(means)
    if ok.sum() < 2:
        return {"slope": float("nan"), "low": float("nan"), "high": float("nan")}
    slope = float(np.polyfit(depth[ok], means[ok], 1)[0])
    finite = [(d, v[np.isfinite(v)]) for d, v in zip(depth, per_unit, strict=True)
              if np.isfinite(v).any()]
    low, high = percentile_ci([v for _, v in finite], functools.partial(
        _slope, np.array([d for d, _ in finite])))
    quarter = max(1, len(per_layer) // 4)
    first, last = np.nanmean(means[:quarter]), np.nanmean(means[-quarter:])
    return {"slope": slope, "low": float(low), "high": float(high),
            "first_quarter": float(first), "last_quarter": float(last)}


def _slope(depth: np.ndarray, *layers: np.ndarray, axis: int = -1) -> np.ndarray:
    """The least-squares slope of the layers' mean values against depth (vectorized over
    bootstrap resamples: each layer's values (..., units))."""
    means = np.stack([v.mean(axis=axis) for v in layers])
    return np.polyfit(depth, means.reshape(len(depth), -1), 1)[0].reshape(means.shape[1:])

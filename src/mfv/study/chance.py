"""The chance level of a swept layer: each measure on random sets of the layer's pooled top
items (crops or photos), as large as a unit's top (docs/sweep.md, *The chance level*)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mfv.results.metrics import SWEEP_MEASURES
from mfv.study.measures import MEASURES, number

CHANCE_REPEATS = 10  # random sets per layer


def chance_sets(pool: np.ndarray, size: int, seed: int) -> list[np.ndarray]:
    """CHANCE_REPEATS random sets of the layer's pooled items, each as large as a unit's top."""
    if len(pool) < 2:
        return []
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(pool, min(size, len(pool)), replace=False))
            for _ in range(CHANCE_REPEATS)]


def chance_level(draws: Sequence[dict]) -> dict:
    """Per measure the mean and std of the chance sets' values (over those that are numbers)."""
    out = {}
    for name in MEASURES:
        values = [d[name] for d in draws]
        v = np.array([number(x) for x in values], np.float64)
        finite = v[np.isfinite(v)]
        out[name] = {"mean": SWEEP_MEASURES[name].combine(values) if values else None,
                     "std": float(finite.std()) if finite.size else None, "draws": len(v)}
    return out


def overall_chance(per_layer: Sequence[dict]) -> dict:
    """The sweep's chance level per measure: the mean of the layers' chance levels."""
    out = {}
    for name in MEASURES:
        means = [e["chance"][name]["mean"] for e in per_layer
                 if e["chance"][name]["mean"] is not None]
        stds = [e["chance"][name]["std"] for e in per_layer
                if e["chance"][name]["std"] is not None]
        out[name] = {"mean": float(np.mean(means)) if means else None,
                     "std": float(np.mean(stds)) if stds else None,
                     "draws": int(sum(e["chance"][name]["draws"] for e in per_layer))}
    return out

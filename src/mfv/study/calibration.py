"""Can a measure tell, at a layer, a unit that fires for two kinds of image from one that fires
for one? (`mfv sweep`'s calibration; docs/sweep.md, *The calibration*)

Up to `CALIBRATION_UNITS` of the layer's measured units are drawn (seeded, never chosen by what
the measures read) and paired when they share at most `OVERLAP` of their top images; each pair
(a, b) gives a constructed two-kind unit max(a / mean a, b / mean b). Per measure, the two-kind
units' values minus the mean of their two units' values, with a 95 % vertex-bootstrap interval
(pairs share units): the measure has *power* at the layer when the whole interval is above 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import adjusted_rand_score

from mfv.study.measures import MEASURES, number, pair_bootstrap_ci

CALIBRATION_UNITS = 10  # units per layer whose pairs make the constructed two-kind units
OVERLAP = 0.1  # at most this share of top images shared by a calibration pair's units
POWER_MEASURES = ("k", "polysemanticity", "separation")  # higher = more multifaceted


@dataclass(frozen=True)
class Unit:
    """A sampled unit of a swept layer and its top-N images."""

    layer: str
    unit: int
    column: int  # its target's index in the scan
    rows: np.ndarray  # the unit's top-N images (scan rows), best first
    values: np.ndarray  # its activations on them


def calibration_pairs(units: Sequence[Unit], top_n: int, seed: int) -> list[tuple[Unit, Unit]]:
    """Every pair of up to CALIBRATION_UNITS of the layer's units (a seeded draw, never chosen
    by what the measures read) whose top images overlap little (at most OVERLAP of them
    shared): a unit is in several pairs, which the calibration's vertex bootstrap allows for."""
    rng = np.random.default_rng(seed)
    drawn = [units[i] for i in np.sort(rng.permutation(len(units))[:CALIBRATION_UNITS])]
    tops = [set(u.rows.tolist()) for u in drawn]
    return [(drawn[i], drawn[j]) for i in range(len(drawn)) for j in range(i + 1, len(drawn))
            if len(tops[i] & tops[j]) <= OVERLAP * min(top_n, len(tops[i]), len(tops[j]))]


def two_kind_unit(a: Unit, b: Unit, index: dict, top_n: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The constructed unit max(a / mean a, b / mean b) of two units (each scaled by the mean
    of its top activations): its top-N items — exactly the top-N of the union of the two units'
    top-N, each image seen where the unit that drives it peaks — their values, and each item's
    known kind (0: a, 1: b)."""
    scale = [u.values.mean() if u.values.mean() > 0 else u.values.max() for u in (a, b)]
    chosen = np.concatenate([index[a.layer, a.unit], index[b.layer, b.unit]])
    values = np.concatenate([a.values / scale[0], b.values / scale[1]])
    kind = np.repeat([0, 1], [len(a.values), len(b.values)])
    order = np.lexsort((chosen, -values))
    chosen, values, kind = chosen[order], values[order], kind[order]
    _, first = np.unique(chosen, return_index=True)  # an item in both: its larger value
    keep = np.sort(first)[:top_n]
    return chosen[keep], values[keep], kind[keep]


def calibrate(pairs: Sequence[tuple[Unit, Unit]], docs: dict[int, dict],
              two: Sequence[dict], kinds: Sequence[np.ndarray], seed: int) -> dict:
    """Can the measures tell, at this layer, a unit that fires for two kinds of image from one
    that fires for one? Per calibration pair, the constructed two-kind unit's value minus the
    mean of its two units' values; per measure the mean difference with its 95 % interval
    from the vertex bootstrap (pairs share units): `power` when the whole interval is above 0
    (None without pairs)."""
    out = {"pairs": [[a.unit, b.unit] for a, b in pairs],
           "two_kind": [{"units": [a.unit, b.unit], "split": np.bincount(k, minlength=2)
                         .tolist(), **{name: d[name] for name in MEASURES},
                         "kind_ari": kind_ari(d, k)}
                        for (a, b), d, k in zip(pairs, two, kinds, strict=True)],
           "measures": {}}
    for name in MEASURES:
        parts = np.array([[number(docs[a.unit][name]), number(docs[b.unit][name])]
                          for a, b in pairs], np.float64).reshape(-1, 2)
        one = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in parts],
                       np.float64)
        both = np.array([number(d[name]) for d in two], np.float64)
        diff = both - one
        ok = np.isfinite(diff)
        if not ok.any():
            out["measures"][name] = {"one": None, "two": None, "difference": None,
                                     "low": None, "high": None, "power": None, "pairs": 0,
                                     "units": 0}
            continue
        ends = np.array([[a.unit, b.unit] for a, b in pairs], np.int64)[ok]
        mean, low, high = pair_bootstrap_ci(ends, diff[ok], seed=seed)
        out["measures"][name] = {"one": float(np.mean(one[ok])), "two": float(np.mean(both[ok])),
                                 "difference": mean, "low": low, "high": high,
                                 "power": bool(low > 0), "pairs": int(ok.sum()),
                                 "units": int(np.unique(ends).size)}
    return out


def kind_ari(doc: dict, kind: np.ndarray) -> float:
    """How well the constructed unit's facets split its items by kind (adjusted Rand index)."""
    labels = np.empty(len(kind), np.int64)
    for f, rows in enumerate(doc["members"]):
        labels[np.asarray(rows, np.int64)] = f
    return float(adjusted_rand_score(kind, labels))


def calibration_point(entry: dict, name: str) -> tuple[float, float, bool | None]:
    """(one-kind mean, two-kind mean, power) of a layer's calibration for the plot."""
    c = entry["calibration"]["measures"][name]
    if c["power"] is None:
        return float("nan"), float("nan"), None
    return c["one"], c["two"], c["power"]

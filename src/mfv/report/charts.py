"""Small inline SVG charts drawn on the server: the geometry here, the markup in the templates.

`sparkline` turns an optimization trace (the target's value per step) into the points of a
polyline; long traces keep their first and last step and each stretch's lowest and highest value,
so the chart keeps the trace's envelope however many steps it has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPARK_W, SPARK_H, SPARK_PAD = 120.0, 30.0, 2.0
SPARK_POINTS = 80  # at most this many points (+ the first and last step) per chart


@dataclass(frozen=True)
class Sparkline:
    """A trace as chart geometry in a width × height viewBox (y grows downwards)."""

    points: str  # "x,y x,y …" for <polyline points>
    width: float
    height: float
    steps: int
    start: float
    end: float
    low: float  # the values at the bottom and the top of the chart
    high: float
    reference_y: float | None = None  # a horizontal line (e.g. the best photo's activation)

    def x_of(self, step: int) -> float:
        return SPARK_PAD + step / max(self.steps - 1, 1) * (self.width - 2 * SPARK_PAD)

    def y_of(self, value: float) -> float:
        if self.high == self.low:
            return self.height / 2
        return SPARK_PAD + (self.high - value) / (self.high - self.low) * (
            self.height - 2 * SPARK_PAD)


def _downsample(values: np.ndarray, steps: np.ndarray, max_points: int) -> np.ndarray:
    """The steps to draw: all of them when few, else the first, the last and each bucket's
    lowest and highest value."""
    if len(steps) <= max_points + 2:
        return steps
    buckets = np.array_split(steps, max(1, max_points // 2))
    keep = [steps[0], steps[-1]]
    for b in buckets:
        keep += [b[np.argmin(values[b])], b[np.argmax(values[b])]]
    return np.unique(np.asarray(keep))


def sparkline(trace: Sequence[float] | np.ndarray, *, reference: float | None = None,
              width: float = SPARK_W, height: float = SPARK_H,
              max_points: int = SPARK_POINTS) -> Sparkline | None:
    """The chart of a trace (non-finite steps left out), or None when it has no finite value;
    `reference` draws a horizontal line at that value, the chart's range widened to hold it."""
    values = np.asarray(trace, dtype=np.float64).reshape(-1)
    finite = np.flatnonzero(np.isfinite(values))
    if len(finite) == 0:
        return None
    steps = _downsample(values, finite, max_points)
    low, high = float(values[finite].min()), float(values[finite].max())
    ref = reference if reference is not None and math.isfinite(reference) else None
    if ref is not None:
        low, high = min(low, ref), max(high, ref)
    chart = Sparkline("", width, height, len(values), float(values[finite[0]]),
                      float(values[finite[-1]]), low, high)
    points = " ".join(f"{chart.x_of(int(s)):.2f},{chart.y_of(float(values[s])):.2f}"
                      for s in steps)
    return Sparkline(points, width, height, chart.steps, chart.start, chart.end, low, high,
                     None if ref is None else round(chart.y_of(ref), 2))


@dataclass(frozen=True)
class MapLayout:
    """Fits 2-D points into a width × height box, keeping their aspect (y up on the map)."""

    scale: float
    ox: float
    oy: float

    @classmethod
    def fit(cls, xs: Sequence[float], ys: Sequence[float], width: float, height: float,
            pad: float) -> MapLayout:
        dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        scale = min((width - 2 * pad) / dx, (height - 2 * pad) / dy)
        return cls(scale, (width - dx * scale) / 2 - min(xs) * scale,
                   (height - dy * scale) / 2 + max(ys) * scale)

    def place(self, x: float, y: float) -> tuple[float, float]:
        return round(self.ox + x * self.scale, 1), round(self.oy - y * self.scale, 1)

"""A finished scan, read back: its manifest and its arrays (memory-mapped on first use), each
target's activations, top images and peaks (`mfv.scan.scanner` writes them)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from mfv.core.errors import MfvError
from mfv.scan.store import ScanStore
from mfv.scan.topn import peaks_of_top


class ScanResult:
    """A finished scan: its manifest, and its arrays read (memory-mapped) on first use."""

    def __init__(self, store: ScanStore, manifest: dict) -> None:
        self.store = store
        self.manifest = manifest

    @classmethod
    def load(cls, where: ScanStore | str | Path) -> ScanResult:
        """The finished scan in a store (`ScanStore.under(run, key)`) or its folder."""
        store = where if isinstance(where, ScanStore) else ScanStore(Path(where))
        directory = store.directory
        manifest = store.manifest()
        if manifest is None or manifest.get("status") != "complete":
            raise MfvError(f"the scan in {directory} is not complete; run `mfv scan` to "
                           "finish it")
        return cls(store, manifest)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @functools.cached_property
    def paths(self) -> list[str]:  # cached: the study looks up ~700,000 paths
        return [row[0] for row in self.manifest["images"]]

    @functools.cached_property
    def labels(self) -> list[str | None]:
        return [row[1] for row in self.manifest["images"]]

    @functools.cached_property
    def targets(self) -> list[str]:
        return [t["spec"] for t in self.manifest["targets"]]

    @property
    def bad(self) -> list[dict]:
        return self.manifest["bad"]

    @functools.cached_property
    def codes(self) -> np.ndarray:
        return self.store.read_array("codes", mmap=True)

    @functools.cached_property
    def valid(self) -> np.ndarray:
        return self.store.read_array("valid")

    @functools.cached_property
    def spectrum(self) -> np.ndarray:
        """(3, S, S // 2 + 1) mean amplitude spectrum of the valid images at the input size."""
        return self.store.read_array("spectrum")

    @functools.cached_property
    def activations(self) -> np.ndarray | None:
        """(N, T) activations, or None when the scan kept only a top-N per target."""
        return self.store.read_array("activations", mmap=True) \
            if self.store.has_array("activations") else None

    @functools.cached_property
    def _top(self) -> tuple[np.ndarray, np.ndarray]:
        return self.store.read_array("top_indices"), self.store.read_array("top_values")

    def target_index(self, spec: str) -> int:
        return self.targets.index(spec)

    def grid(self, target: int) -> tuple[int, int] | None:
        """The (H, W) grid of the map a target peaks on, or None (not a spatial target)."""
        grid = (self.manifest.get("grids") or [None] * (target + 1))[target]
        return tuple(grid) if grid else None

    def peaks_of(self, target: int, indices: np.ndarray) -> np.ndarray:
        """(n, 2) where the target peaks (row, column in `grid(target)`) on given images; -1
        where unknown (not a spatial target, or outside a top-N scan's stored top)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.grid(target) is None:
            return np.full((len(indices), 2), -1, np.int64)
        if self.activations is not None:
            return self.store.read_array("peaks", mmap=True)[indices, target].astype(np.int64)
        kept = self._top[0][target][None]
        return peaks_of_top(indices[None], kept, self.store.read_array(
            "top_peaks", mmap=True)[target][None])[0].astype(np.int64)

    def peak_pixels(self, target: int, indices: np.ndarray) -> np.ndarray:
        """(n, 2) the peaks' cell centres (y, x) in input pixels of the scanned frame (the
        model's input, `size` square); NaN where unknown."""
        grid, size = self.grid(target), self.manifest["model"]["preprocess"]["input_size"]
        peaks = self.peaks_of(target, indices).astype(np.float64)
        if grid is None:
            return np.full(peaks.shape, np.nan)
        out = (peaks + 0.5) * size / np.asarray(grid, np.float64)
        return np.where(peaks < 0, np.nan, out)

    def top(self, target: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values of the n valid images that activate `target` most, best first."""
        if self.activations is not None:
            values = np.where(self.valid, self.activations[:, target], -np.inf)
            order = np.argsort(-values, kind="stable")[: min(n, int(self.valid.sum()))]
            return order, values[order]
        indices, values = self._top[0][target], self._top[1][target]
        keep = indices >= 0
        return indices[keep][:n], values[keep][:n]

    def activation_of(self, target: int, indices: np.ndarray) -> np.ndarray:
        """The target's activation on given images (from full vectors or the stored top-N)."""
        if self.activations is not None:
            return np.asarray(self.activations[indices, target])
        lookup = dict(zip(self._top[0][target].tolist(), self._top[1][target].tolist(),
                          strict=True))
        return np.array([lookup.get(int(i), np.nan) for i in indices], dtype=np.float32)

    def activations_of(self, target: int) -> np.ndarray:
        """(N,) the target's activation on every image; NaN where unknown (invalid images, or
        outside the stored top-N)."""
        if self.activations is not None:
            return np.where(self.valid, self.activations[:, target], np.nan)
        out = np.full(len(self.paths), np.nan)
        idx, vals = self.top(target, len(self.paths))
        out[idx] = vals
        return out

    def class_labels(self, classes) -> np.ndarray | None:
        """Image labels as class indices of `classes` (-1 where a label is no class), or None
        when the images carry no labels or the model has no classes."""
        labels = self.labels
        if classes is None or all(label is None for label in labels):
            return None
        lookup = {label: classes.lookup(label) for label in set(labels) if label is not None}
        return np.array([-1 if lookup.get(lbl) is None else lookup[lbl] for lbl in labels])

"""Clustering codes into facets: PCA, a 2-D embedding (t-SNE, UMAP, or PCA itself), k-means
with a fixed or automatic k, and the clean-ups (dissolving small clusters, merging near
duplicates). The numeric core of `mfv.facets.find`, on plain arrays; the options are documented
there.
"""

from __future__ import annotations

import importlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from mfv.core.errors import MfvError
from mfv.facets.kmeans import kmeans, silhouette
from mfv.facets.tsne import tsne_map

CLUSTERING = "tsne-exact/2"  # names the numerics: a stored clustering under another is redone
AUTO_K_TOLERANCE = 0.02  # silhouette points: prefer fewer facets when scores are this close
SILHOUETTE_SAMPLE = 4000  # silhouette on at most this many points (seeded sample) for speed


@dataclass(frozen=True)
class Embedding:
    """How the codes are embedded before k-means (PCA dims, then the 2-D map)."""

    kind: str
    perplexity: float
    pca_dims: int
    tsne_iter: int | None
    seed: int
    n_jobs: int


@dataclass
class Clustering:
    """What `_cluster` found: labels, the spaces used, k, and what to record about it."""

    labels: np.ndarray
    space: np.ndarray  # the space k-means ran in (the 2-D map for t-SNE / UMAP)
    reduced: np.ndarray  # the PCA codes
    coords: np.ndarray  # the 2-D map shown
    k_chosen: int
    scores: dict[int, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def cluster(x: np.ndarray, k: int | str, how: Embedding, k_range: tuple[int, int],
             name: str) -> Clustering:
    """PCA, embedding and k-means (fixed or auto k) of the selected codes."""
    n = x.shape[0]
    info: dict[str, Any] = {}
    notes: list[str] = []
    timings: dict[str, float] = {}

    def note(msg: str) -> None:
        warnings.warn(msg, stacklevel=4)
        notes.append(msg)

    t = time.perf_counter()
    n_distinct = distinct_rows(x)
    timings["distinct"] = time.perf_counter() - t
    info["n_distinct_codes"] = n_distinct
    if n_distinct == 1:
        note(f"all {n} codes of {name} are identical: returning a single facet")
        info["embedding_used"] = "none (identical codes)"
        zeros = np.zeros((n, 1))
        return Clustering(np.zeros(n, dtype=np.int64), zeros, zeros, np.zeros((n, 2)), 1,
                           info=info, notes=notes, timings=timings)
    t = time.perf_counter()
    reduced = _pca(x, how.pca_dims, how.seed, info)
    timings["pca"] = time.perf_counter() - t
    t = time.perf_counter()
    space, coords = _embed(reduced, how.kind, how.perplexity, how.tsne_iter, how.seed,
                           how.n_jobs, info)
    timings["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    scores: dict[int, float] = {}
    if k == "auto":
        lo, hi = k_range[0], min(k_range[1], n_distinct, n - 1)
        if lo > hi:
            note(f"too few distinct images ({n_distinct}) of {name} to choose k: one facet")
            labels, k_chosen = np.zeros(n, dtype=np.int64), 1
        else:
            labels, k_chosen, scores = _auto_k(space, lo, hi, how.seed, info)
    else:
        k_chosen = int(k)
        if k_chosen > n_distinct:
            note(f"{name}: only {n_distinct} distinct codes among {n} images, so {k_chosen} "
                 f"facets are not possible: using {n_distinct}")
            k_chosen = n_distinct
        labels = kmeans(space, k_chosen, how.seed)
    timings["kmeans"] = time.perf_counter() - t
    return Clustering(labels, space, reduced, coords, k_chosen, scores, info, notes, timings)


def distinct_rows(x: np.ndarray) -> int:
    """How many distinct rows a 2-D array has (as `np.unique(x, axis=0)`, -0.0 equal to 0.0):
    each row compared as one block of bytes, ~100x faster than `np.unique`'s structured sort
    of 200 x 1280 float32 codes."""
    rows = np.ascontiguousarray(x) + 0  # a copy, with -0.0 as 0.0
    if rows.ndim != 2 or rows.shape[1] == 0:
        return int(np.unique(rows, axis=0).shape[0])
    return int(np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))
                         ).shape[0])


def _pca(x: np.ndarray, dims: int, seed: int, settings: dict) -> np.ndarray:
    """Centre and project the codes on their first `dims` principal components."""
    n_comp = min(dims, x.shape[0], x.shape[1])
    settings["pca_dims"] = int(n_comp)
    return PCA(n_components=n_comp, random_state=seed).fit_transform(x)


def _embed(reduced, embedding, perplexity, tsne_iter, seed, n_jobs, settings):
    """Return (clustering space, 2-D map) for the chosen embedding."""
    n = reduced.shape[0]
    if embedding == "pca":
        settings["embedding_used"] = "pca"
        coords = reduced[:, :2] if reduced.shape[1] >= 2 else np.pad(reduced, ((0, 0), (0, 1)))
        return reduced, coords
    if embedding == "umap":
        try:
            umap = importlib.import_module("umap")
        except ImportError as e:
            raise MfvError(
                "embedding 'umap' needs the optional package umap-learn "
                "(pip install umap-learn); or use embedding 'tsne' or 'pca'"
            ) from e
        n_neighbors = max(2, min(15, n - 1))
        settings["embedding_used"] = "umap"
        settings["umap_n_neighbors"] = n_neighbors
        reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
        with warnings.catch_warnings():  # seeded, hence single-threaded: umap says so each time
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            coords = np.asarray(reducer.fit_transform(reduced), dtype=np.float64)
        return coords, coords
    coords = tsne_map(reduced, perplexity, tsne_iter, seed, n_jobs, settings)
    return coords, coords


def _auto_k(space, lo, hi, seed, settings) -> tuple[np.ndarray, int, dict[int, float]]:
    """k-means for every k in lo..hi; keep the smallest k whose silhouette is near the best."""
    n = space.shape[0]
    sample = None if n <= SILHOUETTE_SAMPLE else SILHOUETTE_SAMPLE
    settings.update(auto_k="silhouette", auto_k_tolerance=AUTO_K_TOLERANCE)
    settings["silhouette_sample"] = sample
    runs: dict[int, np.ndarray] = {}
    scores: dict[int, float] = {}
    for kk in range(lo, hi + 1):
        labels = kmeans(space, kk, seed)
        runs[kk] = labels
        if np.unique(labels).size < 2:
            scores[kk] = -1.0
            continue
        scores[kk] = silhouette(space, labels, sample, seed)
    best = max(scores.values())
    k_chosen = min(kk for kk, s in scores.items() if s >= best - AUTO_K_TOLERANCE)
    return runs[k_chosen], k_chosen, scores


def _centres(labels: np.ndarray, space: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): space[labels == c].mean(axis=0) for c in np.unique(labels)}


def dissolve_small(labels, space, min_size) -> tuple[np.ndarray, list[dict[str, int]]]:
    """Reassign members of clusters smaller than `min_size` to the nearest other centre."""
    labels = labels.copy()
    dissolved: list[dict[str, int]] = []
    while True:
        ids, sizes = np.unique(labels, return_counts=True)
        if ids.size <= 1 or sizes.min() >= min_size:
            return labels, dissolved
        small = int(ids[np.argmin(sizes)])  # smallest, ties to the lowest label
        centres = _centres(labels, space)
        others = [c for c in centres if c != small]
        rows = np.flatnonzero(labels == small)
        cen = np.stack([centres[c] for c in others])
        d = ((space[rows, None, :] - cen[None, :, :]) ** 2).sum(-1)
        labels[rows] = np.asarray(others)[np.argmin(d, axis=1)]
        dissolved.append({"cluster": small, "size": int(rows.size)})


def _separation(labels: np.ndarray, reduced: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Pairwise centre distance over RMS within-cluster radius, in the PCA code space."""
    ids = [int(c) for c in np.unique(labels)]
    mus = np.stack([reduced[labels == c].mean(axis=0) for c in ids])
    ms = np.array([((reduced[labels == c] - mus[i]) ** 2).sum(1).mean() for i, c in enumerate(ids)])
    dist = np.sqrt(((mus[:, None, :] - mus[None, :, :]) ** 2).sum(-1))
    spread = np.sqrt((ms[:, None] + ms[None, :]) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(spread > 0, dist / spread, np.where(dist > 0, np.inf, 0.0))
    np.fill_diagonal(r, np.inf)
    return ids, r


def merge_close(labels, reduced, threshold) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Merge the closest pair of clusters while their separation is below `threshold`."""
    labels = labels.copy()
    merges: list[dict[str, Any]] = []
    while np.unique(labels).size > 1:
        ids, r = _separation(labels, reduced)
        i, j = np.unravel_index(np.argmin(r), r.shape)
        if not r[i, j] < threshold:
            break
        a, b = ids[min(i, j)], ids[max(i, j)]
        merges.append(
            {
                "into": a,
                "from": b,
                "separation": round(float(r[i, j]), 4),
                "sizes": [int((labels == a).sum()), int((labels == b).sum())],
            }
        )
        labels[labels == b] = a
    return labels, merges

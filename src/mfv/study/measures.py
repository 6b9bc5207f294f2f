"""How multifaceted is a unit: measures on its top-N images, a chance level and per-layer CIs.

The paper's claim (higher layers are more multifaceted) is qualitative; these make it a number.
Per unit, its top-N images are clustered into facets with the paper's pipeline
(`mfv.facets.find.find_facets`), which gives k and the facets; the facets are then scored in an
*independent* embedding (another network's penultimate codes), so a score does not just echo
the space the clustering was done in:

* `mono_score` (MonoScore, Pach et al., NeurIPS 2025, arXiv 2504.02821, reference code
  ExplainableML/sae-for-vlm `metric.py`): activation-weighted mean pairwise cosine similarity
  of the images; `1 - mono_score` is the polysemanticity score. Needs no clustering.
* `separation_ratio` (PURE, Dreyer et al., CVPRW 2024, maxdreyer/PURE
  `experiments/disentangling/eval_CLIP_alignment.py`): mean Euclidean distance between images
  of different facets over the mean distance between images of the same facet.
* `silhouette`: the mean silhouette of the facets in the clustering's own space.

`bootstrap_ci` gives a percentile-bootstrap CI of a layer's mean over its units (scipy's).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import bootstrap
from sklearn.decomposition import PCA

from mfv.core.errors import MfvError
from mfv.facets.find import find_facets
from mfv.facets.kmeans import silhouette as facet_silhouette
from mfv.facets.options import FacetOptions

_EPS = 1e-8  # norm floor of the cosine similarity, as torch.nn.functional.cosine_similarity
MEASURES = ("k", "silhouette", "polysemanticity", "separation")  # a sweep's, in this order


def number(value: float | None) -> float:
    """A measure's value as a float: None (undefined, as JSON's null) is NaN."""
    return float("nan") if value is None else float(value)



def _matrix(x: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise MfvError(f"{what} must be a 2-D array (images x features), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise MfvError(f"{what} contain NaN or inf")
    return arr


def _labels(labels: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise MfvError(f"labels must have one entry per row ({n}), got shape {lab.shape}")
    return lab


def mono_score(
    embeddings: np.ndarray, activations: np.ndarray | None = None, *,
    act_min: float | None = None,
) -> float:
    """MonoScore: activation-weighted mean pairwise cosine similarity of a unit's images.

    MS = sum_{i != j} w_i w_j cos(e_i, e_j) / sum_{i != j} w_i w_j, with e the rows of
    `embeddings` and w the min-max scaled activations w = (a - act_min) / (max(a) - act_min),
    clipped to [0, 1]. This is the definition of Pach et al. and their reference code:
    cosine similarity of the raw (uncentred) embeddings, product weights, self-pairs excluded,
    activations min-max scaled per unit. There the minimum is over the whole image collection;
    here only the unit's top images are given, so pass that collection-wide minimum as
    `act_min` to match it. `act_min=None` scales over the given
    activations, which gives the least activating given image weight 0. `activations=None`
    weights all images equally (plain mean pairwise similarity, e.g. for a chance level).
    NaN when no pair has weight (fewer than two images, or all activations equal).
    Computed in O(N D) as |sum_i w_i u_i|^2 - sum_i w_i^2 |u_i|^2 over unit vectors u_i.
    """
    x = _matrix(embeddings, "embeddings")
    n = x.shape[0]
    if activations is None:
        w = np.ones(n)
    else:
        a = np.asarray(activations, dtype=np.float64)
        if a.shape != (n,) or not np.all(np.isfinite(a)):
            raise MfvError(f"activations must be {n} finite values, one per embedding row")
        if n == 0:
            return float("nan")
        lo = float(a.min()) if act_min is None else float(act_min)
        hi = float(a.max())
        if not hi > lo:
            return float("nan")
        w = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
    s = w @ u
    num = float(s @ s - np.sum(w**2 * np.sum(u * u, axis=1)))
    den = float(w.sum() ** 2 - np.sum(w**2))
    return num / den if den > 0 else float("nan")


def separation_ratio(embeddings: np.ndarray, labels: np.ndarray | Sequence[int]) -> float:
    """Mean distance between images of different facets over mean distance within a facet.

    Both means are over image pairs (i < j), pooled over all facets, Euclidean distance in
    `embeddings`, as PURE's evaluation. With one facet (or only singleton facets) one of the
    two sets of pairs is empty and, as in PURE's code, it is taken equal to the other: the
    ratio is 1.0, the value a structureless partition gets, so a one-facet unit counts as "not
    separated" in a layer's mean instead of dropping out of it (NaN would bias the mean up).
    inf when facets are points apart from each other (within distance 0); NaN for < 2 images.
    """
    x = _matrix(embeddings, "embeddings")
    lab = _labels(labels, x.shape[0])
    if x.shape[0] < 2:
        return float("nan")
    d = pdist(x)
    i, j = np.triu_indices(x.shape[0], k=1)  # pdist's condensed order
    same = lab[i] == lab[j]
    within = d[same].mean() if same.any() else None
    between = d[~same].mean() if (~same).any() else None
    within = between if within is None else within
    between = within if between is None else between
    if within == 0:
        return 1.0 if between == 0 else float("inf")
    return float(between / within)


def silhouette(space: np.ndarray, labels: np.ndarray | Sequence[int]) -> float:
    """Mean silhouette of `labels` in `space` (Euclidean); NaN unless 2 <= k <= n - 1."""
    x = _matrix(space, "space")
    lab = _labels(labels, x.shape[0])
    k = np.unique(lab).size
    if not 2 <= k <= x.shape[0] - 1:
        return float("nan")
    return facet_silhouette(x, lab)


def _check_bootstrap(n_boot: int, level: float) -> None:
    if not 0 < level < 1:
        raise MfvError(f"level must lie strictly between 0 and 1, got {level}")
    if n_boot < 1:
        raise MfvError(f"n_boot must be at least 1, got {n_boot}")


def percentile_ci(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray],
                  n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """scipy's percentile bootstrap (`scipy.stats.bootstrap`) of `statistic(*samples, axis=-1)`,
    each sample (e.g. one layer's units) resampled on its own; seeded. A one-value sample is
    that value in every resample."""
    _check_bootstrap(n_boot, level)
    data = tuple(np.repeat(v, 2) if v.size == 1 else v for v in samples)
    ci = bootstrap(data, statistic, n_resamples=n_boot, confidence_level=level,
                   method="percentile", paired=False, vectorized=True,
                   rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def bootstrap_ci(
    values: np.ndarray | Sequence[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over units and its percentile-bootstrap CI (`percentile_ci`).

    NaN values (units a measure is undefined for) are left out; no finite value gives NaNs.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = percentile_ci([v], np.mean, n_boot, level, seed)
    return float(v.mean()), low, high


def pair_bootstrap_ci(ends: np.ndarray, values: np.ndarray, n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of a value measured on pairs of units that share units (edges of a
    graph): the vertex bootstrap (Snijders & Borgatti 1999) resamples the units, and each
    pair counts as often as both its ends were drawn (m_a · m_b), so pairs that share a unit
    vary together as they do between studies; the interval is the percentile one, seeded.
    For a complete graph it is the bootstrap of a two-sample U-statistic. NaN values are left
    out; no finite value gives NaNs."""
    _check_bootstrap(n_boot, level)
    ends = np.asarray(ends, np.int64).reshape(-1, 2)
    v = np.asarray(values, np.float64).ravel()
    if len(ends) != len(v):
        raise MfvError(f"{len(ends)} pairs but {len(v)} values")
    ok = np.isfinite(v)
    ends, v = ends[ok], v[ok]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    units, ends = np.unique(ends, return_inverse=True)
    ends = ends.reshape(-1, 2)
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(units), size=(n_boot, len(units)))
    counts = np.stack([np.bincount(d, minlength=len(units)) for d in draws])
    weights = (counts[:, ends[:, 0]] * counts[:, ends[:, 1]]).astype(np.float64)
    total = weights.sum(axis=1)
    stats = (weights @ v)[total > 0] / total[total > 0]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail]) if stats.size else (v.mean(), v.mean())
    return float(v.mean()), float(low), float(high)


@dataclass(frozen=True)
class UnitMeasures:
    """How multifaceted one unit is, from its clustered top images."""

    k: int  # facets after the clustering's merging
    sizes: list[int]  # facet sizes, largest first
    members: list[np.ndarray]  # row indices of each facet's images, same order as sizes
    representatives: list[np.ndarray]  # each facet's mean-image rows (`Facet.representatives`)
    silhouette: float  # in the clustering's own space; NaN for k = 1
    mono_score: float  # MonoScore in the independent embedding
    separation: float  # PURE-style separation ratio in the independent embedding

    @property
    def polysemanticity(self) -> float:
        """1 - MonoScore: high when the unit's top images are dissimilar."""
        return 1.0 - self.mono_score

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return {
            "k": self.k,
            "sizes": list(self.sizes),
            "members": [m.tolist() for m in self.members],
            "representatives": [r.tolist() for r in self.representatives],
            "silhouette": self.silhouette,
            "mono_score": self.mono_score,
            "polysemanticity": self.polysemanticity,
            "separation": self.separation,
        }


def unit_measures(
    cluster_codes: np.ndarray,
    independent_embedding: np.ndarray,
    activations: np.ndarray,
    *,
    seed: int,
    k: int | Literal["auto"] = "auto",
    m: int = 15,
    embedding: Literal["tsne", "pca", "umap"] = "tsne",
) -> UnitMeasures:
    """Cluster one unit's top images into facets and measure how multifaceted it is.

    Row r of `cluster_codes` (the codes the paper clusters), `independent_embedding` (another
    network's codes of the same image) and `activations` (the unit's) is one image. Facets are
    those of `find_facets` after its near-duplicate merging (auto k merges by default); their
    members are row indices. The silhouette is taken in the space k-means ran in (the t-SNE or
    UMAP map, or the PCA codes for embedding "pca"); MonoScore (weights: `activations`, see
    `mono_score`) and the separation ratio in the independent embedding.
    """
    codes = _matrix(cluster_codes, "cluster_codes")
    other = _matrix(independent_embedding, "independent_embedding")
    if other.shape[0] != codes.shape[0]:
        raise MfvError(f"independent_embedding has {other.shape[0]} rows, cluster_codes "
                       f"{codes.shape[0]}: they must describe the same images")
    result = find_facets(codes, activations,
                         options=FacetOptions(k=k, m=m, embedding=embedding, seed=seed))
    labels = np.empty(codes.shape[0], dtype=np.int64)
    labels[result.selected] = result.assignment
    sil = float("nan")
    if len(result.facets) > 1:
        space = result.coords_2d
        if embedding == "pca":  # k-means ran on the PCA codes, not their first two components
            dims = int(result.settings["pca_dims"])
            space = PCA(n_components=dims, random_state=seed).fit_transform(codes)
        sil = silhouette(space, labels)
    return UnitMeasures(
        k=len(result.facets),
        sizes=[f.size for f in result.facets],
        members=[f.members.copy() for f in result.facets],
        representatives=[f.representatives.copy() for f in result.facets],
        silhouette=sil,
        mono_score=mono_score(other, activations),
        separation=separation_ratio(other, labels),
    )


def measure_set(task: tuple) -> dict:
    """One set of items measured (a unit of the layer study, a constructed unit or a chance
    set): `task` = (cluster codes, independent codes, activations or None, seed, m, embedding,
    label). Without activations (a random set) a ramp from 2 to 1 stands in for the clustering
    (it only orders the facets) and MonoScore weighs all items equally. Members and
    representatives are row indices of the set. A plain function of plain values, so it runs
    in any process."""
    codes, other, values, seed, m, embedding, label = task
    chance = values is None
    acts = np.linspace(2.0, 1.0, len(codes)) if chance else values
    try:
        doc = unit_measures(codes, other, acts, seed=seed, m=m, embedding=embedding).to_dict()
    except MfvError as error:  # the message names the unit it is about
        raise MfvError(f"{label}: {error}") from None
    if chance:
        doc["mono_score"] = mono_score(other)
        doc["polysemanticity"] = 1.0 - doc["mono_score"]
    return doc


PARALLEL_MIN = 5000  # rows in all tasks together below which they run in this process:
# starting the workers costs seconds (a few hundred small clusterings)


def parallel_map(func: Callable[[Any], Any], tasks: Sequence[Any],
                 processes: int | None = None, size: int | None = None,
                 setup: Callable[[], None] | None = None,
                 min_size: int = PARALLEL_MIN) -> Iterator[Any]:
    """`map(func, tasks)` in order, over one process per core (forkserver: no inherited
    threads), or in this process for little work (`size`, e.g. the rows of all tasks, below
    `min_size`) or one core. Each task runs single-threaded (`find_facets` caps its
    threads; `setup`, run once in each worker process, can cap others), so the cores are used
    by processes, not threads. As with any forkserver pool, a script that calls it must guard
    its top level with `if __name__ == "__main__":`."""
    processes = processes or len(os.sched_getaffinity(0))
    if processes < 2 or len(tasks) < 2 or (size if size is not None else len(tasks)) \
            < min_size:
        yield from map(func, tasks)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([func.__module__])
    with context.Pool(min(processes, len(tasks)), initializer=setup) as pool:
        yield from pool.imap(func, tasks, chunksize=1)

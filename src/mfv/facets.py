"""Facets of one target: cluster the codes of its activating images (paper Algorithm 1, steps 2-5b).

Pipeline (paper): codes -> PCA to 50 dims -> t-SNE to 2-D -> k-means (k clusters) on the 2-D map ->
facets ranked by size, largest first -> per facet the m images nearest its centre in the 2-D map ->
their pixel mean (the start image of activation maximization).

Options beyond the paper, all recorded in ``FacetResult.settings``:

* ``k="auto"``: k is chosen in ``k_range`` by the mean silhouette of k-means on the clustering
  space (the t-SNE map by default). Silhouette rewards compact, well separated clusters, which
  t-SNE produces for real facets; because cutting one round blob into more pieces gives a flat
  or falling score, the smallest k within ``AUTO_K_TOLERANCE`` of the best score is taken, so a
  neuron with 2-3 real facets does not get 10 near-duplicates. Silhouette cannot score k=1;
  near-duplicate facets that remain are handled by merging.
* ``merge``: facets whose centres are near-duplicates are merged (default: on for auto k, off for
  a fixed k as in the paper). In the PCA code space, the separation of two facets a and b is
  ``r = |mu_a - mu_b| / sqrt((s_a^2 + s_b^2) / 2)``, where ``s^2`` is the mean squared distance of
  a facet's members to its centre (its RMS radius). The closest pair is merged while
  ``r < merge_threshold`` (default 0.5). Measured: pieces of one isotropic 1280-D blob 0.2-0.45;
  facets auto-chosen within one Imagenette class (EfficientNet-Lite0 penultimate codes) 0.5-0.95;
  two different classes 1.1-1.3. The ratio is scale free, so it does not depend on the layer's
  activation scale. A merged facet's centre is the mean of all its members.
* ``min_size``: a cluster with fewer members is dissolved, each member going to the nearest other
  centre in the clustering space (smallest clusters first).
* ``embedding``: "tsne" (paper; openTSNE, else scikit-learn), "pca" (k-means on the PCA codes;
  the 2-D map shown is the first two principal components), "umap" (needs umap-learn).

t-SNE: perplexity 30 (clamped to (n-1)/3 for small n), 1000 iterations (250 with early
exaggeration), Barnes-Hut gradients, PCA initialization, seeded. Above 5,000 images the run time
is bounded with openTSNE's FFT-accelerated gradients and 500 iterations (250 + 250): on 10,000
codes and 2 busy cores that is about 35 s instead of 85 s. `n_jobs` also caps BLAS/OpenMP threads
(threadpoolctl): on an oversubscribed machine extra threads make k-means up to 50x slower.

Degenerate input: a dead target (no positive activation, or all activations equal) and a fixed k
larger than the number of images are errors. Codes with fewer distinct rows than k are not: k is
lowered to the number of distinct codes with a warning, so identical codes give one facet.
"""

from __future__ import annotations

import importlib
import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from mfv.errors import MfvError

EMBEDDINGS = ("tsne", "pca", "umap")
POLICIES = ("class", "top", "auto")
AUTO_K_TOLERANCE = 0.02  # silhouette points: prefer fewer facets when scores are this close
SILHOUETTE_SAMPLE = 4000  # silhouette on at most this many points (seeded sample) for speed
LARGE_N = 5000  # above this, t-SNE uses FFT gradients and a shorter schedule
TSNE_ITER_SMALL = 1000  # total iterations (250 early exaggeration + 750), as scikit-learn/paper
TSNE_ITER_LARGE = 500  # total iterations (250 + 250) for n > LARGE_N, to bound the run time
EARLY_EXAGGERATION_ITER = 250


@dataclass
class Facet:
    """One facet: a cluster of images, as indices into the original image list."""

    rank: int  # 0 = largest
    members: np.ndarray  # original indices of all members, in selection order
    representatives: np.ndarray  # the (up to) m members nearest the centre, nearest first
    centre_2d: np.ndarray  # (2,) mean 2-D map position of the members
    code_centre: np.ndarray  # (D,) mean code of the members
    code_spread: float  # mean squared distance of the members' codes to the centre
    activation_mean: float
    activation_max: float

    @property
    def size(self) -> int:
        return int(len(self.members))


@dataclass
class FacetResult:
    """Facets of one target plus what is needed to plot and reproduce them."""

    facets: list[Facet]
    coords_2d: np.ndarray  # (n_selected, 2) 2-D map, rows in the order of `selected`
    selected: np.ndarray  # (n_selected,) original indices of the clustered images
    assignment: np.ndarray  # (n_selected,) facet rank of each selected image
    k_requested: int | str
    k_chosen: int  # k used by k-means (before min-size dissolving and merging)
    settings: dict[str, Any] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)  # silhouette per k (auto k only)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


# --------------------------------------------------------------------------- selection


def select_images(
    activations: np.ndarray,
    labels: np.ndarray | None = None,
    class_index: int | None = None,
    policy: Literal["class", "top", "auto"] = "auto",
    top_n: int = 200,
    *,
    name: str = "target",
) -> np.ndarray:
    """Indices of the images that form U, the set to cluster.

    "class": every image whose label is `class_index` (paper, class neurons). "top": the `top_n`
    images with the highest activation among those with a positive one (hidden units); ties go to
    the lower index. "auto": "class" when labels and a class index are given and the class has
    images, else "top".
    """
    acts = np.asarray(activations, dtype=np.float64)
    if acts.ndim != 1:
        raise MfvError(f"activations must be a 1-D array, got shape {acts.shape}")
    if policy not in POLICIES:
        raise MfvError(f"unknown selection policy {policy!r}; use one of {', '.join(POLICIES)}")
    has_class = labels is not None and class_index is not None
    if has_class:
        labels = np.asarray(labels)
        if labels.shape != acts.shape:
            raise MfvError(f"labels shape {labels.shape} does not match activations {acts.shape}")
    if policy == "auto":
        policy = "class" if has_class and np.any(labels == class_index) else "top"
    if policy == "class":
        if not has_class:
            raise MfvError(
                f"selection policy 'class' for {name} needs image labels and a class index; "
                "use policy 'top' for hidden units or unlabelled images"
            )
        chosen = np.flatnonzero(labels == class_index)
        if chosen.size == 0:
            raise MfvError(
                f"no image has the class of {name} (class index {class_index}); add images of "
                "that class or use the 'top' policy"
            )
        return chosen.astype(np.int64)
    if top_n < 1:
        raise MfvError(f"top_n must be at least 1, got {top_n}")
    positive = np.flatnonzero(np.isfinite(acts) & (acts > 0))
    if positive.size == 0:
        raise MfvError(f"no image activates {name}: no activation is positive")
    order = np.lexsort((positive, -acts[positive]))  # highest first, ties to the lower index
    return positive[order[:top_n]].astype(np.int64)


# --------------------------------------------------------------------------- facets


@dataclass(frozen=True)
class FacetOptions:
    """How a target's facets are found (the run's settings of the facets stage)."""

    selection: str = "auto"
    top_n: int = 200
    k: int | str = 10
    m: int = 15
    embedding: str = "tsne"
    merge: bool | None = None
    min_size: int = 1
    seed: int = 0


def facets_of_target(activations: np.ndarray, codes: np.ndarray, valid: np.ndarray,
                     labels: np.ndarray | None, classes: tuple[int, ...],
                     options: FacetOptions, name: str = "target") -> FacetResult:
    """The facets of one target over a scanned collection.

    `activations` (N,) hold the target on every image (NaN where unknown), `codes` (N, D) the
    images' codes, `valid` (N,) which images decoded, `labels` (N,) their class indices (or
    None), `classes` the classes whose images drive the target (its positively weighted class
    logits). Selection follows the paper: all images of the class for a class neuron (for a sum
    of class logits, of any of its classes), the top-N for other units.
    """
    in_class = None
    if labels is not None and classes:
        in_class = (np.isin(labels, classes) & valid).astype(np.int64)
    if options.selection == "class" and (in_class is None or not in_class.any()):
        listed = ", ".join(map(str, classes)) or "none"
        raise MfvError(f"--selection class: no readable image of the source is labelled with "
                       f"the class(es) of {name!r} (class indices: {listed}); label folders by "
                       "WordNet id or class name, or use --selection top")
    chosen = select_images(activations, in_class, 1 if in_class is not None else None,
                           options.selection, options.top_n, name=name)
    chosen = chosen[valid[chosen]]
    result = find_facets(codes, np.nan_to_num(activations, nan=0.0), chosen, k=options.k,
                         m=options.m, embedding=options.embedding, merge=options.merge,
                         min_size=options.min_size, seed=options.seed, name=name)
    by_class = (in_class is not None and options.selection != "top"
                and bool(np.all(in_class[chosen] == 1)))
    result.settings["selection_policy"] = "class" if by_class else "top"
    result.settings["selection_classes"] = list(classes) if by_class else []
    return result




def find_facets(
    codes: np.ndarray,
    activations: np.ndarray,
    indices: np.ndarray | Sequence[int] | None = None,
    *,
    k: int | Literal["auto"] = 10,
    m: int = 15,
    embedding: Literal["tsne", "pca", "umap"] = "tsne",
    merge: bool | None = None,
    merge_threshold: float = 0.5,
    min_size: int = 1,
    k_range: tuple[int, int] = (2, 10),
    perplexity: float = 30.0,
    pca_dims: int = 50,
    tsne_iter: int | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    name: str = "target",
) -> FacetResult:
    """Cluster the selected images of one target into facets (same inputs, seed and n_jobs give
    identical facets).

    `codes` (N, D) and `activations` (N,) hold one row per image of the original list; `indices`
    picks the rows to cluster (default: all), and facet members are reported as these row
    indices. `name` is the target as the user wrote it, for messages. `tsne_iter` is the total
    number of t-SNE iterations including 250 of early exaggeration (default 1000, or 500 with FFT
    gradients above 5,000 images).
    """
    t_start = time.perf_counter()
    codes = np.asarray(codes)
    acts_all = np.asarray(activations, dtype=np.float64)
    _check_args(codes, acts_all, k, m, embedding, merge_threshold, min_size, k_range, pca_dims)
    selected = _check_indices(indices, codes.shape[0])
    n = selected.size
    x = np.asarray(codes[selected], dtype=np.float64)
    acts = acts_all[selected]
    if not np.all(np.isfinite(x)):
        raise MfvError(f"the codes of the images selected for {name} contain NaN or inf")
    if n == 0:
        raise MfvError(f"no image was selected for {name}")
    if not np.all(np.isfinite(acts)) or acts.max() <= 0 or np.ptp(acts) == 0:
        raise MfvError(
            f"no image activates {name}: over the {n} selected images the activation ranges "
            f"from {acts.min():.4g} to {acts.max():.4g}; pick another target or more images"
        )
    if k != "auto" and k > n:
        raise MfvError(
            f"{name}: asked for {k} facets but only {n} images were selected; lower --facets "
            "or use --facets auto"
        )
    k = "auto" if k == "auto" else int(k)
    do_merge = (k == "auto") if merge is None else bool(merge)
    notes: list[str] = []
    settings: dict[str, Any] = {
        "name": name,
        "n_selected": int(n),
        "k_requested": k,
        "k_range": list(k_range),
        "m": m,
        "embedding": embedding,
        "merge": do_merge,
        "merge_threshold": merge_threshold,
        "min_size": min_size,
        "seed": seed,
        "n_jobs": n_jobs,
    }
    timings: dict[str, float] = {}

    # Cap BLAS/OpenMP threads: on a busy machine k-means' spinning OpenMP threads run 50x slower.
    with threadpool_limits(limits=None if n_jobs < 0 else n_jobs):
        clustering = _cluster(x, k, _Embedding(embedding, perplexity, pca_dims, tsne_iter, seed,
                                               n_jobs), k_range, name)
    settings.update(clustering.info)
    notes += clustering.notes
    timings.update(clustering.timings)
    labels, space, reduced, coords = (clustering.labels, clustering.space, clustering.reduced,
                                      clustering.coords)
    k_chosen, scores = clustering.k_chosen, clustering.scores

    t = time.perf_counter()
    labels, dissolved = _dissolve_small(labels, space, min_size)
    merges: list[dict[str, Any]] = []
    if do_merge:
        labels, merges = _merge_close(labels, reduced, merge_threshold)
    timings["merge"] = time.perf_counter() - t
    settings["dissolved"] = dissolved
    settings["merges"] = merges
    settings["notes"] = notes

    facets, assignment = _build_facets(labels, space, coords, x, acts, selected, m)
    timings["total"] = time.perf_counter() - t_start
    return FacetResult(
        facets=facets,
        coords_2d=coords.astype(np.float64),
        selected=selected,
        assignment=assignment,
        k_requested=k,
        k_chosen=int(k_chosen),
        settings=settings,
        scores=scores,
        timings=timings,
    )


@dataclass(frozen=True)
class _Embedding:
    """How the codes are embedded before k-means (PCA dims, then the 2-D map)."""

    kind: str
    perplexity: float
    pca_dims: int
    tsne_iter: int | None
    seed: int
    n_jobs: int


@dataclass
class _Clustering:
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


def _cluster(x: np.ndarray, k: int | str, how: _Embedding, k_range: tuple[int, int],
             name: str) -> _Clustering:
    """PCA, embedding and k-means (fixed or auto k) of the selected codes."""
    n = x.shape[0]
    info: dict[str, Any] = {}
    notes: list[str] = []
    timings: dict[str, float] = {}

    def note(msg: str) -> None:
        warnings.warn(msg, stacklevel=4)
        notes.append(msg)

    t = time.perf_counter()
    n_distinct = int(np.unique(x, axis=0).shape[0])
    timings["distinct"] = time.perf_counter() - t
    info["n_distinct_codes"] = n_distinct
    if n_distinct == 1:
        note(f"all {n} codes of {name} are identical: returning a single facet")
        info["embedding_used"] = "none (identical codes)"
        zeros = np.zeros((n, 1))
        return _Clustering(np.zeros(n, dtype=np.int64), zeros, zeros, np.zeros((n, 2)), 1,
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
        labels = _kmeans(space, k_chosen, how.seed)
    timings["kmeans"] = time.perf_counter() - t
    return _Clustering(labels, space, reduced, coords, k_chosen, scores, info, notes, timings)


def _check_args(codes, acts, k, m, embedding, merge_threshold, min_size, k_range, pca_dims):
    if codes.ndim != 2:
        raise MfvError(f"codes must be a 2-D array (images x features), got shape {codes.shape}")
    if acts.shape != (codes.shape[0],):
        raise MfvError(
            f"activations shape {acts.shape} does not match the {codes.shape[0]} rows of codes"
        )
    if k != "auto" and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise MfvError(f"the number of facets must be a positive integer or 'auto', got {k!r}")
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise MfvError(f"m (images per mean image) must be a positive integer, got {m!r}")
    if embedding not in EMBEDDINGS:
        raise MfvError(f"unknown embedding {embedding!r}; use one of {', '.join(EMBEDDINGS)}")
    if not merge_threshold >= 0:
        raise MfvError(f"merge_threshold must be >= 0, got {merge_threshold!r}")
    if min_size < 1:
        raise MfvError(f"min_size must be at least 1, got {min_size}")
    if len(k_range) != 2 or not 2 <= k_range[0] <= k_range[1]:
        raise MfvError(f"k_range must be (low, high) with 2 <= low <= high, got {k_range!r}")
    if pca_dims < 2:
        raise MfvError(f"pca_dims must be at least 2, got {pca_dims}")


def _check_indices(indices, n_rows: int) -> np.ndarray:
    if indices is None:
        return np.arange(n_rows, dtype=np.int64)
    sel = np.asarray(indices)
    if sel.ndim != 1 or (sel.size and not np.issubdtype(sel.dtype, np.integer)):
        raise MfvError("indices must be a 1-D array of integer row indices")
    sel = sel.astype(np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= n_rows):
        raise MfvError(f"indices must lie in 0..{n_rows - 1}")
    if np.unique(sel).size != sel.size:
        raise MfvError("indices contain duplicates")
    return sel


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
    coords = _tsne(reduced, perplexity, tsne_iter, seed, n_jobs, settings)
    return coords, coords


def _tsne(reduced, perplexity, tsne_iter, seed, n_jobs, settings) -> np.ndarray:
    """2-D t-SNE, openTSNE when installed (fast), else scikit-learn's Barnes-Hut t-SNE."""
    n = reduced.shape[0]
    perp = float(min(perplexity, max((n - 1) / 3.0, 0.5)))
    large = n > LARGE_N
    total = tsne_iter or (TSNE_ITER_LARGE if large else TSNE_ITER_SMALL)
    ee = min(EARLY_EXAGGERATION_ITER, total // 2)
    settings.update(perplexity=perplexity, perplexity_used=perp, tsne_iter=total)
    try:
        from openTSNE import TSNE
    except ImportError:
        TSNE = None  # noqa: N806
    if TSNE is not None:
        method = "fft" if large else "bh"
        settings.update(embedding_used="tsne (openTSNE)", tsne_gradient=method)
        est = TSNE(
            n_components=2,
            perplexity=perp,
            early_exaggeration_iter=ee,
            n_iter=total - ee,
            negative_gradient_method=method,
            random_state=seed,
            n_jobs=n_jobs,
        )
        return np.asarray(est.fit(reduced), dtype=np.float64)
    from sklearn.manifold import TSNE as SkTSNE  # noqa: N811

    iter_arg = "max_iter" if "max_iter" in inspect.signature(SkTSNE).parameters else "n_iter"
    settings.update(embedding_used="tsne (scikit-learn)", tsne_gradient="bh")
    est = SkTSNE(
        n_components=2,
        perplexity=perp,
        init="pca",
        learning_rate="auto",
        random_state=seed,
        n_jobs=n_jobs,
        **{iter_arg: max(total, 250)},
    )
    return np.asarray(est.fit_transform(reduced), dtype=np.float64)


def _kmeans(space: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k == 1:
        return np.zeros(space.shape[0], dtype=np.int64)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    return km.fit_predict(space).astype(np.int64)


def _auto_k(space, lo, hi, seed, settings) -> tuple[np.ndarray, int, dict[int, float]]:
    """k-means for every k in lo..hi; keep the smallest k whose silhouette is near the best."""
    n = space.shape[0]
    sample = None if n <= SILHOUETTE_SAMPLE else SILHOUETTE_SAMPLE
    settings.update(auto_k="silhouette", auto_k_tolerance=AUTO_K_TOLERANCE)
    settings["silhouette_sample"] = sample
    runs: dict[int, np.ndarray] = {}
    scores: dict[int, float] = {}
    for kk in range(lo, hi + 1):
        labels = _kmeans(space, kk, seed)
        runs[kk] = labels
        if np.unique(labels).size < 2:
            scores[kk] = -1.0
            continue
        score = silhouette_score(space, labels, sample_size=sample, random_state=seed)
        scores[kk] = float(score)
    best = max(scores.values())
    k_chosen = min(kk for kk, s in scores.items() if s >= best - AUTO_K_TOLERANCE)
    return runs[k_chosen], k_chosen, scores


def _centres(labels: np.ndarray, space: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): space[labels == c].mean(axis=0) for c in np.unique(labels)}


def _dissolve_small(labels, space, min_size) -> tuple[np.ndarray, list[dict[str, int]]]:
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


def _merge_close(labels, reduced, threshold) -> tuple[np.ndarray, list[dict[str, Any]]]:
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


def _build_facets(labels, space, coords, x, acts, selected, m) -> tuple[list[Facet], np.ndarray]:
    """Rank clusters by size (then mean activation, then first member) and describe each."""
    ids = np.unique(labels)
    keys = []
    for c in ids:
        rows = np.flatnonzero(labels == c)
        keys.append((-rows.size, -float(acts[rows].mean()), int(rows[0]), int(c)))
    keys.sort()
    assignment = np.empty(labels.size, dtype=np.int64)
    facets: list[Facet] = []
    for rank, key in enumerate(keys):
        rows = np.flatnonzero(labels == key[3])
        assignment[rows] = rank
        centre = space[rows].mean(axis=0)
        dist = ((space[rows] - centre) ** 2).sum(axis=1)
        nearest = rows[np.lexsort((rows, dist))[:m]]
        facets.append(
            Facet(
                rank=rank,
                members=selected[rows],
                representatives=selected[nearest],
                centre_2d=coords[rows].mean(axis=0).astype(np.float64),
                code_centre=x[rows].mean(axis=0).astype(np.float32),
                code_spread=float(((x[rows] - x[rows].mean(axis=0)) ** 2).sum(axis=1).mean()),
                activation_mean=float(acts[rows].mean()),
                activation_max=float(acts[rows].max()),
            )
        )
    return facets, assignment


# --------------------------------------------------------------------------- mean images


def mean_image(images: np.ndarray) -> np.ndarray:
    """Plain pixel-wise mean of (m, H, W, 3) images, uint8 or float in 0..255, as float32."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise MfvError(f"mean_image needs an (m, H, W, 3) array with m >= 1, got {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise MfvError("mean_image needs finite numeric pixel values")
        if arr.min() < 0 or arr.max() > 255:
            raise MfvError(
                f"mean_image expects pixels in 0..255, got {arr.min():.4g}..{arr.max():.4g}"
            )
    return arr.mean(axis=0, dtype=np.float64).astype(np.float32)


def facet_means(result: FacetResult, pixels: Callable[[np.ndarray], np.ndarray]
                ) -> list[np.ndarray]:
    """The mean image of each facet's representatives; `pixels(indices)` gives their (m, H, W, 3)
    images in 0..255, resized as the run says."""
    return [mean_image(pixels(f.representatives)) for f in result.facets]

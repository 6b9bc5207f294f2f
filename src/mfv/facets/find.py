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

Degenerate input: activations that are not numbers and a fixed k larger than the number of
images are errors; a target negative on every image is ranked by value like any other. Codes
with fewer distinct rows than k are not: k is lowered to the number of distinct codes with a
warning, so identical codes give one facet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from threadpoolctl import threadpool_limits

from mfv.core.errors import MfvError
from mfv.facets.cluster import Embedding, cluster, dissolve_small, merge_close
from mfv.facets.options import POLICIES, FacetOptions

log = logging.getLogger(__name__)


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
    # patch facets (`mfv.facets.patches`): each selected image's crop (top, left, height,
    # width) in the scanned frame, rows in the order of `selected`; None for whole photos
    boxes: np.ndarray | None = None

    @property
    def unit_side(self) -> int | None:
        """The side (px) of the crops patch facets were made of: the scale at which the unit saw
        them and reads its pictures (`mfv.render.objective.unit_view`); None for whole photos."""
        side = self.settings.get("patch_side")
        return int(side) if self.boxes is not None and side is not None else None

    def box_of(self, index: int) -> tuple[int, int, int, int] | None:
        """The crop of original image `index` that was clustered, or None (whole photo)."""
        if self.boxes is None:
            return None
        row = np.flatnonzero(self.selected == index)
        return tuple(int(v) for v in self.boxes[row[0]]) if row.size else None


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
    images with the highest activation, whatever its sign (a unit negative on every image is
    ranked too, with a warning); ties go to the lower index. "auto": "class" when labels and a
    class index are given and the class has images, else "top".
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
    known = np.flatnonzero(np.isfinite(acts))
    if known.size == 0:
        raise MfvError(f"no activation of {name} is a number (every image is NaN or inf)")
    order = np.lexsort((known, -acts[known]))  # highest first, whatever the sign; ties: lower
    chosen = known[order[:top_n]].astype(np.int64)
    if acts[chosen[0]] <= 0:
        log.warning("every activation of %s is <= 0 (at most %.4g): its facets are of the "
                    "images that drive it least negatively", name, acts[chosen[0]])
    return chosen


# --------------------------------------------------------------------------- facets


def facets_of_target(activations: np.ndarray,
                     codes: np.ndarray | Callable[[np.ndarray], np.ndarray], valid: np.ndarray,
                     labels: np.ndarray | None, classes: tuple[int, ...],
                     options: FacetOptions, name: str = "target") -> FacetResult:
    """The facets of one target over a scanned collection.

    `activations` (N,) hold the target on every image (NaN where unknown), `codes` (N, D) the
    images' codes (or a function giving the (n, D) codes of the selected images, e.g. of their
    patches), `valid` (N,) which images decoded, `labels` (N,) their class indices (or None),
    `classes` the classes whose images drive the target (its positively weighted class
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
    acts = np.nan_to_num(activations, nan=0.0)
    if callable(codes):  # codes of the selected images only: cluster them, then re-index
        result = _reindexed(find_facets(codes(chosen), acts[chosen], None, options, name=name),
                            chosen)
    else:
        result = find_facets(codes, acts, chosen, options, name=name)
    by_class = (in_class is not None and options.selection != "top"
                and bool(np.all(in_class[chosen] == 1)))
    result.settings["selection_policy"] = "class" if by_class else "top"
    result.settings["selection_classes"] = list(classes) if by_class else []
    return result


def _reindexed(result: FacetResult, rows: np.ndarray) -> FacetResult:
    """A clustering of `rows` of a collection, its indices (0..n-1) turned into those rows."""
    for f in result.facets:
        f.members, f.representatives = rows[f.members], rows[f.representatives]
    result.selected = rows[result.selected]
    return result


def find_facets(codes: np.ndarray, activations: np.ndarray,
                indices: np.ndarray | Sequence[int] | None = None,
                options: FacetOptions | None = None, *, name: str = "target",
                n_jobs: int = 1) -> FacetResult:
    """Cluster the selected images of one target into facets as `options` say (same inputs,
    options and n_jobs give identical facets).

    `codes` (N, D) and `activations` (N,) hold one row per image of the original list; `indices`
    picks the rows to cluster (default: all), and facet members are reported as these row
    indices. `name` is the target as the user wrote it, for messages; `n_jobs` caps the
    threads.
    """
    o = options or FacetOptions()
    k, m, merge_threshold, k_range = o.k, o.m, o.merge_threshold, o.k_range
    t_start = time.perf_counter()
    codes = np.asarray(codes)
    acts_all = np.asarray(activations, dtype=np.float64)
    _check_arrays(codes, acts_all)
    selected = _check_indices(indices, codes.shape[0])
    n = selected.size
    x = np.asarray(codes[selected], dtype=np.float64)
    acts = acts_all[selected]
    if not np.all(np.isfinite(x)):
        raise MfvError(f"the codes of the images selected for {name} contain NaN or inf")
    if n == 0:
        raise MfvError(f"no image was selected for {name}")
    if not np.all(np.isfinite(acts)):
        raise MfvError(f"the activations of the images selected for {name} contain NaN or inf")
    if k != "auto" and k > n:
        raise MfvError(
            f"{name}: asked for {k} facets but only {n} "
            f"{'image was' if n == 1 else 'images were'} selected; lower --facets or use "
            "--facets auto"
        )
    k = "auto" if k == "auto" else int(k)
    do_merge = (k == "auto") if o.merge is None else o.merge
    notes: list[str] = []
    settings: dict[str, Any] = {
        "name": name,
        "n_selected": int(n),
        "k_requested": k,
        "k_range": list(k_range),
        "m": m,
        "embedding": o.embedding,
        "merge": do_merge,
        "merge_threshold": merge_threshold,
        "min_size": o.min_size,
        "seed": o.seed,
        "n_jobs": n_jobs,
    }
    timings: dict[str, float] = {}

    # Cap BLAS/OpenMP threads: on a busy machine k-means' spinning OpenMP threads run 50x slower.
    with threadpool_limits(limits=None if n_jobs < 0 else n_jobs):
        clustering = cluster(x, k, Embedding(o.embedding, o.perplexity, o.pca_dims, o.tsne_iter,
                                             o.seed, n_jobs), k_range, name)
    settings.update(clustering.info)
    notes += clustering.notes
    timings.update(clustering.timings)
    labels, space, reduced, coords = (clustering.labels, clustering.space, clustering.reduced,
                                      clustering.coords)
    k_chosen, scores = clustering.k_chosen, clustering.scores

    t = time.perf_counter()
    labels, dissolved = dissolve_small(labels, space, o.min_size)
    merges: list[dict[str, Any]] = []
    if do_merge:
        labels, merges = merge_close(labels, reduced, merge_threshold)
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


def _check_arrays(codes: np.ndarray, acts: np.ndarray) -> None:
    if codes.ndim != 2:
        raise MfvError(f"codes must be a 2-D array (images x features), got shape {codes.shape}")
    if acts.shape != (codes.shape[0],):
        raise MfvError(
            f"activations shape {acts.shape} does not match the {codes.shape[0]} rows of codes"
        )


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

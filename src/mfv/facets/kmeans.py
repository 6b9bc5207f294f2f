"""k-means and the silhouette for the small sets mfv clusters (a unit's top N in a 2-D map),
compiled: scikit-learn's algorithms (greedy k-means++ seeding, Lloyd's iterations to its
tolerance, the best of `n_init` runs; the exact silhouette, or its seeded sample) drawing the
same random numbers, so the labels are scikit-learn's, without its per-call overhead, which
was most of auto-k's time (nine k-means of ten runs each per set).
"""

from __future__ import annotations

import numpy as np

from mfv.core.jit import jit

N_INIT = 10
MAX_ITER = 300
TOL = 1e-4  # of the mean per-dimension variance, as scikit-learn's `tol`


def kmeans(space: np.ndarray, k: int, seed: int, n_init: int = N_INIT) -> np.ndarray:
    """Labels (int64) of `KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    .fit_predict(space)`: the same seeding draws, the same convergence rule and choice of run
    (with more clusters than distinct points the runs tie but for rounding: the same
    partition, perhaps renamed)."""
    x = np.array(space, dtype=np.float64, order="C")
    if k <= 1:
        return np.zeros(x.shape[0], np.int64)
    x -= x.mean(axis=0)  # as scikit-learn, for accurate distances
    trials = 2 + int(np.log(k))
    # scikit-learn's draws, in its order: per run, the first centre's, then `trials` per centre
    draws = np.random.RandomState(seed).random_sample(n_init * (1 + (k - 1) * trials))
    tol = float(np.mean(np.var(x, axis=0)) * TOL)
    return _best_of_runs(x, k, trials, draws.reshape(n_init, -1), tol, MAX_ITER)


def silhouette(space: np.ndarray, labels: np.ndarray, sample: int | None = None,
               seed: int = 0) -> float:
    """Mean silhouette (Euclidean) as `sklearn.metrics.silhouette_score(space, labels,
    sample_size=sample, random_state=seed)`; ValueError unless 2 <= k <= n - 1."""
    x = np.array(space, dtype=np.float64, order="C")
    lab = np.asarray(labels)
    if sample is not None:
        rows = np.random.RandomState(seed).permutation(x.shape[0])[:sample]
        x, lab = x[rows], lab[rows]
    _, codes = np.unique(lab, return_inverse=True)
    k = int(codes.max()) + 1 if codes.size else 0
    if not 2 <= k <= x.shape[0] - 1:
        raise ValueError(f"the silhouette needs 2 to n - 1 clusters; got {k} for n = "
                         f"{x.shape[0]}")
    return float(_silhouette(x, codes.astype(np.int64), k))


@jit()
def _sq_dist(x, i, c):
    s = 0.0
    for d in range(x.shape[1]):
        t = x[i, d] - c[d]
        s += t * t
    return s


@jit()
def _seed_centres(x, k, trials, draws):
    """Greedy k-means++ (scikit-learn's `_kmeans_plusplus`, unit weights) from `draws`."""
    n = x.shape[0]
    centres = np.empty((k, x.shape[1]))
    cdf = np.cumsum(np.full(n, 1.0 / n))
    cdf /= cdf[-1]
    first = min(np.searchsorted(cdf, draws[0], side="right"), n - 1)
    centres[0] = x[first]
    closest = np.empty(n)
    for i in range(n):
        closest[i] = _sq_dist(x, i, centres[0])
    pot = closest.sum()
    cand = np.empty(n)
    best_d = np.empty(n)
    for c in range(1, k):
        cum = np.cumsum(closest)
        best_pot, best_id = np.inf, 0
        for t in range(trials):
            cid = min(np.searchsorted(cum, draws[1 + (c - 1) * trials + t] * pot), n - 1)
            p = 0.0
            for i in range(n):
                cand[i] = min(closest[i], _sq_dist(x, i, x[cid]))
                p += cand[i]
            if p < best_pot:
                best_pot, best_id = p, cid
                best_d[:] = cand
        centres[c] = x[best_id]
        pot = best_pot
        closest[:] = best_d
    return centres


@jit()
def _assign(x, centres, labels):
    """Nearest centre per point (ties to the lower index); returns the inertia."""
    inertia = 0.0
    for i in range(x.shape[0]):
        best, arg = np.inf, 0
        for j in range(centres.shape[0]):
            d = _sq_dist(x, i, centres[j])
            if d < best:
                best, arg = d, j
        labels[i] = arg
        inertia += best
    return inertia


@jit()
def _update(x, labels, old, new):
    """Means of the clusters into `new` (an empty cluster takes the point farthest from its
    centre, as scikit-learn relocates it); returns the summed squared centre shift."""
    k, dims = old.shape
    weight = np.zeros(k)
    new[:] = 0.0
    for i in range(x.shape[0]):
        new[labels[i]] += x[i]
        weight[labels[i]] += 1.0
    empty = np.flatnonzero(weight == 0)
    if empty.size:
        far = np.empty(x.shape[0])
        for i in range(x.shape[0]):
            far[i] = _sq_dist(x, i, old[labels[i]])
        if far.max() > 0:
            order = np.argsort(-far, kind="mergesort")
            for e in range(empty.size):
                i = order[e]
                new[labels[i]] -= x[i]
                new[empty[e]] = x[i]
                weight[empty[e]] = 1.0
                weight[labels[i]] -= 1.0
    shift = 0.0
    for j in range(k):
        if weight[j] > 0:
            new[j] /= weight[j]
        for d in range(dims):
            t = new[j, d] - old[j, d]
            shift += t * t
    return shift


@jit()
def _lloyd(x, centres, tol, max_iter):
    """scikit-learn's `_kmeans_single_lloyd`: (labels, inertia)."""
    n = x.shape[0]
    labels = np.full(n, -1, np.int64)
    previous = labels.copy()
    new = np.empty_like(centres)
    strict = False
    for _ in range(max_iter):
        _assign(x, centres, labels)
        shift = _update(x, labels, centres, new)
        centres, new = new, centres
        if np.array_equal(labels, previous):
            strict = True
            break
        if shift <= tol:
            break
        previous[:] = labels
    if not strict:  # labels of the last centres, as scikit-learn's final E-step
        return labels, _assign(x, centres, labels)
    inertia = 0.0
    for i in range(n):
        inertia += _sq_dist(x, i, centres[labels[i]])
    return labels, inertia


@jit()
def _same_clustering(a, b, k):
    mapping = np.full(k, -1, np.int64)
    for i in range(a.shape[0]):
        if mapping[a[i]] == -1:
            mapping[a[i]] = b[i]
        elif mapping[a[i]] != b[i]:
            return False
    return True


@jit()
def _best_of_runs(x, k, trials, draws, tol, max_iter):
    best = np.zeros(x.shape[0], np.int64)
    best_inertia = np.inf
    for r in range(draws.shape[0]):
        labels, inertia = _lloyd(x, _seed_centres(x, k, trials, draws[r]), tol, max_iter)
        if r == 0 or (inertia < best_inertia and not _same_clustering(labels, best, k)):
            best, best_inertia = labels, inertia
    return best


@jit()
def _silhouette(x, labels, k):
    n = x.shape[0]
    sums = np.zeros(k)
    sizes = np.zeros(k)
    for i in range(n):
        sizes[labels[i]] += 1.0
    total = 0.0
    for i in range(n):
        sums[:] = 0.0
        for j in range(n):
            if j != i:
                s = 0.0
                for d in range(x.shape[1]):
                    t = x[i, d] - x[j, d]
                    s += t * t
                sums[labels[j]] += np.sqrt(s)
        own = labels[i]
        if sizes[own] <= 1:
            continue  # a singleton's silhouette is 0
        a = sums[own] / (sizes[own] - 1)
        b = np.inf
        for c in range(k):
            if c != own and sizes[c] > 0:
                b = min(b, sums[c] / sizes[c])
        m = max(a, b)
        if m > 0:
            total += (b - a) / m
    return total / n

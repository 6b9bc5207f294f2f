"""The 2-D t-SNE map of the facets' PCA codes: openTSNE's affinities and initialisation; for
the sets mfv clusters (a unit's top N, a few hundred images) openTSNE's optimiser run compiled
with the exact gradient (Barnes-Hut's approximation is both slower and less exact there, and
openTSNE's Python loop cost as much as the gradient); openTSNE with FFT gradients for large
sets; scikit-learn's Barnes-Hut t-SNE when openTSNE is not installed."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from mfv.core.jit import jit

LARGE_N = 5000  # above this, t-SNE uses FFT gradients and a shorter schedule
TSNE_ITER_SMALL = 1000  # total iterations (250 early exaggeration + 750), as scikit-learn/paper
TSNE_ITER_LARGE = 500  # total iterations (250 + 250) for n > LARGE_N, to bound the run time
EARLY_EXAGGERATION_ITER = 250
MIN_GAIN = 0.01  # openTSNE's gradient descent default


def tsne_map(reduced: np.ndarray, perplexity: float, tsne_iter: int | None, seed: int,
             n_jobs: int, settings: dict[str, Any]) -> np.ndarray:
    """(n, 2) float64 t-SNE map of `reduced`; what was used is recorded in `settings`."""
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
        perp = min(perp, (n - 1) / 3.0)  # openTSNE's own limit (else it logs that it clamps)
        settings.update(embedding_used="tsne (openTSNE)", tsne_gradient="fft" if large else
                        "exact", perplexity_used=perp)
        est = TSNE(
            n_components=2,
            perplexity=perp,
            early_exaggeration_iter=ee,
            n_iter=total - ee,
            negative_gradient_method="fft" if large else exact_gradient,
            random_state=seed,
            n_jobs=n_jobs,
        )
        if large:
            return np.asarray(est.fit(reduced), dtype=np.float64)
        return optimize(est, reduced)
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


def optimize(est: Any, reduced: np.ndarray) -> np.ndarray:
    """`est.fit(reduced)` for an openTSNE `TSNE` with the exact gradient, its two phases
    (early exaggeration, then the plain objective) run by `_descend`: openTSNE's gradient
    descent (gains, momentum, the step-norm clip, re-centring), the same arithmetic in the
    same order, compiled."""
    if (est.learning_rate, est.dof, est.max_grad_norm, est.callbacks) != ("auto", 1, None, None) \
            or est.n_components != 2:
        raise ValueError("the compiled descent covers openTSNE's defaults: 2-D, dof 1, the "
                         "automatic learning rate, no gradient clip, no callbacks")
    start = est.prepare_initial(reduced)
    p = start.affinities.P
    y = np.array(start, dtype=np.float64)
    update, gains = np.zeros_like(y), np.ones_like(y)
    data = np.asarray(p.data, np.float64)
    for n_iter, exaggeration, momentum in (
            (est.early_exaggeration_iter, est.early_exaggeration, est.initial_momentum),
            (est.n_iter, est.exaggeration or 1, est.final_momentum)):
        scaled = data * exaggeration if exaggeration != 1 else data
        _descend(y, p.indptr, p.indices, scaled, n_iter, len(y) / exaggeration, momentum,
                 float(est.max_step_norm), update, gains)
        # openTSNE restores P in place (scipy divides by multiplying with the reciprocal)
        data = scaled * (1.0 / exaggeration) if exaggeration != 1 else data
    return y


@jit()
def _descend(y, indptr, indices, data, n_iter, rate, momentum, max_step, update, gains):
    """`n_iter` steps of openTSNE's `gradient_descent` on `y` (in place), the exact gradient."""
    n = y.shape[0]
    grad = np.empty_like(y)
    y0, y1 = np.empty(n), np.empty(n)
    for _ in range(n_iter):
        y0[:] = y[:, 0]
        y1[:] = y[:, 1]
        _kernel(y0, y1, indptr, indices, data, grad, False)
        for i in range(n):
            for d in range(2):
                if np.sign(update[i, d]) != np.sign(grad[i, d]):
                    gains[i, d] += 0.2
                else:
                    gains[i, d] = gains[i, d] * 0.8 + MIN_GAIN
                update[i, d] = momentum * update[i, d] - rate * gains[i, d] * grad[i, d]
            norm = np.sqrt(update[i, 0] * update[i, 0] + update[i, 1] * update[i, 1])
            if norm > max_step:
                for d in range(2):
                    update[i, d] = update[i, d] / norm * max_step
        m0, m1 = 0.0, 0.0
        for i in range(n):
            y[i, 0] += update[i, 0]
            y[i, 1] += update[i, 1]
            m0 += y[i, 0]
            m1 += y[i, 1]
        m0, m1 = m0 / n, m1 / n
        for i in range(n):
            y[i, 0] -= m0
            y[i, 1] -= m1


def exact_gradient(embedding: np.ndarray, P: Any, dof: float = 1, reference_embedding=None,  # noqa: N803
                   should_eval_error: bool = False, **_: Any) -> tuple[float, np.ndarray]:
    """openTSNE's objective callback: (KL divergence or 0, gradient) of a 2-D map with the
    Cauchy kernel, every pair counted: openTSNE's Barnes-Hut gradient at theta 0 without the
    tree, O(n^2) yet faster than theta 0.5 up to `LARGE_N` (benchmarks/tsne_gradient.py).
    `P` is the sparse joint probability matrix, as exaggerated by the optimiser; the KL is
    computed only when asked."""
    if dof != 1 or reference_embedding is not None or embedding.shape[1] != 2:
        raise ValueError("the exact t-SNE gradient covers 2-D maps with dof 1, fitted alone")
    y = np.ascontiguousarray(embedding, dtype=np.float64)
    grad = np.empty_like(y)
    kl = _kernel(y[:, 0].copy(), y[:, 1].copy(), P.indptr, P.indices,
                 np.asarray(P.data, np.float64), grad, bool(should_eval_error))
    return float(kl), grad


@jit(fastmath=True)
def _kernel(y0, y1, indptr, indices, data, grad, want_kl):
    """Attraction over P's pairs minus repulsion over all pairs / Z, into `grad`; the KL when
    `want_kl`. Each row sums over every j (the self-pair adds 1 to Z, taken back, and 0 to
    the force), so the inner loop vectorises."""
    n = y0.shape[0]
    z = 0.0
    r0 = np.empty(n)
    r1 = np.empty(n)
    for i in range(n):
        a, b = y0[i], y1[i]
        s, s0, s1 = 0.0, 0.0, 0.0
        for j in range(n):
            dx, dy = a - y0[j], b - y1[j]
            w = 1.0 / (1.0 + dx * dx + dy * dy)
            s += w
            s0 += w * w * dx
            s1 += w * w * dy
        z += s - 1.0
        r0[i], r1[i] = s0, s1
    kl = 0.0
    for i in range(n):
        a0, a1 = 0.0, 0.0
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            dx, dy = y0[i] - y0[j], y1[i] - y1[j]
            w = 1.0 / (1.0 + dx * dx + dy * dy)
            a0 += data[k] * w * dx
            a1 += data[k] * w * dy
            if want_kl and data[k] > 0:
                kl += data[k] * np.log(data[k] * z / w)
        grad[i, 0] = a0 - r0[i] / z
        grad[i, 1] = a1 - r1[i] / z
    return kl

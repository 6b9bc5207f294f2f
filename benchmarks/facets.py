"""Time the facets clustering step (PCA + t-SNE + k-means, fixed and auto k) on synthetic codes.

Usage: python benchmarks/facets.py [--sizes 1000 10000] [--dim 1280] [--n-jobs 1]
       [--tsne-iter N] [--k 10 auto]

Codes are 1280-D (EfficientNet-Lite0 penultimate size): 6 Gaussian blobs of unequal size plus
unit noise. Each size runs `find_facets` twice, with k=10 (paper) and k="auto" (k in 2..10 by
silhouette, then merging), and prints the seconds of each step.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from mfv.facets.find import find_facets
from mfv.facets.options import FacetOptions


def synthetic_codes(n: int, dim: int, k: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres *= 8.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    weights = np.arange(k, 0, -1) / np.arange(k, 0, -1).sum()
    truth = rng.choice(k, size=n, p=weights)
    codes = np.maximum(rng.normal(size=(n, dim)) + centres[truth], 0)  # post-ReLU-like
    acts = rng.uniform(0.1, 5.0, size=n)
    return codes.astype(np.float32), acts, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--tsne-iter", type=int, default=None, help="total t-SNE iterations")
    ap.add_argument("--k", nargs="+", default=["10", "auto"], help="k values to time")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"n_jobs={args.n_jobs}, load avg {os.getloadavg()[0]:.1f}")
    cols = ("n", 6), ("k", 5), ("uniq", 5), ("pca", 6), ("tsne", 7), ("kmeans", 7), ("merge", 6)
    header = " ".join(f"{c:>{w}}" for c, w in cols) + f" {'total':>7}"
    print(header + "  facets  ARI   t-SNE settings")
    for n in args.sizes:
        codes, acts, truth = synthetic_codes(n, args.dim)
        for k in (v if v == "auto" else int(v) for v in args.k):
            t = time.perf_counter()
            res = find_facets(codes, acts, options=FacetOptions(k=k, seed=0,
                                                                tsne_iter=args.tsne_iter),
                              n_jobs=args.n_jobs)
            wall = time.perf_counter() - t
            tm, st = res.timings, res.settings
            labels = res.assignment
            ari = adjusted_rand_score(truth, labels)
            kk = f"{k}" if k != "auto" else f"a={res.k_chosen}"
            print(
                f"{n:>6} {kk:>5} {tm['distinct']:5.2f} {tm['pca']:6.2f} {tm['embed']:7.2f} "
                f"{tm['kmeans']:7.2f} "
                f"{tm['merge']:6.2f} {wall:7.2f}  {len(res.facets):>6} {ari:5.2f}  "
                f"{st['tsne_gradient']} {st['tsne_iter']} it, perplexity {st['perplexity_used']:g}"
            )


if __name__ == "__main__":
    main()

"""The facets' t-SNE with the exact gradient against openTSNE's Barnes-Hut (theta 0.5), which
it replaced for sets up to 5,000 items, and the compiled descent and k-means against openTSNE's
and scikit-learn's Python loops (issue 24: the layer study's per-unit clustering).

Usage: python benchmarks/tsne_gradient.py [--sizes 60 200 500 1000 2000 5000] [--rounds 5]
       [--sets 6] [--out benchmarks/results/tsne-gradient.md]

Single-threaded, as the sweep's workers run. Three tables:
1. one gradient evaluation per size (median of `rounds` timings of a batch of calls): exact
   against Barnes-Hut at theta 0.5 and 0 (the exact one must equal theta 0 to float noise);
2. one whole clustering of a 200-item set (`mfv.study.measures.measure_set`: PCA, the t-SNE of
   1,000 iterations, k-means for k = 2..10), `sets` seeded sets of Gaussian blobs, each way
   the library has clustered (`VARIANTS`, interleaved): seconds, and the ARI of the facets
   against the blobs;
3. the same ARI and k for 60- and 200-item sets of three kinds of blobs at three separations,
   with either gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from openTSNE.affinity import PerplexityBasedNN
from openTSNE.tsne import kl_divergence_bh
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

import mfv.facets.cluster as cluster
import mfv.facets.tsne as tsne
from mfv.core.io import atomic_write_text
from mfv.study.measures import measure_set

# (gradient, openTSNE's own loop and scikit-learn's k-means?) per way of clustering
VARIANTS = {
    "Barnes-Hut 0.5, openTSNE's loop, scikit-learn's k-means (to 2026-12-03)": ("bh", True),
    "exact gradient, openTSNE's loop, scikit-learn's k-means (2026-12-03)":
        (tsne.exact_gradient, True),
    "exact gradient, compiled descent and k-means (now)": (tsne.exact_gradient, False),
}
GRADIENTS = {"exact": tsne.exact_gradient, "Barnes-Hut 0.5": "bh"}


def _sklearn_kmeans(space: np.ndarray, k: int, seed: int) -> np.ndarray:
    if k <= 1:
        return np.zeros(len(space), np.int64)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(space)


def _sklearn_silhouette(space, labels, sample=None, seed=0) -> float:
    return float(silhouette_score(space, labels, sample_size=sample, random_state=seed))


def _timed(fn, calls: int, rounds: int) -> float:
    """Median seconds of one call over `rounds` rounds of `calls` calls."""
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls)
    return statistics.median(out)


def gradient_table(sizes: list[int], rounds: int) -> list[str]:
    rows = ["| items | exact (ms) | Barnes-Hut 0.5 (ms) | Barnes-Hut 0 (ms) | BH 0.5 / exact | "
            "max rel. difference exact vs BH 0 |", "|---|---|---|---|---|---|"]
    for n in sizes:
        rng = np.random.default_rng(n)
        p = PerplexityBasedNN(rng.normal(size=(n, 50)), perplexity=30, method="exact",
                              random_state=0, n_jobs=1).P
        y = rng.normal(size=(n, 2)) * 10
        calls = max(1, 20_000 // n)
        exact = _timed(lambda y=y, p=p: tsne.exact_gradient(y, p), calls, rounds)
        bh = _timed(lambda y=y, p=p: kl_divergence_bh(y, p, 1, {"theta": 0.5}), calls, rounds)
        bh0 = _timed(lambda y=y, p=p: kl_divergence_bh(y, p, 1, {"theta": 0.0}),
                     max(1, calls // 4), rounds)
        g0 = kl_divergence_bh(y.copy(), p, 1, {"theta": 0.0})[1]
        diff = np.abs(tsne.exact_gradient(y, p)[1] - g0).max() / np.abs(g0).max()
        rows.append(f"| {n} | {1e3 * exact:.3f} | {1e3 * bh:.3f} | {1e3 * bh0:.3f} | "
                    f"{bh / exact:.1f} | {diff:.1e} |")
        print(rows[-1], flush=True)
    return rows


def blobs(n: int, kinds: int, gap: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` 1,280-d codes of `kinds` Gaussian blobs `gap` apart (unit noise), and their kinds."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, kinds, n)
    centres = rng.normal(size=(kinds, 1280)) * gap / np.sqrt(2 * 1280)
    return (centres[kind] + rng.normal(size=(n, 1280)) / np.sqrt(1280) * 8).astype(
        np.float32), kind


def _measure(codes: np.ndarray, kind: np.ndarray, gradient, seed: int,
             python_loops: bool = False) -> tuple[float, float, int]:
    """(seconds, ARI of the facets against the kinds, k) of one set's clustering; with
    `python_loops`, openTSNE's optimiser (calling `gradient`) and scikit-learn's k-means."""
    acts = np.linspace(2.0, 1.0, len(codes))
    patches = [mock.patch.object(tsne, "exact_gradient", gradient)]
    if python_loops:
        patches += [mock.patch.object(tsne, "optimize", lambda est, x: np.asarray(est.fit(x))),
                    mock.patch.object(cluster, "kmeans", _sklearn_kmeans),
                    mock.patch.object(cluster, "silhouette", _sklearn_silhouette)]
    elif gradient != tsne.exact_gradient:
        raise ValueError("the compiled descent has the exact gradient only")
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        t = time.perf_counter()
        doc = measure_set((codes, codes, acts, seed, 15, "tsne", "bench"))
        seconds = time.perf_counter() - t
    labels = np.full(len(codes), -1)
    for f, members in enumerate(doc["members"]):
        labels[members] = f
    return seconds, adjusted_rand_score(kind, labels), doc["k"]


def set_table(sets: int) -> list[str]:
    rows = ["| clustering | seconds a 200-item set (median) | ARI vs blobs (mean) | k (mean) |",
            "|---|---|---|---|"]
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    for seed in range(sets):  # the variants interleaved, so load changes hit them alike
        for name, (gradient, python_loops) in VARIANTS.items():
            runs[name].append(_measure(*blobs(200, 3, 6.0, seed), gradient, seed, python_loops))
    for name, got in runs.items():
        rows.append(f"| {name} | {statistics.median(r[0] for r in got):.3f} | "
                    f"{np.mean([r[1] for r in got]):.3f} | {np.mean([r[2] for r in got]):.2f} |")
        print(rows[-1], flush=True)
    return rows


def agreement_table(sets: int) -> list[str]:
    rows = ["| items | blob gap | exact: ARI / k | Barnes-Hut 0.5: ARI / k |", "|---|---|---|---|"]
    for n in (60, 200):
        for gap in (3.0, 5.0, 8.0):
            cells = []
            for gradient in GRADIENTS.values():
                runs = [_measure(*blobs(n, 3, gap, 100 + s), gradient, s,
                                 python_loops=gradient == "bh") for s in range(sets)]
                cells.append(f"{np.mean([r[1] for r in runs]):.3f} / "
                             f"{np.mean([r[2] for r in runs]):.2f}")
            rows.append(f"| {n} | {gap:g} | {cells[0]} | {cells[1]} |")
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[60, 200, 500, 1000, 2000, 5000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sets", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with threadpool_limits(1):
        parts = ["## One gradient evaluation", "", *gradient_table(args.sizes, args.rounds), "",
                 "## One 200-item set clustered (the sweep's unit)", "",
                 *set_table(args.sets), "", "## Facets against known blobs", "",
                 *agreement_table(args.sets)]
    if args.out:
        command = "python benchmarks/tsne_gradient.py " + " ".join(sys.argv[1:])
        atomic_write_text(args.out, f"    {command}\n\n" + "\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

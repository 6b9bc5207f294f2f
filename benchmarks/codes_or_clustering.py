"""Codes or clustering? Where the texture units' facets lose their ARI (issue 22, ninth round).

Usage: python benchmarks/codes_or_clustering.py [--photo-seeds 0 1 2 3] [--units probe]
       [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14] [--data DIR] [--out FILE]

The units, pool and run are `hidden_units_e2e.py`'s (its functions are imported, not copied):
per photo seed, per block, a texture unit is run through `mfv.run(..., region="patch",
until="facets", facets=2, seed=0)`, and the crop codes the library clusters are captured as
they reach `mfv.facets.find.find_facets` (a wrapper installed in this process; the library is
unchanged). On the same codes of the same top images:

* **supervised readouts**, leave-one-out over the top composites, trained on the pasted kind:
  logistic regression on the raw codes, and 5 nearest neighbours by cosine. They tell whether
  the codes hold the kind at all: where they cannot read it, no clustering can;
* **other clusterings** (k = 2, unsupervised, as the library would run them): k-means on the
  codes' first 50 and first 2 principal components, a full-covariance Gaussian mixture on the
  first 2, t-SNE at perplexity 10 (the library's is 30, clamped to (n - 1) / 3 = 19.7 for 60
  images), and spectral clustering on a 10-nearest-neighbour graph;
* **codes relative to the collection's crops** (the library's own pipeline, `find_facets`,
  on transformed codes): 400 crops of the unit's side at random places of random pool images
  are coded as the library codes patches, and the top crops' codes are whitened by their
  principal components (each scaled by 1 / sqrt(variance + 0.1 x the largest)), stripped of
  their 3 largest, or standardised by their per-dimension spread, so that what varies between
  ordinary crops (their backgrounds) weighs less;
* **the kind axis**: the share of the codes' variance along the logistic regression's
  direction, and its cosine with the first principal component.

All ARIs are over the top composites, against the pasted texture, as in `hidden_units_e2e.py`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

import mfv
from mfv.core.io import atomic_write_text
from mfv.facets import find, patches
from mfv.facets.options import FacetOptions
from mfv.models.loading import load_model
from mfv.models.targets import resolve_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hidden_units_e2e as e2e  # noqa: E402  (the benchmark's pool and units)

READOUTS = {"logistic": lambda: LogisticRegression(max_iter=5000),
            "5-NN cosine": lambda: make_pipeline(Normalizer(), KNeighborsClassifier(5))}


def clusterings(codes: np.ndarray) -> dict[str, np.ndarray]:
    """Unsupervised 2-way splits of the codes the library would cluster."""
    pcs = PCA(min(50, len(codes) - 1), random_state=0).fit_transform(codes)
    kmeans = KMeans(2, n_init=10, random_state=0)
    return {
        "k-means, 50 PCs": kmeans.fit_predict(pcs),
        "k-means, 2 PCs": kmeans.fit_predict(pcs[:, :2]),
        "GMM (full), 2 PCs": GaussianMixture(2, covariance_type="full", n_init=10,
                                             random_state=0).fit_predict(pcs[:, :2]),
        "t-SNE perplexity 10": kmeans.fit_predict(
            TSNE(2, perplexity=10, init="pca", random_state=0).fit_transform(pcs)),
        "spectral, 10-NN": SpectralClustering(2, affinity="nearest_neighbors", n_neighbors=10,
                                              random_state=0).fit_predict(pcs),
    }


def relative(codes: np.ndarray, collection: np.ndarray) -> dict[str, np.ndarray]:
    """The codes whitened by, stripped of the largest axes of, or standardised by the
    collection's crops' codes."""
    centred = codes - collection.mean(0)
    pca = PCA(100, random_state=0).fit(collection)
    axes, var = pca.components_, pca.explained_variance_
    return {"whitened by the collection's crops": centred @ axes.T / np.sqrt(var + 0.1 * var[0]),
            "without the collection's 3 largest axes": centred - centred @ axes[:3].T @ axes[:3],
            "standardised by the collection's crops": centred / (collection.std(0) + 1e-3 *
                                                                  collection.std(0).mean())}


def collection_codes(model, paths: list[str], sides: set[int], seed: int) -> dict[int, np.ndarray]:
    """Per crop side, the codes of 400 crops at random places of random images of the pool,
    coded as the library codes a patch (`patch_codes`)."""
    rng = np.random.default_rng(100 + seed)
    frames = patches.frames(model, paths, rng.integers(0, len(paths), 400))
    size = model.preprocess.input_size
    layer = resolve_layer(model, "penultimate")
    return {side: patches.patch_codes(model, frames, patches.peak_boxes(
        rng.uniform(side / 2, size - side / 2, (400, 2)), side, size), layer) for side in sides}


def captured_codes(args, photo_seed: int, model) -> list[dict]:
    """Per unit of one photo seed: its spec, the clustered codes and activations, the rows'
    pasted kind, the library's facet of each row, and the collection's crops' codes."""
    pool, found = e2e.seeded_pool(e2e.pool_settings(args.data), photo_seed, args.blocks,
                                   args.units, model)[:2]
    specs = [e2e.two_kind_spec(*unit, args.units) for unit in found]
    images, truth, _, _ = pool
    seen: list[tuple[np.ndarray, find.FacetResult]] = []
    library = find.find_facets

    def capture(codes, *a, **kw):
        result = library(codes, *a, **kw)
        seen.append((np.array(codes), np.array(a[0]), result))
        return result

    find.find_facets = capture
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "pool"
            folder.mkdir()
            paths = e2e.write_pool(images, folder)
            mfv.run(model=model, images=str(folder), targets=specs, reduction="max",
                    sum="maps", selection="top", top_n=60, facets=2, region="patch", seed=0,
                    out=str(Path(tmp) / "run"), until="facets", progress=False)
            collection = collection_codes(model, paths, {r.unit_side for *_, r in seen},
                                          photo_seed)
    finally:
        find.find_facets = library
    return [{"spec": spec, "codes": codes, "activations": acts, "truth": truth[r.selected],
             "facet": r.assignment, "collection": collection[r.unit_side]}
            for spec, (codes, acts, r) in zip(specs, seen, strict=True)]


def scores(unit: dict) -> dict[str, float]:
    """The library's ARI, the readouts' and the clusterings', and the kind axis."""
    known = unit["truth"] >= 0
    codes, truth = unit["codes"], unit["truth"][known]
    out = {"library (t-SNE seed 0)": adjusted_rand_score(truth, unit["facet"][known])}
    for name, make in READOUTS.items():
        guess = cross_val_predict(make(), codes[known], truth, cv=LeaveOneOut())
        out[f"readout: {name}"] = adjusted_rand_score(truth, guess)
    for name, labels in clusterings(codes).items():
        out[name] = adjusted_rand_score(truth, labels[known])
    for name, moved in relative(codes.astype(np.float64), unit["collection"]).items():
        facets = find.find_facets(moved, unit["activations"], None, FacetOptions(k=2, seed=0))
        out[f"library pipeline, codes {name}"] = adjusted_rand_score(
            truth, facets.assignment[known])
    axis = LogisticRegression(max_iter=5000).fit(codes[known], truth).coef_[0]
    axis /= np.linalg.norm(axis)
    centred = codes - codes.mean(0)
    out["kind axis: variance share"] = float((centred @ axis).var() / centred.var(0).sum())
    first = PCA(1).fit(codes).components_[0]
    out["kind axis: cosine with PC 1 (absolute)"] = float(abs(first @ axis))
    return out


def main() -> None:
    args = e2e.study_arguments(__doc__.splitlines()[0], "codes-or-clustering.md")
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    model = load_model("efficientnet_lite0")
    table: dict[str, dict[str, list[float]]] = {}
    for seed in args.photo_seeds:
        for unit in captured_codes(args, seed, model):
            block = unit["spec"].split(":")[0].split("*")[-1]
            for name, value in scores(unit).items():
                table.setdefault(name, {}).setdefault(block, []).append(value)
        print(f"photo seed {seed} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = ["# Codes or clustering: the texture units' crop codes, read with and without "
             "their labels (issue 22)", "",
             f"{e2e.run_line(t0, load0)}; "
             f"`--units {args.units}`, photo seeds {', '.join(map(str, args.photo_seeds))} "
             "(per seed, then the mean). ARI over the top composites against the pasted "
             "texture; readouts leave one out.", "",
             "| measure | " + " | ".join(f"`{b}`" for b in args.blocks) + " |",
             "|---|" + "---|" * len(args.blocks)]
    for name, per_block in table.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{' / '.join(f'{v:.2f}' for v in per_block[b])} ({np.mean(per_block[b]):.2f})"
            for b in args.blocks) + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

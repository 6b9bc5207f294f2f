"""Codes of a hidden unit's patches, side by side (issue 22, fourth round): which code of what a
texture unit sees splits its top composites by texture?

Usage: python benchmarks/patch_codes.py [--photo-seed 1] [--units probe|channels]
       [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14] [--out FILE.md]

The units and composites are `benchmarks/hidden_units_e2e.py`'s (its functions are imported):
per block the texture-probe (or two-channel) unit chosen on selection composites; on the pool
its 60 top images by the max of its combined map; their crops are centred where the unit fires
(`mfv.facets.patches.firing_centres`), as the library centres them. Offline (the photos at
224 px, squashed, no scan), so the numbers differ from the end-to-end benchmark's; each code is
clustered by the library (`mfv.facets.cluster`, k = 2): PCA -> t-SNE -> k-means (mean ARI of
t-SNE seeds 0, 1, 2) and PCA -> k-means, ARI against the pasted texture over the composites.
Codes:

* `side`: the model's penultimate of the crop at the layer's side (48 px at blocks 2-5, 96 px at
  10-14), resized to the input: the library's code before this round;
* `48+96` (and other sets): the mean of the penultimate codes of the crops of those sides
  around the same centre (`mfv.facets.patches.patch_codes`; the library's code now);
* `side l2`, `side perplexity 10`: the same code L2-normalised, or t-SNE at perplexity 10;
* `stats B`: mean and standard deviation over positions of block B's features of the crop
  (a texture statistic), standardised per dimension;
* `circuit d`: PURE-style (Dreyer et al. 2024): gradient x activation of the unit's value
  (its map's maximum) on block L-d's features, summed over positions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from mfv.core.io import atomic_write_text
from mfv.facets import patches
from mfv.facets.cluster import Embedding, cluster
from mfv.models.activations import capture, target_value
from mfv.models.loading import load_model
from mfv.models.targets import LayerRef, parse_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
import constructed_units as cu  # noqa: E402  (the research helper's constructions)
import hidden_units_e2e as e2e  # noqa: E402  (its composites and units)

PENULTIMATE = LayerRef("_fc", use_input=True)
SIDES = {"_blocks.2": 48, "_blocks.5": 48, "_blocks.10": 96, "_blocks.14": 96}
SCALE_SETS = ((48, 96), (48, 64, 96), (32, 48, 96), (48, 96, 144), (64, 96))
STATS = ("_blocks.3", "_blocks.6", "_blocks.9")


def labels(codes: np.ndarray, kind: str, seed: int, perplexity: float) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cluster(codes, 2, Embedding(kind, perplexity, 50, None, seed, 1), (2, 10),
                       "unit").labels


def aris(codes: np.ndarray, truth: np.ndarray, perplexity: float = 30.0) -> tuple[float, float]:
    """(mean t-SNE ARI over seeds 0-2, PCA -> k-means ARI)."""
    tsne = [adjusted_rand_score(truth, labels(codes, "tsne", s, perplexity)) for s in (0, 1, 2)]
    return float(np.mean(tsne)), float(adjusted_rand_score(truth, labels(codes, "pca", 0, 30)))


def standardised(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def feature_stats(model, crops: np.ndarray, block: str) -> np.ndarray:
    ref = LayerRef(block)
    with capture(model, [ref], stop=True) as store, torch.inference_mode():
        model(patches.as_input(model, crops))
        f = store[ref.key].float()
    return standardised(torch.cat([f.mean((2, 3)), f.std((2, 3))], 1).numpy())


def circuit(model, images: torch.Tensor, target, block: int, below: int) -> np.ndarray:
    low = LayerRef(f"_blocks.{block - below}")
    x = images.clone().requires_grad_(True)
    with capture(model, [low, target.terms[0].layer]) as store:
        model(x)
        act = store[low.key]
        grad, = torch.autograd.grad(target_value(target, store).sum(), act)
    return (grad * act).detach().sum((2, 3)).numpy()


def codes_of(model, target, block: str, x: torch.Tensor) -> dict[str, tuple[np.ndarray, float]]:
    """Every code of the composites `x` ((n, 3, 224, 224) in [0, 1]), with its perplexity."""
    frames = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    centres = patches.firing_centres(model, target, frames, np.zeros((len(frames), 2)))

    def at(side: int) -> np.ndarray:
        return patches.crop_resize(frames, patches.peak_boxes(centres, side, 224), 224)
    per = {s: patches.crop_codes(model, at(s), PENULTIMATE)
           for s in sorted({SIDES[block], *(s for ss in SCALE_SETS for s in ss)})}
    side = per[SIDES[block]]
    out = {"side": (side, 30.0), "side l2": (side / np.linalg.norm(side, axis=1,
                                                                    keepdims=True), 30.0),
           "side perplexity 10": (side, 10.0)}
    out.update({"+".join(map(str, ss)): (sum(per[s] for s in ss) / len(ss), 30.0)
                for ss in SCALE_SETS})
    out.update({f"stats {b}": (feature_stats(model, at(SIDES[block]), b), 30.0) for b in STATS})
    number = int(block.split(".")[1])
    out.update({f"circuit {d}": (circuit(model, x, target, number, d), 30.0) for d in (1, 2)
                if number - d >= 0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photo-seed", type=int, default=1)
    ap.add_argument("--units", default="probe", choices=["channels", "probe"])
    ap.add_argument("--blocks", nargs="+", default=list(SIDES))
    ap.add_argument("--top-n", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    model = load_model("efficientnet_lite0")
    pool, found, _ = e2e.seeded_pool(e2e.pool_settings(cu.DATA / "imagenette-train"),
                                     args.photo_seed, args.blocks, args.units, model)
    specs = [e2e.two_kind_spec(*unit, args.units) for unit in found]
    images, truth, *_ = pool
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for spec, block in zip(specs, args.blocks, strict=True):
        target = parse_target(spec, model, reduction="max", sum_mode="maps")
        values = []
        with capture(model, target.layers, stop=True) as store, torch.inference_mode():
            for start in range(0, len(images), 32):
                model(images[start:start + 32])
                values.append(target_value(target, store))
        top = torch.argsort(torch.cat(values), descending=True)[:args.top_n].numpy()
        composites = top[truth[top] >= 0]
        codes = codes_of(model, target, block, images[composites])
        table[block] = {name: aris(c, truth[composites], p) for name, (c, p) in codes.items()}
        print(block, {k: f"{a:.2f}/{b:.2f}" for k, (a, b) in table[block].items()},
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    names = list(dict.fromkeys(n for codes in table.values() for n in codes))
    cmd = "python benchmarks/patch_codes.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd.strip()}`: {os.cpu_count()} cores, load avg {load0:.1f} at start / "
             f"{os.getloadavg()[0]:.1f} at end, {(time.perf_counter() - t0) / 60:.1f} min, "
             f"photo seed {args.photo_seed}, {args.units} units. ARI t-SNE (mean of seeds "
             "0-2) / PCA -> k-means.", "",
             "| code | " + " | ".join(f"`{b}`" for b in table) + " |",
             "|---|" + "---|" * len(table)]
    lines += [f"| {n} | " + " | ".join(f"{table[b][n][0]:.2f} / {table[b][n][1]:.2f}"
                                        if n in table[b] else "-" for b in table) + " |"
              for n in names]
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()

"""Are a two-kind unit's facets distinct for another network? (issue 22's separation goal, on
the benchmark's constructed units).

Usage: python benchmarks/facet_separation.py [--photo-seeds 0 1 2 3] [--units probe|channels]
       [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14] [--data DIR] [--out FILE]

The units and pool are `hidden_units_e2e.py`'s (its functions are imported, not copied). Per
photo seed and block, three targets of EfficientNet-Lite0 go through `mfv.run(...,
region="patch", until="facets", facets=2, top_n=60, seed=0)` together: the two-kind unit (vA +
w vB: fires for grass or masonry patches) and its two one-kind parts (vA alone, w vB alone).
Each target's facets are scored in an independent network's embedding of their crops
(EfficientNet-Lite2's penultimate code of each facet member's box, cut from the same frame and
resized to Lite2's input), with the sweep's separation ratio (`mfv.study.measures.
separation_ratio`: mean distance between facets over mean distance within them, PURE-style).

The chance level of a two-kind unit is what the same clustering finds in a unit of the same
layer that fires for one kind: its two parts' separations. A two-kind unit "has distinct
facets" when its separation is above both parts' (and, less strictly, above their mean). The
ARI of the two-kind unit's facets against the pasted texture is given beside it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

import mfv
from mfv.core.io import atomic_write_text
from mfv.facets import patches
from mfv.models.loading import load_model
from mfv.models.targets import resolve_layer
from mfv.study.measures import separation_ratio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hidden_units_e2e as e2e  # noqa: E402  (the benchmark's pool and units)

ROLES = ("two kinds", "kind A only", "kind B only")


def unit_specs(block: str, va: torch.Tensor, vb: torch.Tensor, w: float, units: str
               ) -> list[str]:
    """The two-kind unit and its one-kind parts as targets, in `ROLES` order."""
    if units == "channels":
        parts = [f"{block}:{int(va.argmax())}", f"{block}:{int(vb.argmax())}"]
    else:
        parts = [e2e.direction_spec(block, v) for v in (va, w * vb)]
    return [e2e.two_kind_spec(block, va, vb, w, units), *parts]


def embedded(lite0, lite2, paths: list[str], facets: list[dict]) -> tuple[np.ndarray,
                                                                          np.ndarray, np.ndarray]:
    """(rows, facet label, Lite2 code) of a target's facet members, crops cut from Lite0's
    frame (where the boxes are) and resized to Lite2's input."""
    rows = np.array([int(Path(p).stem[1:]) for f in facets for p in f["members"]])
    labels = np.concatenate([[f["rank"]] * len(f["members"]) for f in facets])
    boxes = np.array([b for f in facets for b in f["boxes"]], np.int64)
    crops = patches.crop_resize(patches.frames(lite0, paths, rows), boxes,
                                lite2.preprocess.input_size)
    return rows, labels, patches.crop_codes(lite2, crops, resolve_layer(lite2, "penultimate"))


def one_seed(args, seed: int, lite0, lite2) -> list[dict]:
    """Per block: the three targets' separations and the two-kind unit's ARI."""
    pool, found = e2e.seeded_pool(e2e.pool_settings(args.data), seed, args.blocks,
                                   args.units, lite0)[:2]
    specs = [s for block, va, vb, w in found for s in unit_specs(block, va, vb, w, args.units)]
    images, truth, _, _ = pool
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pool"
        folder.mkdir()
        paths = e2e.write_pool(images, folder)
        res = mfv.run(model=lite0, images=str(folder), targets=specs, reduction="max",
                      sum="maps", selection="top", top_n=60, facets=2, region="patch",
                      seed=0, out=str(Path(tmp) / "run"), until="facets",
                      progress=False).to_dict()
        targets = res["targets"]
        for i, (block, *_) in enumerate(found):
            entry = {"block": block, "seed": seed}
            for role, rec in zip(ROLES, targets[3 * i:3 * i + 3], strict=True):
                rows, labels, codes = embedded(lite0, lite2, paths, rec["facets"])
                entry[role] = separation_ratio(codes, labels)
                if role == ROLES[0]:
                    known = truth[rows] >= 0
                    entry["ari"] = adjusted_rand_score(truth[rows][known], labels[known])
            out.append(entry)
    return out


def main() -> None:
    args = e2e.study_arguments(__doc__.splitlines()[0], "facet-separation.md")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    lite0, lite2 = load_model("efficientnet_lite0"), load_model("efficientnet_lite2")
    rows = []
    for seed in args.photo_seeds:
        rows += one_seed(args, seed, lite0, lite2)
        print(f"photo seed {seed} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    above = [r[ROLES[0]] > max(r[ROLES[1]], r[ROLES[2]]) for r in rows]
    above_mean = [r[ROLES[0]] > (r[ROLES[1]] + r[ROLES[2]]) / 2 for r in rows]
    lines = ["# Facet separation of the benchmark's two-kind units in Lite2's embedding of "
             "their crops (issue 22)", "",
             f"{e2e.run_line(t0, load0)}; "
             f"`--units {args.units}`. Separation ratio (between-facet over within-facet mean "
             "distance, Lite2 penultimate codes of the facets' crops) of the two-kind unit and "
             "of its one-kind parts; ARI of the two-kind unit's facets against the pasted "
             "texture (t-SNE seed 0).", "",
             "| block | photo seed | two kinds | kind A only | kind B only | above both parts "
             "| ARI (two kinds) |", "|---|---|---|---|---|---|---|"]
    for r, hit in zip(rows, above, strict=True):
        lines.append(f"| `{r['block']}` | {r['seed']} | {r[ROLES[0]]:.3f} | {r[ROLES[1]]:.3f} "
                     f"| {r[ROLES[2]]:.3f} | {'yes' if hit else 'no'} | {r['ari']:.2f} |")
    lines += ["", f"Two-kind units with separation above both one-kind parts': **{sum(above)} of "
              f"{len(rows)} ({100 * np.mean(above):.0f} %)**; above the parts' mean: "
              f"{sum(above_mean)} of {len(rows)} ({100 * np.mean(above_mean):.0f} %)."]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Pictures of hidden units at the unit's scale or magnified (issue 22, item 3).

Usage: python benchmarks/unit_scale.py [--photos 400] [--blocks _blocks.2 _blocks.5 ...]
       [--units 2] [--steps 64] [--seed 0] [--out benchmarks/results/unit-scale.md]
       [--sheet docs/unit-scale.jpg]

A seeded sample of Imagenette training photos and of channels per block of EfficientNet-Lite0
run through `mfv.run(..., region="patch", reduction="max", facets=2, recipes=["anchored"])`
twice, once per `--picture-scale` (the scan and the facets are shared; only the pictures
differ). Each facet picture is then read four ways, all against its facet's best photo:

- **act. at unit scale**: the target on the picture shrunk to the crops' side in a grey frame,
  as the unit saw the crops (`mfv.render.objective.unit_view`);
- **act. magnified**: the target on the picture as it is, at the input size;
- **fidelity**: the picture's code (the crops' code: the model's penultimate at the input size)
  is nearest its own facet's centre;
- **plausibility**: an independent network's (Lite2) code of the picture against its facet's
  crops (`mfv.evaluate.metrics.plausibility`: mean cosine to the 5 nearest).

The sheet shows, per unit and facet, the mean crop, the unit-scale picture and the magnified
one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mfv
from mfv.core.io import atomic_write_text
from mfv.evaluate.metrics import plausibility
from mfv.facets.patches import crop_codes, load_crops
from mfv.models.targets import parse_target, resolve_layer
from mfv.render.objective import Objective, central_crop
from mfv.runtime.rundir import RunDir

SCALES = ("unit", "input")


def arguments() -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get(
        "MFV_SHARED_DATA", here.parents[1] / "shared" / "data")) / "imagenette-train")
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--blocks", nargs="+",
                    default=["_blocks.2", "_blocks.5", "_blocks.10", "_blocks.14"])
    ap.add_argument("--units", type=int, default=2, help="channels per block (seeded)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=here / "results" / "unit-scale.md")
    ap.add_argument("--sheet", type=Path, default=here.parent / "docs" / "unit-scale.jpg")
    return ap.parse_args()


def main() -> None:
    args = arguments()
    rng = np.random.default_rng(args.seed)
    model = mfv.load_model("efficientnet_lite0")
    judge = mfv.load_model("efficientnet_lite2")
    judge_code = resolve_layer(judge, "penultimate")
    own_code = resolve_layer(model, "penultimate")
    photos = sorted(args.data.glob("*/*.JPEG"))
    photos = [photos[i] for i in sorted(rng.choice(len(photos), args.photos, replace=False))]
    widths = {i.path: i.shape[0] for i in model.layers()}
    specs = [f"{b}:{c}" for b in args.blocks
             for c in sorted(rng.choice(widths[b], args.units, replace=False))]
    started = time.time()
    rows: list[dict] = []
    sheet: dict[tuple[str, int], list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "photos.txt"
        listing.write_text("".join(f"{p}\n" for p in photos))
        out = Path(tmp) / "run"
        for scale in SCALES:
            results = mfv.run(model=model, images=str(listing), targets=specs, out=str(out),
                              reduction="max", region="patch", facets=2, top_n=40,
                              recipes=["anchored"], baseline=False, steps=args.steps,
                              picture_scale=scale, until="render", judges=[], progress=False,
                              seed=args.seed)
            run = RunDir(out)
            for record in results.targets:
                target = parse_target(record.spec, model, reduction="max")
                (key_dir,) = (out / "targets" / record.slug / "facets").iterdir()
                key = json.loads((key_dir / "facets.json").read_text())["key"]
                stored, means = run.target(record.slug).load_facets(key)
                side = stored.unit_side
                centres = np.stack([f.code_centre for f in stored.facets])
                for facet, mean in zip(stored.facets, means, strict=True):
                    entry = record.facets[facet.rank].visualizations["anchored"]
                    picture = np.asarray(Image.open(out / entry.path).convert("RGB"))
                    x = central_crop(torch.from_numpy(picture.copy()).permute(2, 0, 1)[None]
                                     .float(), model.preprocess.input_size)
                    acts = {view: float(Objective(model, [target], [0], views=[v])(x)[0])
                            for view, v in (("unit", side), ("input", None))}
                    seen = x.permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy()
                    code = crop_codes(model, seen, own_code)[0]
                    nearest = int(np.argmin(((centres - code) ** 2).sum(1)))
                    crops = load_crops(model, [str(p) for p in photos], facet.members,
                                       np.array([stored.box_of(i) for i in facet.members]))
                    refs = crop_codes(judge, crops, judge_code)
                    mine = crop_codes(judge, seen, judge_code)[0]
                    best = max(facet.activation_max, 1e-9)
                    rows.append(dict(scale=scale, block=record.spec.split(":")[0],
                                     spec=record.spec, rank=facet.rank, side=side,
                                     unit=acts["unit"] / best, input=acts["input"] / best,
                                     fidelity=nearest == facet.rank,
                                     plausibility=plausibility(mine, refs)))
                    tiles = sheet.setdefault((record.spec, facet.rank),
                                             [np.asarray(mean).round().astype(np.uint8)])
                    tiles.append(seen[0])
    minutes = (time.time() - started) / 60
    write_table(args, rows, minutes, specs)
    write_sheet(args.sheet, list(sheet.values()))


def write_table(args: argparse.Namespace, rows: list[dict], minutes: float, specs: list[str]
                ) -> None:
    lines = [
        "# Pictures of hidden units at the unit's scale or magnified (issue 22)", "",
        f"`python benchmarks/unit_scale.py --photos {args.photos} --units {args.units} "
        f"--steps {args.steps} --seed {args.seed}`: EfficientNet-Lite0, {args.photos} "
        f"Imagenette training photos, units {', '.join(f'`{s}`' for s in specs)}; "
        f"`--region patch --reduction max --facets 2 --top-n 40`, anchored recipe at "
        f"{args.steps} steps; {minutes:.1f} min on the 2-core CPU, load "
        f"{os.getloadavg()[0]:.1f} at the end.", "",
        "Activations are the picture's over its facet's best photo (max over the map).", "",
        "| block | patch side (px) | --picture-scale | pictures | act. at unit scale | "
        "act. magnified | fidelity | plausibility (Lite2 vs crops) |",
        "|---|---|---|---|---|---|---|---|"]
    for block in args.blocks:
        for scale in SCALES:
            group = [r for r in rows if r["block"] == block and r["scale"] == scale]
            if not group:
                continue
            lines.append(
                f"| `{block}` | {group[0]['side']} | {scale} | {len(group)} | "
                f"{np.mean([r['unit'] for r in group]):.2f} | "
                f"{np.mean([r['input'] for r in group]):.2f} | "
                f"{np.mean([r['fidelity'] for r in group]):.0%} | "
                f"{np.mean([r['plausibility'] for r in group]):.3f} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


def write_sheet(path: Path, sheet: list[list[np.ndarray]], cell: int = 112) -> None:
    """One row per facet: mean crop | unit-scale picture | magnified picture."""
    canvas = Image.new("RGB", (3 * cell, len(sheet) * cell), "white")
    for r, images in enumerate(sheet):
        for c, image in enumerate(images[:3]):
            tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.BICUBIC)
            canvas.paste(tile, (c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=85)


if __name__ == "__main__":
    main()

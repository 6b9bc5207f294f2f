"""Texture units end to end through `mfv.run` (issue 22): the ARI of the library's facets with
`--region patch` against `--region image`, at several depths of EfficientNet-Lite0.

Usage: python benchmarks/hidden_units_e2e.py [--photos 80] [--top-n 60] [--seeds 0 1 2]
       [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14] [--regions patch image]
       [--sum maps|terms] [--units channels|probe|max-probe] [--photo-seed 0] [--centre firing|peak]
       [--crops library|VARIANT (benchmarks/crop_variants.py)] [--embedding tsne|pca]
       [--paste 64 128] [--texture-photos 300] [--texture-count 24] [--distinct-textures]
       [--sheets DIR] [--out benchmarks/results/hidden-units-e2e.md]

The units and composites are those of `benchmarks/constructed_units.py` (its functions are
imported, not copied): grass and masonry crops pasted (64-128 px) on photos of other classes; per
block the channel most selective for each texture's patches, `"B:a + w*B:b"` with w equalising
the halves' 90th percentiles, chosen on one set of composites. A fresh pool (new backgrounds and
crops, plus plain photos) is written as PNG files and run through `mfv.run(..., until="facets",
reduction="max", selection="top", facets=2)` once per region; the ARI is computed from
`results.json`'s facet members against the pasted texture (over the top images that are
composites; for `--region patch` also over those whose crop is centred in the pasted patch,
where the truth is what the unit saw). For `--region patch` it also tells what else the facets
could follow (the patch's scale, the background photo's class), counts each facet's textures,
scores the facets against what each crop shows by the texture rules' colours, and with
`--sheets` draws each facet's crops (research aids; the sheets hold pieces of the photos, so
they stay out of the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import mfv
from mfv.core.io import atomic_write_text
from mfv.facets import patches
from mfv.models.loading import load_model
from mfv.models.targets import LayerRef

sys.path.insert(0, str(Path(__file__).resolve().parent))
import constructed_units as cu  # noqa: E402  (the research helper's constructions)
import crop_variants  # noqa: E402  (crops measured and not adopted)


def composites(args, rng):
    """The selection set and the pool (images, kind, boxes), as `constructed_units` builds
    them (kind 0/1 = texture A/B, -1 = plain photo)."""
    paths = sorted(args.data.glob("*/*.JPEG"))
    paths = [paths[i] for i in rng.permutation(len(paths))]
    tex = {name: [p for p in paths if p.parent.name == folder][:args.texture_photos]
           for name, folder, _ in cu.TEXTURES}
    crops = {name: cu.texture_crops(cu.load_images(tex[name]), rule, 96, 2 * args.texture_count)
             for name, _, rule in cu.TEXTURES}
    kinds = list(crops)
    others = [p for p in paths if p.parent.name not in {f for _, f, _ in cu.TEXTURES}]
    groups = [others[i * args.photos:(i + 1) * args.photos] for i in range(6)]

    def texture_set(a_paths, b_paths, plain, half):
        (ca, ba), (cb, bb) = (cu.paste(cu.load_images(ps), crops[k][half::2], rng,
                                       *args.paste, distinct=args.distinct_textures)
                              for ps, k in ((a_paths, kinds[0]), (b_paths, kinds[1])))
        kind = np.repeat([0, 1, -1], [len(a_paths), len(b_paths), len(plain)])
        scene = np.array([p.parent.name for p in (*a_paths, *b_paths, *plain)])
        return (torch.cat([ca, cb, cu.load_images(plain)]), kind,
                np.concatenate([ba, bb, -np.ones((len(plain), 3), int)]), scene)
    return texture_set(*groups[0:3], 0), texture_set(*groups[3:6], 1), kinds


def direction_spec(block: str, vec: torch.Tensor) -> str:
    """A direction in a layer's space as a target: "w0*B:0 + w1*B:1 - ..." (`--sum maps`)."""
    terms = [(float(v), c) for c, v in enumerate(vec.tolist()) if abs(v) > 1e-6]
    text = f"{terms[0][0]:.5g}*{block}:{terms[0][1]}"
    return text + "".join(f" {'-' if v < 0 else '+'} {abs(v):.5g}*{block}:{c}"
                          for v, c in terms[1:])


def unit_directions(model, sel, blocks: list[str], batch: int, kind_of: str,
                    rng: np.random.Generator
                    ) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """Per block (block, vA, vB, w): the channels most selective for each texture's patches as
    one-hot vectors (`channels`), or the two textures' linear probes' directions (`probe`,
    Lucent's `direction`); w equalises the halves' 90th percentiles."""
    images, kind, boxes, _ = sel
    acts = cu.forward(model, images, [LayerRef(b) for b in blocks], batch)
    out = []
    for block in blocks:
        maps = acts[block]
        mask = cu.in_box(boxes, tuple(maps.shape[-2:]))
        own = [torch.as_tensor(kind == k) for k in (0, 1)]
        if kind_of == "probe":
            va, vb = (cu.probe(maps, mask & o[:, None, None], rng)[0] for o in own)
        elif kind_of == "max-probe":
            va, vb = (cu.probe(maps, mask & o[:, None, None], rng, background=~mask,
                               rounds=3)[0] for o in own)
        else:
            order = [torch.argsort(cu.patch_selectivity(maps, mask, o), descending=True
                                   ).tolist() for o in own]
            a = order[0][0]
            b = next(c for c in order[1] if c != a)
            va, vb = cu.onehot(a, maps.shape[1]), cu.onehot(b, maps.shape[1])
        qa = cu.unit_map(maps[own[0]], va).amax((1, 2)).quantile(0.9)
        qb = cu.unit_map(maps[own[1]], vb).amax((1, 2)).quantile(0.9)
        w = float(qa / qb) if qa > 0 and qb > 0 else 1.0
        out.append((block, va, vb, w))
    return out


def two_kind_spec(block: str, va: torch.Tensor, vb: torch.Tensor, w: float, kind_of: str
                  ) -> str:
    """The two-kind unit as a target: `"B:a + w*B:b"` (`channels`) or the direction vA + w vB
    (`probe`, `max-probe`)."""
    if kind_of == "channels":
        return f"{block}:{int(va.argmax())} + {w:.3f}*{block}:{int(vb.argmax())}"
    return direction_spec(block, va + w * vb)


def pool_settings(data: Path) -> argparse.Namespace:
    """The pool's construction by default (`main`'s defaults): 80 photos a group, 24 texture
    crops a kind cut from 300 photos, pasted at 64-128 px."""
    return argparse.Namespace(photos=80, texture_photos=300, texture_count=24, paste=[64, 128],
                              distinct_textures=False, data=data)


def seeded_pool(pool_args: argparse.Namespace, seed: int, blocks: list[str], units: str, model,
                batch: int = 32):
    """For one photo seed: the pool (images, kind, boxes, background class), the unit
    directions chosen per block on the selection set (`unit_directions`) and the texture
    kinds' names; `pool_args` as `pool_settings` (or `main`'s command line)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sel, pool, kinds = composites(pool_args, rng)
    return pool, unit_directions(model, sel, blocks, batch, units, rng), kinds


def write_pool(images: torch.Tensor, folder: Path) -> list[str]:
    """The pool's images as PNG files `p0000.png`, ... in `folder` (a photo folder for
    `mfv.run`); their paths in pool order."""
    paths = [str(folder / f"p{i:04d}.png") for i in range(len(images))]
    for path, img in zip(paths, images, strict=True):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return paths


def study_arguments(description: str, out: str) -> argparse.Namespace:
    """The command line of a study over the benchmark's units: photo seeds, unit kind, blocks,
    data and the report's path (default `benchmarks/results/<out>`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--photo-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--units", default="probe", choices=["channels", "probe", "max-probe"])
    ap.add_argument("--blocks", nargs="+", default=["_blocks.2", "_blocks.5", "_blocks.10",
                                                    "_blocks.14"])
    ap.add_argument("--data", type=Path, default=cu.DATA / "imagenette-train")
    ap.add_argument("--out", type=Path, default=cu.ROOT / "benchmarks/results" / out)
    return ap.parse_args()


def run_line(t0: float, load0: float) -> str:
    """How a study ran, for its report: its command, the cores, the load and the minutes."""
    cmd = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    return (f"`{cmd.strip()}`: {os.cpu_count()} cores, load avg {load0:.1f} at start / "
            f"{os.getloadavg()[0]:.1f} at end, {(time.perf_counter() - t0) / 60:.1f} min")


def _inside(box, patch, zoom: float, shift: float) -> bool:
    """Whether a facet box's centre (the unit's peak) lies in the pasted patch (top, left,
    side, in the composite's pixels), both in the model's frame."""
    top, left, side = (v * zoom - (shift if i < 2 else 0) for i, v in enumerate(patch))
    cy, cx = box[0] + box[2] / 2, box[1] + box[3] / 2
    return bool(top <= cy < top + side and left <= cx < left + side)


def colour_kinds(model, paths: list[str], boxes: dict[int, np.ndarray], rows: np.ndarray
                 ) -> np.ndarray:
    """Per row, what its crop's centre shows by the rules that cut the texture crops
    (`constructed_units.TEXTURES` on the mean colour of the box's centred half): 0 / 1 for
    texture A / B, -1 for neither (or both)."""
    frames = patches.frames(model, paths, rows)
    out = np.full(len(rows), -1)
    for j, (frame, row) in enumerate(zip(frames, rows, strict=True)):
        top, left, h, w = (int(v) for v in boxes[int(row)])
        centre = frame[top + h // 4:top + h - h // 4, left + w // 4:left + w - w // 4]
        rgb = torch.as_tensor(centre.reshape(-1, 3).mean(0) / 255)
        hits = [bool(rule(*rgb)) for _, _, rule in cu.TEXTURES]
        if sum(hits) == 1:
            out[j] = hits.index(True)
    return out


def contact_sheet(model, paths: list[str], facets: list[dict], truth: np.ndarray,
                  out: Path) -> None:
    """One row per facet of its top composites' crops (64 px), each framed in its pasted
    texture's colour (A green, B red): what a facet that mixes the textures holds."""
    tile, rows = 64, []
    for facet in facets:
        members = [(int(Path(p).stem[1:]), b) for p, b in zip(facet["members"], facet["boxes"],
                                                              strict=True)]
        members = sorted((m for m in members if truth[m[0]] >= 0), key=lambda m: truth[m[0]])
        if not members:
            continue
        frames = patches.frames(model, paths, np.array([i for i, _ in members]))
        crops = patches.crop_resize(frames, np.array([b for _, b in members]), tile - 4)
        row = np.full((tile, tile * len(members), 3), 255, np.uint8)
        for j, ((i, _), crop) in enumerate(zip(members, crops, strict=True)):
            row[:, j * tile:(j + 1) * tile] = (40, 170, 40) if truth[i] == 0 else (200, 40, 40)
            row[2:-2, j * tile + 2:(j + 1) * tile - 2] = crop
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)),
                                   constant_values=255) for r in rows])
    Image.fromarray(sheet).save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=80)
    ap.add_argument("--texture-photos", type=int, default=300)
    ap.add_argument("--texture-count", type=int, default=24)
    ap.add_argument("--top-n", type=int, default=60)
    ap.add_argument("--paste", type=int, nargs=2, default=[64, 128], metavar=("LO", "HI"),
                    help="the pasted patches' sides, px (the issue's construction: 64-128)")
    ap.add_argument("--blocks", nargs="+", default=["_blocks.2", "_blocks.5", "_blocks.10",
                                                    "_blocks.14"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--regions", nargs="+", default=["patch", "image"])
    ap.add_argument("--sum", default="maps", choices=["maps", "terms"],
                    help="how the unit's two channels combine (maps: the max of the combined "
                    "map, as the units are built; terms: max(a) + w*max(b))")
    ap.add_argument("--units", default="channels", choices=["channels", "probe", "max-probe"],
                    help="how a unit is built: two channels, two linear probes' directions, or "
                    "the probes refitted with hard negatives (`constructed_units.probe`'s rounds)")
    ap.add_argument("--photo-seed", type=int, default=0,
                    help="draws the photos, texture crops and pastes (so the chosen units too): "
                    "another value is a fresh set to confirm a choice made on seed 0")
    ap.add_argument("--centre", default="firing", choices=["firing", "peak"],
                    help="where the library centres a crop: `firing` (its rule, "
                    "`mfv.facets.patches.firing_centres`), or `peak`, the peak cell itself (the "
                    "rule before, patched in here only to compare)")
    ap.add_argument("--crops", default="library", choices=crop_variants.VARIANTS,
                    help="the library's crops, or a variant measured against them "
                    "(`benchmarks/crop_variants.py`)")
    ap.add_argument("--embedding", default="tsne", choices=("tsne", "pca"),
                    help="the facets' 2-D map (tsne, the library's default) or pca (k-means on "
                         "the codes' first principal components)")
    ap.add_argument("--distinct-textures", action="store_true",
                    help="every composite gets a texture crop of its own (needs --texture-count "
                    ">= --photos and enough texture photos), instead of ~3 composites a crop")
    ap.add_argument("--sheets", type=Path, default=None,
                    help="write one contact sheet per unit (first seed, --region patch) here")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--data", type=Path, default=cu.DATA / "imagenette-train")
    ap.add_argument("--out", type=Path, default=cu.ROOT / "benchmarks/results/hidden-units-e2e.md")
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    if args.centre == "peak":  # the local backend runs the facets in this process
        patches.firing_centres = lambda model, target, images, peaks, **_: peaks
    crop_variants.install(args.crops)
    model = load_model("efficientnet_lite0")
    pool, found, kinds = seeded_pool(args, args.photo_seed, args.blocks, args.units, model,
                                     args.batch)
    specs = [two_kind_spec(*unit, args.units) for unit in found]
    images, truth, pasted, scene = pool
    pre = model.preprocess
    zoom = pre.resize_size / cu.SIZE  # the model's frame: resized, then its centre cropped
    shift = (pre.resize_size - pre.input_size) / 2
    seen: dict[str, float] = {}
    rows: dict[str, dict[str, list[float]]] = {s: {r: [] for r in args.regions} for s in specs}
    in_patch: dict[str, list[float]] = {s: [] for s in specs}
    scale: dict[str, list[float]] = {s: [] for s in specs}  # what else the facets follow
    backdrop: dict[str, list[float]] = {s: [] for s in specs}
    seen_ari: dict[str, list[float]] = {s: [] for s in specs}  # against what the crops show
    seen_share: dict[str, float] = {}
    colours: dict[tuple[int, tuple[int, ...]], int] = {}  # (image, box): what the crop shows
    counts: dict[str, str] = {}  # facet x texture, first seed
    sides: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pool"
        folder.mkdir()
        paths = write_pool(images, folder)
        for region in args.regions:
            for seed in args.seeds:
                res = mfv.run(model=model, images=str(folder), targets=specs, reduction="max",
                              sum=args.sum,
                              selection="top", top_n=args.top_n, facets=2, region=region,
                              seed=seed, out=str(Path(tmp) / "run"), until="facets",
                              embedding=args.embedding, progress=False).to_dict()
                for spec, rec in zip(specs, res["targets"], strict=True):
                    label = {int(Path(p).stem[1:]): f["rank"] for f in rec["facets"]
                             for p in f["members"]}
                    idx = np.array(sorted(label))
                    known = truth[idx] >= 0
                    found = np.array([label[i] for i in idx])
                    rows[spec][region].append(adjusted_rand_score(truth[idx][known],
                                                                  found[known]))
                    side = json.loads(next((Path(tmp) / "run" / "targets" / rec["slug"] /
                                            "facets").glob("*/facets.json")).read_text())[
                        "settings"].get("patch_side")
                    sides[spec] = side or sides.get(spec)
                    if region != "patch":
                        continue
                    box = {int(Path(p).stem[1:]): b for f in rec["facets"]
                           for p, b in zip(f["members"], f["boxes"], strict=True)}
                    # over the composites whose crop is centred in the patch
                    hit = known & np.array([
                        truth[i] >= 0 and _inside(box[i], pasted[i], zoom, shift) for i in idx])
                    in_patch[spec].append(
                        adjusted_rand_score(truth[idx][hit], found[hit])
                        if len(set(truth[idx][hit])) == 2 else float("nan"))
                    # what else they could follow: the patch's scale, the background's class
                    scale[spec].append(adjusted_rand_score(
                        pasted[idx][known][:, 2] >= 96, found[known]))
                    backdrop[spec].append(adjusted_rand_score(scene[idx][known], found[known]))
                    # what the crops show, each (image, box) judged once over the seeds
                    keys = [(int(i), tuple(int(v) for v in box[i])) for i in idx]
                    new = [k for k in keys if k not in colours]
                    if new:
                        colours.update(zip(new, colour_kinds(
                            model, paths, dict(new), np.array([i for i, _ in new])),
                            strict=True))
                    looks = np.array([colours[k] for k in keys])
                    clear = looks >= 0
                    seen_share[spec] = float(clear.mean())
                    seen_ari[spec].append(adjusted_rand_score(looks[clear], found[clear])
                                          if len(set(looks[clear])) == 2 else float("nan"))
                    if seed == args.seeds[0]:
                        seen[spec] = float(hit[known].mean())  # crops centred in the patch
                        counts[spec] = " / ".join(
                            f"{int(((found[known] == f) & (truth[idx][known] == 0)).sum())}:"
                            f"{int(((found[known] == f) & (truth[idx][known] == 1)).sum())}"
                            for f in np.unique(found[known]))
                        if args.sheets:
                            args.sheets.mkdir(parents=True, exist_ok=True)
                            contact_sheet(model, paths, rec["facets"], truth, args.sheets /
                                          f"seed{args.photo_seed}-{rec['slug']}.png")
            print(f"{region} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = ["# Texture units through `mfv.run`: facets of patches vs whole photos (issue 22)",
             "", f"{run_line(t0, load0)}, photo seed {args.photo_seed}. "
             f"Textures A = {kinds[0]}, B = {kinds[1]};"
             f" patches {args.paste[0]}-{args.paste[1]} px"
             f"{', a texture crop of its own each' if args.distinct_textures else ''}; "
             f"pool: {args.photos} composites of "
             f"each and {args.photos} plain photos; top-N = "
             f"{args.top_n}, k = 2, `--reduction max --sum {args.sum}`; ARI over the top images "
             f"that are composites, crops centred by the `{args.centre}` rule "
             f"({args.crops} crops, {args.embedding} map), per seed "
             f"({', '.join(map(str, args.seeds))}) and their "
             "mean; `--region patch` also over the top composites whose crop is "
             "centred inside the pasted patch (where the unit saw the texture), and the ARI of "
             "its facets against what else they could follow: the pasted patch's scale (side "
             ">= 96 px or not) and the background photo's class (8 classes); last column: the ARI "
             "over all top images, plain photos too, against what each crop's centred half "
             "shows by the colour rules that cut the texture crops (images that pass neither "
             "rule or both are left out; their share kept in brackets).",
             "", "| unit | patch side (px) | peak in patch | " + " | ".join(
                 f"ARI --region {r}" for r in args.regions) + " | ARI, peak in patch | "
             "ARI vs scale | ARI vs background | facets, A:B each | ARI vs what the crop shows "
             "(share of top images) |",
             "|---|---|---|" + "---|" * (len(args.regions) + 5)]
    for spec in specs:
        cells = [f"{np.nanmean(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})" if v else "n/a"
                 for v in (*rows[spec].values(), in_patch[spec], scale[spec], backdrop[spec])]
        block = spec.split(":")[0].split("*")[-1]
        shown = spec if len(spec) < 60 else f"{block}: probe A + w * probe B (--sum maps)"
        hit = f"{seen[spec]:.2f}" if spec in seen else "n/a"
        lines.append(f"| `{shown}` | {sides.get(spec)} | {hit} | " + " | ".join(cells)
                     + f" | {counts.get(spec, 'n/a')} | "
                     + (f"{np.nanmean(seen_ari[spec]):.2f} ({seen_share[spec]:.2f})"
                        if seen_ari[spec] else "n/a") + " |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

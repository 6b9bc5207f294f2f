"""Would an observer learn the unit from its pictures? The MIS two-alternative task (issue 25) over
class logits and hidden channels of EfficientNet-Lite0, on Imagenette photos.

Usage: python benchmarks/mis.py [--photos 450] [--units 10] [--steps 32] [--facets 3]
       [--top-n 100] [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14]
       [--observer-layers penultimate _blocks.15 _blocks.20] [--select-units 4]
       [--work /tmp/mfv-mis] [--out benchmarks/results/mis.md] [--reduction center|mean]
       [--per-unit] [--render-units N] [--render-layers L ...] [--from-run] [--natural-only]

Two disjoint random sets of `--photos` Imagenette training photos: set A is the run's (scan,
facets, pictures and the natural references), set B gives the queries only, so no query was
used anywhere else. Units: the 10 Imagenette class logits and `--units` seeded random channels
of each block (`--reduction center`, the paper's), each with its negation "-1*UNIT" (what it
shuns: its facets come from the unit's least activating photos and its pictures minimize it).
One `mfv.run(..., until="render")` per layer (default recipe, `--facets` facets and as many
random starts each, `--steps` steps) over a scan of A that records every unit; then per unit,
with the observer (EfficientNet-Lite2; its layer chosen first by the natural score of
`--select-units` other channels per block, units not in the table; `--from-run` chooses it per
explained layer, on that layer's own held-out units, for the logits `--select-units` other
logits):

- natural (published): queries and references from A's ranking (ranks 0-19; 20 + 20k + t);
- natural: queries from B (its 20 most and least activating photos), references from A;
- facet pictures: E+ = the unit's facet pictures, E- = its negation's, queries from B;
- facet + photos: E+ = facet pictures, E- = A's natural negative references;
- random + photos: E+ = the unit's random-start pictures, E- = A's natural negative references
  (the negations are rendered without random starts, to halve the CPU time).

Synthetic references are the same set in every trial (a unit has `--facets` pictures, not 9).
Results are appended per layer (a cut-off keeps the layers done) and the table rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import mfv
from mfv.core.io import atomic_write_text
from mfv.evaluate import mis
from mfv.evaluate.observer import Observer
from mfv.models.loading import load_model
from mfv.models.read import channel_means, read_photos
from mfv.models.targets import resolve_layer

IMAGENETTE = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("natural_published", "natural", "facet", "facet_photos", "random_photos")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = Path(os.environ.get("MFV_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p.add_argument("--data", type=Path, default=shared / "imagenette-train")
    p.add_argument("--photos", type=int, default=450, help="photos per set (A and B)")
    p.add_argument("--units", type=int, default=10, help="channels per block")
    p.add_argument("--blocks", nargs="+", default=["_blocks.2", "_blocks.5", "_blocks.10",
                                                   "_blocks.14"])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--facets", type=int, default=3)
    p.add_argument("--top-n", type=int, default=100)
    p.add_argument("--recipes", nargs="+", default=["anchored"])
    p.add_argument("--maco-crops", type=int, default=None,
                   help="maco: random crops per step (default: its own, 32)")
    p.add_argument("--observer", default="efficientnet_lite2")
    p.add_argument("--observer-layers", nargs="+",
                   default=["penultimate", "_blocks.15", "_blocks.20"])
    p.add_argument("--select-units", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduction", default="center", help="how a channel's map gives one "
                   "number (center: the paper's; mean: the spatial mean)")
    p.add_argument("--work", type=Path, default=Path("/tmp/mfv-mis"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mis.md")
    p.add_argument("--render-layers", nargs="+", default=None,
                   help="the layers whose units get pictures (default: all, _fc first)")
    p.add_argument("--render-units", type=int, default=None,
                   help="only the first N table units of each rendered layer get pictures")
    p.add_argument("--per-unit", action="store_true",
                   help="render unit by unit (the unit, then its negation), so a cut-off "
                   "leaves whole units")
    p.add_argument("--from-run", action="store_true",
                   help="score the units whose pictures a previous (or still running) run of "
                   "this script has finished, from --work, without rendering")
    p.add_argument("--newer-than", type=Path, default=None,
                   help="with --from-run: only pictures written after this file (a run's "
                   "pictures from the current code)")
    p.add_argument("--natural-only", action="store_true",
                   help="only the natural exemplars' scores of every unit, from the scans and "
                   "observer embeddings a previous run of this script left in --work")
    return p.parse_args()


def stored_scan(folder: Path):
    """The one finished scan under a run directory (read without taking the run's lock)."""
    from mfv.scan.result import ScanResult

    found = max((folder / "scan").iterdir(), key=lambda f: f.stat().st_mtime)  # the newest
    return ScanResult.load(found)


def natural_markdown(rows: list[dict]) -> list[str]:
    """Per layer, the natural exemplars' MIS of every unit (published and held-out queries)."""
    lines = ["## natural exemplars, every unit", "",
             "| layer | units | natural (published) | natural (held-out queries) | "
             "units ≥ 0.85 | σ(αΔ) |", "|---|---|---|---|---|---|"]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        group = [r["natural"] for r in rows if r["layer"] == layer]
        pub = np.mean([g["natural_published"]["mis"] for g in group])
        held = [g["natural"]["mis"] for g in group]
        soft = np.mean([g["natural"]["mis_soft"] for g in group])
        lines.append(f"| {layer} | {len(group)} | {pub:.3f} | {np.mean(held):.3f} | "
                     f"{sum(h >= 0.85 for h in held)}/{len(held)} | {soft:.4f} |")
    everything = [r["natural"]["natural"]["mis"] for r in rows]
    lines += [f"| all | {len(rows)} | "
              f"{np.mean([r['natural']['natural_published']['mis'] for r in rows]):.3f} | "
              f"{np.mean(everything):.3f} | {sum(h >= 0.85 for h in everything)}/"
              f"{len(everything)} | |", ""]
    return lines


def stored_pictures(run: Path, spec: str, recipe: str, since: float = 0.0
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A target's finished facet and random-start pictures in a run directory, read from its
    folder (`slug`: readable text and 8 hex digits) without the run's lock."""
    text = re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-").lower()[:40]
    folders = [f for f in run.glob(f"targets/{text}-*") if re.fullmatch(
        rf"{re.escape(text)}-[0-9a-f]{{8}}", f.name)]
    out: dict[str, list[np.ndarray]] = {"facet": [], "random": []}
    for folder in folders:
        for kind in out:
            for rank in range(20):
                name = rf"{kind}{rank:02d}_{re.escape(recipe)}_[0-9a-f]+\.png"  # not _alpha
                found = sorted((f for f in folder.glob(f"{kind}{rank:02d}_{recipe}_*.png")
                                if re.fullmatch(name, f.name) and f.stat().st_mtime >= since),
                               key=lambda f: f.stat().st_mtime)
                if found:
                    out[kind].append(load_rgb_array(found[-1]))
    return out["facet"], out["random"]


def acts(scan, spec: str) -> np.ndarray:
    """A target's activations over a stored scan's photos."""
    return scan.activations_of(scan.target_index(spec))


def drawn_units(args) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The units of the full run, drawn again (the same seed and draws as `main`), and per
    explained layer the held-out units that choose its observer layer: the block's selection
    channels, and for the logits `--select-units` class logits outside the table (drawn after
    everything `main` draws, so its draws are unchanged)."""
    rng = np.random.default_rng(args.seed)
    paths = sorted(str(p) for p in args.data.glob("*/*.JPEG"))
    rng.permutation(len(paths))  # the photo draw comes first in `main`
    table, select = units(args, load_model("efficientnet_lite0"), rng)
    by_layer = {layer: [s for s in select if s.rsplit(":", 1)[0] == layer] for layer in table}
    others = np.array([c for c in range(1000) if c not in IMAGENETTE])
    by_layer["_fc"] = [f"_fc:{c}" for c in sorted(rng.permutation(others)[:args.select_units])]
    return table, by_layer


def scan_sets(args, targets: list[str], **extra) -> None:
    """Full scans of sets A (the run) and B (the queries) for `targets`, at --reduction."""
    for name, folder in (("a", "run"), ("b", "queries")):
        mfv.scan_images(images=str(args.work / f"{name}.txt"), out=str(args.work / folder),
                        model="efficientnet_lite0", scan_targets=targets, scan_mode="full",
                        progress=False, seed=args.seed, reduction=args.reduction, **extra)


def scans_with(args, specs: list[str]):
    """Sets A and B's stored scans, scanned again (every unit they hold, and `specs`) when
    they lack some of `specs`."""
    scan_a, scan_b = stored_scan(args.work / "run"), stored_scan(args.work / "queries")
    missing = [s for s in specs if s not in scan_a.targets]
    if missing:
        scan_sets(args, [*scan_a.targets, *missing], top_n=args.top_n)
        scan_a, scan_b = stored_scan(args.work / "run"), stored_scan(args.work / "queries")
    return scan_a, scan_b


def embed_queries(args, layers: dict[str, np.ndarray], scan_b, n_a: int,
                  specs: list[str]) -> None:
    """Fill in (and store) the observer's embeddings of the set-B queries of `specs` that no
    previous run embedded."""
    missing = set()
    for spec in specs:
        order = mis.ranked(acts(scan_b, spec))
        missing |= {n_a + i for i in [*order[:mis.N_TRIALS], *order[::-1][:mis.N_TRIALS]]
                    if np.isnan(layers[args.observer_layers[0]][n_a + i]).all()}
    if not missing:
        return
    rows = sorted(missing)
    observer = load_model(args.observer)
    refs = [resolve_layer(observer, layer) for layer in args.observer_layers]
    read = read_photos(observer, [scan_b.paths[r - n_a] for r in rows], refs, channel_means,
                       batch_size=32, progress="observer")
    for layer, values in zip(args.observer_layers, read.outputs, strict=True):
        layers[layer][np.array(rows)[read.kept]] = values
        np.save(args.work / f"photos-{layer}.npy", layers[layer])


def stored_embeddings(args) -> dict[str, np.ndarray]:
    """The observer's embeddings of sets A and B per layer, as `main` left them in --work."""
    return {layer: np.load(args.work / f"photos-{layer}.npy") for layer in args.observer_layers}


def best_layer(embeddings: dict[str, np.ndarray], scan_a, scan_b, select: list[str]
               ) -> tuple[dict[str, float], str]:
    """Each observer layer's mean natural MIS over the selection units, and the best layer."""
    n_a = len(scan_a.paths)
    scores = {layer: float(np.mean([unit_scores(e, acts(scan_a, s), acts(scan_b, s), None,
                                                n_a)["natural"]["mis"] for s in select]))
              for layer, e in embeddings.items()}
    return scores, max(scores, key=scores.get)


def from_run(args) -> None:
    """MIS of every unit whose pictures are finished (facets and random starts), read from
    --work; the negation's facet pictures are used where they are finished too. Each explained
    layer is observed at the observer layer that best tells its held-out units from their
    natural exemplars (`drawn_units`)."""
    table_units, held = drawn_units(args)
    every = [s for group in table_units.values() for s in group]
    scan_a, scan_b = scans_with(args, [s for group in held.values() for s in group])
    layers = stored_embeddings(args)
    n_a = len(scan_a.paths)
    embed_queries(args, layers, scan_b, n_a, [*every, *(s for g in held.values() for s in g)])
    choices = {}
    for layer, select in held.items():
        scores, best = best_layer(layers, scan_a, scan_b, select)
        choices[layer] = {"scores": scores, "layer": best}
    observer_model = load_model(args.observer)
    observers = {c["layer"]: Observer(observer_model, resolve_layer(observer_model, c["layer"]),
                                      c["layer"]) for c in choices.values()}
    since = args.newer_than.stat().st_mtime if args.newer_than else 0.0
    rows, naturals = [], []
    for layer, specs in table_units.items():
        best = choices[layer]["layer"]
        for spec in specs:
            naturals.append({"spec": spec, "layer": layer, "natural": unit_scores(
                layers[best], acts(scan_a, spec), acts(scan_b, spec), None, n_a)})
            row = {"spec": spec, "layer": layer, "observer": best, "scores": {}}
            for recipe in args.recipes:
                facets, randoms = stored_pictures(args.work / "run", spec, recipe, since)
                shunned, _ = stored_pictures(args.work / "run", negation(spec), recipe, since)
                if len(facets) < args.facets or len(randoms) < args.facets:
                    continue
                images = [*facets, *randoms, *shunned]
                k = len(facets)
                pics = {"facet": np.arange(k), "random": np.arange(k, 2 * k),
                        "facet_neg": np.arange(2 * k, len(images)) if len(shunned) >= args.facets
                        else None}
                table = np.vstack([layers[best], observers[best].pictures(images)])
                offset = len(layers[best])
                row["scores"][recipe] = unit_scores(
                    table, acts(scan_a, spec), acts(scan_b, spec),
                    {k: None if v is None else offset + v for k, v in pics.items()}, n_a)
            if row["scores"]:
                rows.append(row)
                print(spec, {r: {c: round(v["mis"], 2) for c, v in sc.items()}
                             for r, sc in row["scores"].items()}, flush=True)
    timings = {"load average": round(os.getloadavg()[0], 1)}
    text = summarize(rows, choices, args, timings, held)
    text += "\n" + "\n".join(natural_markdown(naturals))
    atomic_write_text(args.work / "rows-from-run.json", json.dumps(rows, indent=1))
    atomic_write_text(args.out, text)
    print(text)


def natural_only(args) -> None:
    """The natural scores of every unit from a previous run's scans and embeddings."""
    table_units, held = drawn_units(args)
    select = [s for layer, group in held.items() if layer != "_fc" for s in group]
    every = [*(s for group in table_units.values() for s in group), *select]
    if not (args.work / "queries").exists():  # scans of this --reduction, same photos
        scan_sets(args, every)
    scan_a, scan_b = stored_scan(args.work / "run"), stored_scan(args.work / "queries")
    layers = stored_embeddings(args)
    n_a = len(scan_a.paths)
    embed_queries(args, layers, scan_b, n_a, every)

    scores, best = best_layer(layers, scan_a, scan_b, select)
    rows = [{"spec": spec, "layer": layer,
             "natural": unit_scores(layers[best], acts(scan_a, spec), acts(scan_b, spec), None,
                                    n_a)}
            for layer, specs in table_units.items() for spec in specs]
    per_layer = {layer: {spec: round(r["natural"]["natural"]["mis"], 2) for r in rows
                         for spec in [r["spec"]] if r["layer"] == layer}
                 for layer in table_units}
    text = ["# MIS: natural exemplars of every unit (benchmarks/mis.py --natural-only)", "",
            f"Observer {args.observer}, layer scores on the selection units: {scores}; chosen "
            f"{best}. Set A: {n_a} photos, set B: {len(scan_b.paths)} (queries). "
            f"Reduction: {args.reduction}.", "",
            *natural_markdown(rows), "## per unit", "",
            *[f"- {layer}: {json.dumps(v)}" for layer, v in per_layer.items()], ""]
    atomic_write_text(args.out, "\n".join(text))
    print("\n".join(text))


def units(args, model, rng) -> tuple[dict[str, list[str]], list[str]]:
    """Per layer the units of the table, and the channels that choose the observer's layer."""
    widths = {info.path: info.units for info in model.layers()}
    table = {"_fc": [f"_fc:{c}" for c in IMAGENETTE]}
    select = []
    for block in args.blocks:
        chosen = rng.permutation(widths[block])[:args.units + args.select_units]
        table[block] = [f"{block}:{c}" for c in sorted(chosen[:args.units])]
        select += [f"{block}:{c}" for c in sorted(chosen[args.units:])]
    return table, select


def negation(spec: str) -> str:
    return f"-1*{spec}"


def embed_photos(observer_model, layers, paths, cache: Path) -> dict[str, np.ndarray]:
    """The photos through the observer once, all candidate layers pooled (cached on disk);
    rows of NaN for photos not given (None)."""
    files = {layer: cache / f"photos-{layer}.npy" for layer in layers}
    if all(f.exists() for f in files.values()):
        return {layer: np.load(f) for layer, f in files.items()}
    refs = [resolve_layer(observer_model, layer) for layer in layers]
    wanted = np.array([i for i, p in enumerate(paths) if p is not None])
    read = read_photos(observer_model, [paths[i] for i in wanted], refs, channel_means,
                       batch_size=32, progress="observer")
    out = {}
    for layer, values in zip(layers, read.outputs, strict=True):
        full = np.full((len(paths), values.shape[1]), np.nan, np.float32)
        full[wanted[read.kept]] = values
        np.save(files[layer], full)
        out[layer] = full
    return out


def held_out(trials: mis.Trials, order_b: np.ndarray, offset: int) -> mis.Trials:
    """The same references, queries from set B (indices shifted by `offset`)."""
    n = trials.n_trials
    return mis.Trials(offset + order_b[:n], offset + order_b[::-1][:n], trials.refs_pos,
                      trials.refs_neg)


def unit_scores(table: np.ndarray, acts_a: np.ndarray, acts_b: np.ndarray,
                pictures: dict[str, np.ndarray] | None, n_a: int) -> dict[str, dict]:
    """Every condition's score for one unit; `table` rows: A photos, B photos, then pictures
    (`pictures[kind]`: their row indices)."""
    published = mis.natural_trials(mis.ranked(acts_a))
    natural = held_out(published, mis.ranked(acts_b), n_a)
    out = {"natural_published": mis.evaluate(table, published),
           "natural": mis.evaluate(table, natural)}
    if pictures:
        if pictures.get("facet_neg") is not None:
            out["facet"] = mis.evaluate(table, mis.with_references(
                natural, pictures["facet"], pictures["facet_neg"]))
        out["facet_photos"] = mis.evaluate(table, mis.with_references(
            natural, pictures["facet"], None))
        out["random_photos"] = mis.evaluate(table, mis.with_references(
            natural, pictures["random"], None))
    return out


def load_rgb_array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pictures_of(run: Path, target: dict, recipe: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    facets = [load_rgb_array(run / f["visualizations"][recipe]["path"])
              for f in target["facets"] if recipe in f["visualizations"]]
    randoms = [load_rgb_array(run / v["path"]) for v in target["baselines"].get(recipe, [])]
    return facets, randoms


def recipes_markdown(rows: list[dict], recipes: list[str]) -> list[str]:
    """Every recipe over the units that have all of them: its facet pictures against the
    natural exemplars and against its own random starts (both with the photos as E-)."""
    both = [r for r in rows if all(rec in r["scores"] for rec in recipes)]
    if len(recipes) < 2 or not both:
        return []
    lines = [f"## every recipe, over the {len(both)} units that have all "
             f"({', '.join(dict.fromkeys(r['layer'] for r in both))})", "",
             "| recipe | natural | facet pictures | facet / natural | facet + photos | "
             "random + photos | facet − random |", "|---|---|---|---|---|---|---|"]
    for rec in recipes:
        def mean(cond, rec=rec):
            return float(np.mean([r["scores"][rec][cond]["mis"] for r in both
                                  if cond in r["scores"][rec]]))
        nat, fac, half, ran = (mean(c) for c in ("natural", "facet", "facet_photos",
                                                 "random_photos"))
        lines.append(f"| {rec} | {nat:.3f} | {fac:.3f} | {fac / nat:.2f} | {half:.3f} | "
                     f"{ran:.3f} | {half - ran:+.3f} |")
    return [*lines, ""]


def summarize(rows: list[dict], choices: dict[str, dict], args, timings: dict,
              held: dict[str, list[str]] | None = None) -> str:
    """The results as markdown; `choices`: per explained layer (or one entry for every layer)
    the observer layers' natural scores on its held-out units (`held`) and the chosen one."""
    names = list(next(iter(choices.values()))["scores"])
    lines = [
        "# MIS: would an observer learn the unit from its pictures? (benchmarks/mis.py)", "",
        f"Command: `python benchmarks/mis.py {' '.join(sys.argv[1:])}`", "",
        f"Observer: {args.observer}; its layer chosen by the natural MIS of held-out units "
        f"(held-out queries): {args.select_units} other random channels per block"
        + (", and per explained layer on its own held-out units (for the logits: class "
           "logits outside the table)" if held else "") + ":", "",
        "| explained | held-out units | " + " | ".join(names) + " | chosen |",
        "|---|---|" + "---|" * len(names) + "---|",
        *[f"| {layer} | {', '.join(held[layer]) if held else 'all selection channels'} | "
          + " | ".join(f"{c['scores'][n]:.3f}" for n in names) + f" | **{c['layer']}** |"
          for layer, c in choices.items()], "",
        "N = 20 trials, K = 9 natural references per side; synthetic references: the unit's "
        "pictures (and its negation's for E-) in every trial. Queries: photos of set B only. "
        f"Reduction: {args.reduction}. σ(αΔ) uses the published α = {mis.ALPHA} (fitted on "
        "human data with DreamSim, which we cannot reach).", "",
        f"Timings (s): {json.dumps(timings)}", ""]
    for recipe in args.recipes:
        lines += [f"## recipe {recipe}", "",
                  "| layer | units | natural (published) | natural | facet pictures | "
                  "facet / natural | facet + photos | random + photos | facet − random | "
                  "facet − natural | σ(αΔ) natural / facet |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for layer in dict.fromkeys(r["layer"] for r in rows):
            group = [r for r in rows if r["layer"] == layer and recipe in r["scores"]]
            if not group:
                continue

            def mean(cond, key="mis", group=group, recipe=recipe):
                values = [r["scores"][recipe][cond][key] for r in group
                          if cond in r["scores"][recipe]]
                return float(np.mean(values)) if values else float("nan")

            nat, fac = mean("natural"), mean("facet")
            half, ran = mean("facet_photos"), mean("random_photos")
            lines.append(
                f"| {layer} | {len(group)} | {mean('natural_published'):.3f} | {nat:.3f} | "
                f"{fac:.3f} | {fac / nat:.2f} | {half:.3f} | {ran:.3f} | "
                f"{half - ran:+.3f} | {fac - nat:+.3f} | "
                f"{mean('natural', 'mis_soft'):.4f} / {mean('facet', 'mis_soft'):.4f} |")
        lines.append("")
    lines += recipes_markdown(rows, args.recipes)
    lines += ["## per unit", "", "| unit | layer | natural | " + " | ".join(
        f"{r} facet | {r} facet + photos | {r} random + photos" for r in args.recipes) + " |",
        "|---|---|---|" + "---|---|---|" * len(args.recipes)]
    for r in rows:
        first = next(iter(r["scores"].values()))
        cells = [" | ".join(f"{r['scores'][rec][c]['mis']:.2f}" if c in r["scores"].get(rec, {})
                            else "–" for c in ("facet", "facet_photos", "random_photos"))
                 for rec in args.recipes]
        lines.append(f"| {r['spec']} | {r['layer']} | {first['natural']['mis']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    if args.natural_only:
        natural_only(args)
        return
    if args.from_run:
        from_run(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(args.seed)
    paths = sorted(str(p) for p in args.data.glob("*/*.JPEG"))
    chosen = rng.permutation(len(paths))[:2 * args.photos]
    set_a = [paths[i] for i in chosen[:args.photos]]
    set_b = [paths[i] for i in chosen[args.photos:]]
    for name, group in (("a", set_a), ("b", set_b)):
        (args.work / f"{name}.txt").write_text("\n".join(group) + "\n")
    model = load_model("efficientnet_lite0")
    table_units, select = units(args, model, rng)
    every = [s for group in table_units.values() for s in group]
    scanned = [*every, *(negation(s) for s in every), *select]
    common = dict(model="efficientnet_lite0", scan_targets=scanned, scan_mode="full",
                  top_n=args.top_n, progress=False, seed=args.seed, reduction=args.reduction)
    t = time.perf_counter()
    scan_a = mfv.scan_images(images=str(args.work / "a.txt"), out=str(args.work / "run"),
                             **common)
    scan_b = mfv.scan_images(images=str(args.work / "b.txt"), out=str(args.work / "queries"),
                             **common)
    timings["scans"] = round(time.perf_counter() - t, 1)
    index_a = {p: i for i, p in enumerate(scan_a.paths)}
    index_b = {p: i for i, p in enumerate(scan_b.paths)}
    n_a = len(scan_a.paths)
    assert len(index_a) == n_a and len(index_b) == len(scan_b.paths)
    queries = set()  # set B: only the queries are ever shown to the observer
    for spec in [*every, *select]:
        order = mis.ranked(acts(scan_b, spec))
        queries |= {*order[:mis.N_TRIALS].tolist(), *order[::-1][:mis.N_TRIALS].tolist()}
    photo_paths = [*scan_a.paths, *(p if i in queries else None
                                    for i, p in enumerate(scan_b.paths))]
    observer_model = load_model(args.observer)
    t = time.perf_counter()
    photos = embed_photos(observer_model, args.observer_layers, photo_paths, args.work)
    timings["observer photos"] = round(time.perf_counter() - t, 1)
    timings["observer photos n"] = n_a + len(queries)

    scores, best = best_layer({layer: photos[layer] for layer in args.observer_layers},
                              scan_a, scan_b, select)
    layer_choice = {"scores": scores, "layer": best}
    print(f"observer layer scores: {layer_choice}", flush=True)
    observer = Observer(observer_model, resolve_layer(observer_model, best), best)
    rows: list[dict] = []
    order = [("_fc", table_units["_fc"]), *reversed([(b, table_units[b]) for b in args.blocks])]
    for layer, specs in [(lay, sp) for lay, sp in order
                         if args.render_layers is None or lay in args.render_layers]:
        t = time.perf_counter()
        render = dict(images=str(args.work / "a.txt"), out=str(args.work / "run"),
                      facets=args.facets, steps=args.steps, recipes=list(args.recipes),
                      maco_crops=args.maco_crops, until="render", **common)
        specs = specs[:args.render_units]
        groups = [[s] for s in specs] if args.per_unit else [specs]
        by_spec = {}
        for group in groups:
            res = mfv.run(targets=group, **render).to_dict()
            shunned = mfv.run(targets=[negation(s) for s in group], baseline=False,
                              **render).to_dict()  # what the units shun: facet pictures only
            by_spec |= {tr["spec"]: tr for tr in [*res["targets"], *shunned["targets"]]}
            print(f"rendered {group} ({round(time.perf_counter() - t)} s)", flush=True)
        timings[f"run {layer}"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        for spec in specs:
            row = {"spec": spec, "layer": layer, "scores": {}}
            for recipe in args.recipes:
                pics = {}
                images: list[np.ndarray] = []
                for kind, target in (("", by_spec[spec]), ("_neg", by_spec[negation(spec)])):
                    if recipe not in target["facets"][0]["visualizations"]:
                        continue
                    facets, randoms = pictures_of(args.work / "run", target, recipe)
                    pics["facet" + kind] = np.arange(len(images), len(images) + len(facets))
                    images += facets
                    pics["random" + kind] = np.arange(len(images), len(images) + len(randoms))
                    images += randoms
                table = np.vstack([photos[best], observer.pictures(images)])
                offset = len(photos[best])
                row["scores"][recipe] = unit_scores(
                    table, acts(scan_a, spec), acts(scan_b, spec),
                    {k: offset + v for k, v in pics.items()}, n_a)
            rows.append(row)
            print(spec, {c: round(row["scores"][args.recipes[0]][c]["mis"], 2)
                         for c in CONDITIONS}, flush=True)
        timings[f"mis {layer}"] = round(time.perf_counter() - t, 1)
        timings["total"] = round(time.perf_counter() - started, 1)
        timings[f"load average after {layer}"] = round(os.getloadavg()[0], 1)
        atomic_write_text(args.work / "rows.json", json.dumps(rows, indent=1))
        atomic_write_text(args.out, summarize(rows, {"every layer": layer_choice}, args,
                                                    timings))
        print(f"wrote {args.out} ({len(rows)} units, {timings['total']} s)", flush=True)


if __name__ == "__main__":
    main()

"""Every recipe side by side, from facet means and from random starts (issue 12, item 5).

Usage (a CPU subset, the defaults):
    python benchmarks/quality.py --k 2
Full settings (a GPU: every photo, all 10 class logits, the recipes' own step counts, m = 15):
    python benchmarks/quality.py --device cuda --per-class 0 --classes 10 --k 3 --mean-of 15 \
        --steps 0 --out .tmp/bench-quality-full
Other options: --pairs N (constructed neurons, 0..5), --recipes a,b, --data PATH, --seed,
--batch-size, --judges, --no-write. `--steps 0` and `--per-class 0` mean each recipe's own steps
and all photos.

Targets (EfficientNet-Lite0): the first `--classes` Imagenette class logits, over the photos of
their class, and `--pairs` neurons multifaceted by construction, "_fc:A + _fc:B" over the photos
of classes A and B. Everything goes through `mfv.run` in one run directory: one scan, facets with
k = `--k`, then every recipe renders k pictures per target from the facets' mean images and k
from the recipe's random start, and evaluate judges them (`mfv.evaluate.evaluation`): as seen (the
saved file treated like a photo) unless a column says "central" (the optimizer's central view).

Columns, per recipe and start:
- cov. own / Lite1 / Lite2: constructed neurons only — share of their classes that get a
  picture classified as that class (of the two) by Lite0 (the optimized network) and by the
  independent Lite1 / Lite2;
- fidelity (central): share of pictures whose Lite0 code is nearest their own facet's centre;
- > facet max: pictures whose activation exceeds the best photo of their facet;
- act. ratio: activation over the best photo of the whole target;
- transfer top-5: class logits only — share ranked in the top 5 by Lite1 and Lite2;
- plausibility: mean cosine similarity (Lite2 codes) to the 5 most similar photos of the facet;
- path sim.: cosine similarity of channel means with the facet's photos along Lite0's depth;
- diversity: mean pairwise cosine distance of a target's pictures' codes;
- centre dom.: the target on the centre vs the corners; s / vis.: render seconds per picture.

Prints the table and writes it, with the command, settings and machine, to
benchmarks/results/quality-k<K>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import mfv
from mfv.core.io import atomic_write_json, atomic_write_text, read_json
from mfv.models.classes import imagenet_classes
from mfv.render.anchor import AnchorSettings
from recovery import (
    PAIRS,
    RESULTS,
    ROOT,
    cell,
    finite_mean,
    link_classes,
    machine,
    markdown,
    pair_target,
    plain,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-train"
IMAGENETTE = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916",
              "n03417042", "n03425413", "n03445777", "n03888257")
RECIPES = ("paper-mean", "paper-center", "fourier", "maco", "anchored")
HEADER = ("recipe", "start", "n", "cov. own", "cov. Lite1", "cov. Lite2", "fidelity",
          "fidelity (central)", "> facet max", "act. ratio", "transfer top-5", "plausibility",
          "path sim.", "diversity", "centre dom.", "s / vis.")


def anchor_defaults(**given: int | None) -> None:
    """Set this process's defaults of `AnchorSettings` fields (those given, not None): they
    are no run settings, and a picture's key holds them, so pictures made with other values
    are never reused."""
    init = AnchorSettings.__init__
    names = [f.name for f in dataclasses.fields(AnchorSettings)][-len(init.__defaults__):]
    defaults = dict(zip(names, init.__defaults__, strict=True))
    defaults.update({name: value for name, value in given.items() if value is not None})
    init.__defaults__ = tuple(defaults[name] for name in names)


def render_timed(base: dict, recipes: Sequence[str]) -> dict[str, float]:
    """Render recipe by recipe (facet and random starts); seconds per picture of each, as
    recorded when they were made (a rerun that finds them keeps the recorded time)."""
    timing_path = Path(base["out"]) / "quality_timings.json"
    timings = read_json(timing_path) if timing_path.exists() else {}
    for recipe in recipes:
        started = time.perf_counter()
        results = mfv.run(**base, recipes=[recipe], until="render").to_dict()
        seconds = time.perf_counter() - started
        count = sum(recipe in f["visualizations"] for t in results["targets"]
                    for f in t["facets"]) + sum(len(t["baselines"].get(recipe, []))
                                                for t in results["targets"])
        if recipe not in timings or seconds > 5:  # only when the pictures were made now
            timings[recipe] = {"seconds": seconds, "count": count,
                               "per_visualization": seconds / max(count, 1)}
            atomic_write_json(timing_path, timings)
    return {r: t["per_visualization"] for r, t in timings.items()}


def rows_of(results: dict, recipes: Sequence[str], seconds: dict[str, float],
            judges: Sequence[str]) -> list[list[str]]:
    targets = results["targets"]
    constructed = [t for t in targets if t["class_index"] is None and len(t["target"]["terms"]) > 1]
    classes = [t for t in targets if t["class_index"] is not None]
    own = results["model"]["name"]
    rows = []
    for recipe in recipes:
        for start in ("facet", "random"):
            if start == "facet":
                per = [f["metrics"].get(recipe, {}) for t in targets for f in t["facets"]]
                per_class = [f["metrics"].get(recipe, {}) for t in classes for f in t["facets"]]
                n = sum(recipe in f["visualizations"] for t in targets for f in t["facets"])
                above = [m["activation_ratio_facet"] > 1 for m in per
                         if m.get("activation_ratio_facet") is not None]
                above_txt = f"{sum(above)}/{len(above)}" if above else "–"
            else:
                per = [t["metrics"].get("random", {}).get(recipe, {}) for t in targets]
                per_class = [t["metrics"].get("random", {}).get(recipe, {}) for t in classes]
                n = sum(len(t["baselines"].get(recipe, [])) for t in targets)
                above_txt = "–"
            if not n:
                continue
            stats = [t["metrics"].get(start, {}).get(recipe, {}) for t in targets]
            cstats = [t["metrics"].get(start, {}).get(recipe, {}) for t in constructed]

            def cov(net: str, cstats=cstats) -> str:
                return cell(finite_mean([s.get("coverage", {}).get(net) for s in cstats]),
                            percent=True)

            rows.append([
                recipe, "facet mean" if start == "facet" else "random", str(n), cov(own),
                *(cov(j) for j in judges[:2]), *(["–"] * (2 - len(judges[:2]))),
                cell(finite_mean([m.get("fidelity") for m in per]), percent=True),
                cell(finite_mean([m.get("fidelity_central") for m in per]), percent=True),
                above_txt, cell(finite_mean([m.get("activation_ratio") for m in per])),
                cell(finite_mean([m.get("transfer_top5") for m in per_class])),
                cell(finite_mean([m.get("plausibility") for m in per]), 3),
                cell(finite_mean([m.get("path_similarity") for m in per]), 3),
                cell(finite_mean([s.get("diversity") for s in stats]), 3),
                cell(finite_mean([m.get("centre_dominance") for m in per])),
                cell(seconds.get(recipe, float("nan")), 1)])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--classes", type=int, default=2, help="class logits (first N of 10)")
    ap.add_argument("--pairs", type=int, default=len(PAIRS), help="constructed neurons")
    ap.add_argument("--per-class", type=int, default=30, help="photos per class (0: all)")
    ap.add_argument("--k", type=int, default=2, help="facets (pictures) per target")
    ap.add_argument("--mean-of", type=int, default=10)
    ap.add_argument("--steps", type=int, default=0, help="steps per recipe (0: its own)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--maco-crops", type=int, default=None,
                    help="MACO's crops per step (default: the published 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judges", default="efficientnet_lite1,efficientnet_lite2",
                    help="comma-separated models for transferability, or 'none'")
    ap.add_argument("--out", type=Path, default=ROOT / ".tmp" / "bench-quality")
    ap.add_argument("--no-write", action="store_true", help="do not write results/quality-k*.md")
    ap.add_argument("--name", default="",
                    help="results/quality-k<K><NAME>.md: keeps tables of other subsets apart")
    ap.add_argument("--match-positions", type=int, default=None,
                    help="anchored recipe: positions per channel matched a step (0: all, as "
                         "before issue 24; default: AnchorSettings')")
    ap.add_argument("--observer", default=None,
                    help="MIS's observer network, or 'none' (default: the run's, Lite2)")
    ap.add_argument("--match-every", type=int, default=None,
                    help="anchored recipe: match on every k-th step only, at k times the weight "
                         "(default: AnchorSettings')")
    args = ap.parse_args(argv)
    anchor_defaults(match_positions=args.match_positions, match_every=args.match_every)
    if not 0 <= args.classes <= len(IMAGENETTE) or not 0 <= args.pairs <= len(PAIRS):
        ap.error(f"--classes must be in 0..{len(IMAGENETTE)} and --pairs in 0..{len(PAIRS)}")
    if args.classes + args.pairs == 0:
        ap.error("nothing to do: give --classes or --pairs")
    recipes = args.recipes.split(",")
    judges = [] if args.judges == "none" else args.judges.split(",")
    lookup = imagenet_classes().lookup
    class_wnids = IMAGENETTE[:args.classes]
    pairs = PAIRS[:args.pairs]
    wnids = sorted({*class_wnids, *(w for p in pairs for w in p)})
    images = link_classes(args.data, wnids, args.out / "images", args.per_class or None)
    targets = [f"_fc:{lookup(w)}" for w in class_wnids] + [pair_target(p) for p in pairs]
    base = {"images": str(images), "targets": targets, "out": str(args.out / f"run-k{args.k}"),
            "selection": "class", "facets": args.k, "mean_of": args.mean_of,
            "steps": args.steps or None, "device": args.device, "seed": args.seed,
            "batch_size": args.batch_size, "judges": judges, "maco_crops": args.maco_crops,
            "progress": False}
    if args.observer is not None:
        base["observer"] = args.observer
    started = time.perf_counter()
    mfv.run(**base, until="facets")  # scan and facets once, before rendering is timed
    seconds = render_timed(base, recipes)
    results = mfv.run(**base, recipes=recipes).to_dict()
    rows = rows_of(results, recipes, seconds, judges)
    elapsed = time.perf_counter() - started
    setting = (f"{args.classes} class logits + {args.pairs} constructed neurons, "
               f"{results['data']['n_images']} photos ({args.per_class or 'all'} per class), "
               f"k={args.k}, mean of {args.mean_of}, steps {args.steps or 'each recipe’s own'}, "
               f"MACO crops {args.maco_crops or 32}, device {args.device}, seed {args.seed}")
    print(f"# {setting}\n# {machine()}; {elapsed:.0f} s in this invocation (work found in "
          f"{args.out} is reused)")
    print(plain(HEADER, rows))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/quality.py", *argv])
        atomic_write_text(RESULTS / f"quality-k{args.k}{args.name}.md", "\n".join([
            "# Quality: every recipe from facet means and from random starts", "",
            f"`{command}` on {machine()}; {elapsed:.0f} s in this invocation (work found in the "
            "run directory is reused; render times are those recorded when the pictures were "
            "made).", "", f"Settings: {setting}.", "", markdown(HEADER, rows), "",
            "Columns: see the docstring of benchmarks/quality.py."]) + "\n")


if __name__ == "__main__":
    main()

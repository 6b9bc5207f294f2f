"""Quality of MFV's visualizations against random-start baselines, on Imagenette (issue 7).

Usage (small CPU settings, the defaults):
    python benchmarks/quality.py
Full settings (for a GPU: every photo, all 10 class logits, the paper's step counts and
m = 15; the paper's k is 10, k = 3 keeps the comparison with as many random starts telling):
    python benchmarks/quality.py --device cuda --per-class 0 --classes 10 --k 3 --mean-of 15 \
        --steps 0 --out .tmp/bench-quality-full
Other options: --pairs N (constructed neurons, 1..5), --data PATH, --seed, --batch-size,
--no-write. `--steps 0` and `--per-class 0` mean the paper's steps and all photos.

Targets (EfficientNet-Lite0): the first `--classes` Imagenette class logits, over the photos of
their class, and `--pairs` neurons multifaceted by construction, "_fc:A + _fc:B" over the photos
of classes A and B (the pairs of benchmarks/recovery.py). Everything goes through mfv's pipeline
in one run directory: one scan, facets with k = `--k`, then render and evaluate. k
visualizations per target are made four ways (plus one extra row that comes for free):

- MFV paper-mean: the paper's recipe started from each facet's mean image;
- MFV paper-center: the center-biased recipe, started from the same means;
- random start: paper-mean from the authors' noise image (the pipeline's `random` baselines);
- fourier, random start: the Lucid-style recipe from noise (its `random` baselines);
- extra: fourier started from the facet means.

Render runs one recipe at a time (so each recipe is timed), each with its random starts. Metrics
come from the run's results.json: activation ratio (over the maximum on the target's real photos),
fidelity (the visualization's code is nearest its own facet's centre), diversity (mean pairwise
cosine distance of a target's k codes), transferability (rank of the class when Lite1 and Lite2
classify a class-logit visualization), centre dominance, and facet recovery ARI (constructed
neurons). Coverage is computed here: a constructed neuron is covered when each of its two classes
gets at least one of the k visualizations that Lite0 classifies as that class — "pair": the class
has the higher of the two logits; "top-1": the class is Lite0's top-1 of all 1000.

Prints one table and writes it, with the settings and machine, to benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mfv
from mfv.io import atomic_write_json, atomic_write_text, read_json
from mfv.models.base import to_tensor
from mfv.models.classes import imagenet_classes
from recovery import PAIRS, RESULTS, ROOT, link_classes, machine, markdown, pair_target, plain

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-train"
IMAGENETTE = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916",
              "n03417042", "n03425413", "n03445777", "n03888257")
# (row label, recipe, kind of visualization): kind "facet" starts from a facet mean, "random"
# from noise; every recipe is rendered from both.
METHODS = (("MFV paper-mean", "paper-mean", "facet"),
           ("MFV paper-center", "paper-center", "facet"),
           ("random start (paper-mean)", "paper-mean", "random"),
           ("fourier, random start", "fourier", "random"),
           ("extra: fourier from means", "fourier", "facet"))
RECIPES = ("paper-mean", "paper-center", "fourier")
HEADER = ("method", "n", "ARI (purity)", "cov. pair", "cov. top-1", "fidelity", "act. ratio",
          "> facet max", "transfer top-1", "transfer top-5", "centre dom.", "diversity",
          "s / vis.")


def _count(results: dict, recipe: str) -> int:
    return sum(recipe in f["visualizations"] for t in results["targets"] for f in t["facets"]) \
        + sum(len(t["baselines"].get(recipe, [])) for t in results["targets"])


def render_timed(base: dict) -> dict[str, float]:
    """Render recipe by recipe (with its random starts); seconds per visualization of each, as
    recorded when they were made (a rerun that reuses them keeps the recorded times)."""
    timing_path = Path(base["out"]) / "quality_timings.json"
    timings = read_json(timing_path) if timing_path.exists() else {}
    for recipe in RECIPES:
        start = time.perf_counter()
        results = mfv.run(**base, recipes=[recipe], until="render")
        seconds = time.perf_counter() - start
        if seconds > 5 or recipe not in timings:
            timings[recipe] = {"seconds": seconds, "count": _count(results, recipe),
                               "per_visualization": seconds / max(_count(results, recipe), 1)}
            atomic_write_json(timing_path, timings)
    return {r: t["per_visualization"] for r, t in timings.items()}


def lite0_logits(model, run_dir: Path, paths: Sequence[str]) -> np.ndarray:
    """Lite0's 1000 logits for images, preprocessed as a photo would be (resize, centre crop)."""
    batch = torch.stack([to_tensor(model.preprocess, Image.open(run_dir / p).convert("RGB"))
                         for p in paths]).to(model.device)
    with torch.inference_mode():
        return model(batch).float().cpu().numpy()


def visual_paths(target: dict, recipe: str, kind: str) -> list[str]:
    if kind == "facet":
        return [f["visualizations"][recipe]["path"] for f in target["facets"]
                if recipe in f["visualizations"]]
    # as many random starts as facets (a directory re-used with a larger k may hold more)
    return [b["path"] for b in target["baselines"].get(recipe, [])][:len(target["facets"])]


def coverage(model, run_dir: Path, targets: Sequence[dict], recipe: str, kind: str
             ) -> tuple[str, str]:
    """Constructed neurons whose every class gets a visualization classified as it, as 'x/n'
    (pair rule, top-1 rule), with the share of classes covered in parentheses."""
    neurons = {"pair": 0, "top1": 0}
    classes = {"pair": 0, "top1": 0}
    total = 0
    for target in targets:
        pair = [term["unit"] for term in target["target"]["terms"]]  # "_fc:A + _fc:B"
        logits = lite0_logits(model, run_dir, visual_paths(target, recipe, kind))
        by_pair = np.asarray(pair)[logits[:, pair].argmax(1)]
        by_top1 = logits.argmax(1)
        for rule, got in (("pair", by_pair), ("top1", by_top1)):
            hit = [c in got for c in pair]
            classes[rule] += sum(hit)
            neurons[rule] += all(hit)
        total += len(pair)
    n = len(targets)
    return tuple(f"{neurons[r]}/{n} ({classes[r] / total:.0%})" for r in ("pair", "top1"))


def _mean(values: Sequence[float | None]) -> float:
    kept = [float(v) for v in values if v is not None and not np.isnan(float(v))]
    return float(np.mean(kept)) if kept else float("nan")


def _fmt(value: float, digits: int = 2) -> str:
    return "–" if np.isnan(value) else f"{value:.{digits}f}"


def table_rows(model, run_dir: Path, results: dict, seconds: dict[str, float]
               ) -> list[list[str]]:
    targets = results["targets"]
    constructed = [t for t in targets if t["class_index"] is None]
    rows = []
    for label, recipe, kind in METHODS:
        paths = [p for t in targets for p in visual_paths(t, recipe, kind)]
        if not paths:
            continue
        if kind == "facet":
            metrics = [f["metrics"].get(recipe, {}) for t in targets for f in t["facets"]]
            class_metrics = [f["metrics"].get(recipe, {}) for t in targets
                             if t["class_index"] is not None for f in t["facets"]]
            scores = [t["metrics"].get("recovery", {}) for t in constructed]
            ari = (f"{_fmt(_mean([r.get('ari') for r in scores]))} "
                   f"({_fmt(_mean([r.get('purity') for r in scores]))})")
            fidelity = _fmt(_mean([m.get("fidelity") for m in metrics]))
            above = [m["activation_ratio_facet"] > 1 for m in metrics
                     if m.get("activation_ratio_facet") is not None]
            above_max = f"{sum(above)}/{len(above)}" if above else "–"
            diversity = [t["metrics"].get("diversity", {}).get(recipe) for t in targets]
        else:
            metrics = [t["metrics"].get("random", {}).get(recipe, {}) for t in targets]
            class_metrics = [t["metrics"].get("random", {}).get(recipe, {}) for t in targets
                             if t["class_index"] is not None]
            ari = fidelity = above_max = "–"
            diversity = [t["metrics"].get("diversity_random", {}).get(recipe) for t in targets]
        pair, top1 = coverage(model, run_dir, constructed, recipe, kind) if constructed \
            else ("–", "–")
        rows.append([
            label, str(len(paths)), ari, pair, top1, fidelity,
            _fmt(_mean([m.get("activation_ratio") for m in metrics])), above_max,
            _fmt(_mean([m.get("transfer_top1") for m in class_metrics])),
            _fmt(_mean([m.get("transfer_top5") for m in class_metrics])),
            _fmt(_mean([m.get("centre_dominance") for m in metrics])),
            _fmt(_mean(diversity), 3),
            _fmt(seconds.get(recipe, float("nan")), 1)])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--classes", type=int, default=2, help="class logits (first N of 10)")
    ap.add_argument("--pairs", type=int, default=len(PAIRS), help="constructed neurons")
    ap.add_argument("--per-class", type=int, default=30, help="photos per class (0: all)")
    ap.add_argument("--k", type=int, default=2, help="facets (visualizations) per target")
    ap.add_argument("--mean-of", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="steps per recipe (0: the paper's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judges", default=None,
                    help="comma-separated models for transferability ('none': skip; default: "
                         "the pipeline's)")
    ap.add_argument("--out", type=Path, default=ROOT / ".tmp" / "bench-quality")
    ap.add_argument("--no-write", action="store_true", help="do not write results/quality.md")
    args = ap.parse_args(argv)
    if not 0 <= args.classes <= len(IMAGENETTE) or not 0 <= args.pairs <= len(PAIRS):
        ap.error(f"--classes must be in 0..{len(IMAGENETTE)} and --pairs in 0..{len(PAIRS)}")
    if args.classes + args.pairs == 0:
        ap.error("nothing to do: give --classes or --pairs")
    lookup = imagenet_classes().lookup
    class_wnids = IMAGENETTE[:args.classes]
    pairs = PAIRS[:args.pairs]
    wnids = sorted({*class_wnids, *(w for p in pairs for w in p)})
    images = link_classes(args.data, wnids, args.out / "images", args.per_class or None)
    targets = [f"_fc:{lookup(w)}" for w in class_wnids] + [pair_target(p) for p in pairs]
    base = {"images": str(images), "targets": targets, "out": str(args.out / "run"),
            "selection": "class", "facets": args.k, "mean_of": args.mean_of,
            "steps": args.steps or None, "device": args.device, "seed": args.seed,
            "batch_size": args.batch_size, "progress": False}
    if args.judges is not None:
        base["judges"] = [] if args.judges == "none" else args.judges.split(",")
    start = time.perf_counter()
    mfv.run(**base, until="facets")  # scan and facets once, before render is timed
    seconds = render_timed(base)
    results = mfv.run(**base, recipes=list(RECIPES))
    model = mfv.load_model("efficientnet_lite0", device=args.device)
    rows = table_rows(model, args.out / "run", results, seconds)
    elapsed = time.perf_counter() - start
    setting = (f"{args.classes} class logits + {args.pairs} constructed neurons, "
               f"{results['data']['n_images']} photos "
               f"({args.per_class or 'all'} per class), k={args.k}, mean of {args.mean_of}, "
               f"steps {args.steps or 'paper'}, device {args.device}, seed {args.seed}")
    print(f"# {setting}\n# {machine()}; {elapsed:.0f} s in this invocation (work found in "
          f"{args.out} is reused)")
    print(plain(HEADER, rows))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/quality.py", *argv])
        atomic_write_text(RESULTS / "quality.md", "\n".join([
            "# Quality: MFV against random-start baselines", "",
            f"`{command}` on {machine()}; {elapsed:.0f} s in this invocation (work found in "
            "the run directory is reused; render times are those recorded when the images were "
            "made).", "", f"Settings: {setting}.", "",
            markdown(HEADER, rows), "", NOTES]) + "\n")


NOTES = """\
n: visualizations in the row. ARI (purity): facet recovery on the constructed neurons, adjusted
Rand index and purity of the k facets against the two true classes (the same facets serve every
MFV row; with k > 2 a perfect split of the classes has purity 1 but ARI < 1). cov. pair /
cov. top-1: constructed neurons whose two classes each get a visualization that Lite0 classifies
as that class (pair: the higher of the two class logits; top-1: Lite0's top-1 of 1000), with the
share of classes covered. fidelity: share of visualizations whose code is nearest their own
facet's centre. act. ratio: the target on the visualization over its maximum on the target's
photos. > facet max: visualizations whose activation exceeds the maximum over their own
facet's photos (issue 5's acceptance: at least 90 % for MFV paper-mean). transfer
top-1/top-5: share of class-logit visualizations that Lite1 and Lite2 rank the
class first / in the top 5. centre dom.: (centre - mean corner) / (|centre| + |mean corner|) of
the target on half-size crops. diversity: mean pairwise cosine distance of a target's
visualizations' penultimate codes. s / vis.: render seconds per visualization of the recipe (the
wall time of its batches over their size)."""


if __name__ == "__main__":
    main()

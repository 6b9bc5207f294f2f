"""Where do facet pictures leave their facet? (issue 12, item 1)

On neurons multifaceted by construction ("_fc:A + _fc:B" over the photos of classes A and B,
the pairs of benchmarks/recovery.py), the facets (k per neuron) are found as `mfv run` finds
them, then each recipe is run from the facet mean images while every optimization step records
the code (Lite0's penultimate features) of the view the optimizer drives. Printed per recipe and
at a few points of the schedule:

- own / sibling: mean distance of the picture's code to its own facet's centre and to the
  nearest other facet's centre, both in units of the own facet's radius (RMS distance of its
  members to the centre): a picture in its facet has own < 1 and own < sibling;
- in facet: share of pictures whose nearest centre is their own (fidelity, step by step);
- own class: share of pictures that Lite0 classifies (of the neuron's two classes) as the class
  of their facet's photos.

Usage: python benchmarks/diagnose.py [--pairs 3] [--per-class 30] [--k 2] [--steps 0]
       [--recipes paper-mean,paper-center,fourier,anchored] [--device cpu] [--out DIR]
`--steps 0` runs each recipe's own schedule (370 / 530 / 256 / 256 steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import mfv
from mfv.core.io import atomic_write_text
from mfv.models.activations import capture
from mfv.models.classes import imagenet_classes
from mfv.models.targets import parse_targets, resolve_layer
from mfv.render.anchor import Anchor, AnchoredObjective, AnchorSettings
from mfv.render.objective import Objective
from mfv.render.recipes.fourier import FourierSettings, fourier_loop
from mfv.render.recipes.paper import paper_loop, schedule
from mfv.runtime.rundir import RunDir
from mfv.scan.scanner import ScanResult
from recovery import PAIRS, RESULTS, ROOT, link_classes, machine, markdown, pair_target, plain

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-train"
CHECKPOINTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


class Recorder:
    """An objective that also records, at every call, the code of the central input-size view
    of what it was given and the logits of the pair's classes."""

    def __init__(self, inner, code_ref, logits_ref) -> None:
        self.inner, self.model = inner, inner.model
        self.code_ref, self.logits_ref = code_ref, logits_ref
        self.codes: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []

    def _record(self, store) -> None:
        self.codes.append(store[self.code_ref.key].detach().flatten(1).float().cpu().numpy())
        self.logits.append(store[self.logits_ref.key].detach().float().cpu().numpy())

    def __call__(self, images: torch.Tensor, kind: str = "target") -> torch.Tensor:
        with capture(self.model, [self.code_ref, self.logits_ref]) as store:
            value = self.inner(images, kind)
            self._record(store)
        return value

    def maximize(self, images: torch.Tensor):
        with capture(self.model, [self.code_ref, self.logits_ref]) as store:
            out = self.inner.maximize(images)
            self._record(store)
        return out


def facet_jobs(results: dict, run: RunDir, scan_codes: np.ndarray, classes) -> list[dict]:
    """Per facet: target index, mean image, own and sibling centres, radius, true class."""
    jobs = []
    paths = {p: i for i, p in enumerate(results["_paths"])}
    for t_index, target in enumerate(results["targets"]):
        centres = np.stack([np.asarray(scan_codes[[paths[m] for m in f["members"]]]).mean(0)
                            for f in target["facets"]])
        for facet in target["facets"]:
            rows = [paths[m] for m in facet["members"]]
            codes = np.asarray(scan_codes[rows])
            radius = float(np.sqrt(((codes - centres[facet["rank"]]) ** 2).sum(1).mean()))
            labels = [classes.lookup(Path(m).parent.name) for m in facet["members"]]
            mean = np.load(run.root / Path(facet["mean_image"]).with_suffix(".npy"))
            jobs.append({"target": t_index, "rank": facet["rank"], "centres": centres,
                         "radius": radius, "class": int(np.bincount(labels).argmax()),
                         "pair": [t["unit"] for t in target["target"]["terms"]],
                         "mean": mean, "spread": radius ** 2,
                         "best": facet["activation_real"]["max"]})
    return jobs


def trajectories(recorder: Recorder, jobs: Sequence[dict]) -> dict[str, np.ndarray]:
    """(steps, facets) arrays: own / sibling distance in own radii, in facet, own class."""
    codes = np.stack(recorder.codes)  # (steps, B, D)
    logits = np.stack(recorder.logits)  # (steps, B, 1000)
    own = np.empty(codes.shape[:2])
    sibling = np.empty_like(own)
    own_class = np.empty_like(own)
    for b, job in enumerate(jobs):
        d = np.linalg.norm(codes[:, b, None, :] - job["centres"][None], axis=2) / job["radius"]
        own[:, b] = d[:, job["rank"]]
        others = np.delete(d, job["rank"], axis=1)
        sibling[:, b] = others.min(1) if others.size else np.inf
        pair = job["pair"]
        own_class[:, b] = np.asarray(pair)[logits[:, b, pair].argmax(1)] == job["class"]
    return {"own": own, "sibling": sibling, "in_facet": own < sibling, "own_class": own_class}


def run_recipe(recipe: str, model, targets, jobs, steps: int | None, code_ref, logits_ref
               ) -> dict[str, np.ndarray]:
    objective = Objective(model, targets, [j["target"] for j in jobs])
    starts = [torch.from_numpy(j["mean"]).permute(2, 0, 1).float() for j in jobs]
    seeds = list(range(len(jobs)))
    if recipe == "anchored":
        anchors = [Anchor(j["centres"][j["rank"]], j["spread"], j["best"]) for j in jobs]
        objective = AnchoredObjective(objective, anchors, code_ref, AnchorSettings())
    recorder = Recorder(objective, code_ref, logits_ref)
    if recipe in ("fourier", "anchored"):
        fourier_loop(recorder, starts, seeds, FourierSettings().with_steps(steps))
    else:
        paper_loop(recorder, starts, seeds, schedule(recipe, steps))
    return trajectories(recorder, jobs)


def summary_rows(recipe: str, traj: dict[str, np.ndarray]) -> list[list[str]]:
    n = len(traj["own"])
    rows = []
    for point in CHECKPOINTS:
        step = min(n - 1, round(point * (n - 1)))
        rows.append([recipe, f"{step + 1}/{n}", f"{traj['own'][step].mean():.2f}",
                     f"{np.median(traj['sibling'][step]):.2f}",
                     f"{traj['in_facet'][step].mean():.0%}",
                     f"{traj['own_class'][step].mean():.0%}"])
    left = [int(np.argmax(~traj["in_facet"][:, b])) if (~traj["in_facet"][:, b]).any() else None
            for b in range(traj["own"].shape[1])]
    gone = [s for s in left if s is not None]
    rows.append([recipe, "ever outside (start incl.)", f"{len(gone)}/{len(left)} pictures",
                 f"first at step {int(np.median(gone)) + 1} (median)" if gone else "–", "", ""])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--mean-of", type=int, default=10)
    ap.add_argument("--steps", type=int, default=0, help="0: each recipe's own schedule")
    ap.add_argument("--recipes", default="paper-mean,paper-center,fourier,anchored")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / ".tmp" / "bench-diagnose")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    pairs = PAIRS[:args.pairs]
    images = link_classes(args.data, [w for p in pairs for w in p], args.out / "images",
                          args.per_class)
    run_dir = args.out / "run"
    results = mfv.run(images=str(images), targets=[pair_target(p) for p in pairs],
                      out=str(run_dir), selection="class", facets=args.k, mean_of=args.mean_of,
                      device=args.device, progress=False, until="facets").to_dict()
    run = RunDir(run_dir)
    scan = ScanResult.load(run.scan(results["data"]["scan_key"]))
    results["_paths"] = scan.paths
    model = mfv.load_model("efficientnet_lite0", device=args.device)
    targets = parse_targets([t["spec"] for t in results["targets"]], model)
    jobs = facet_jobs(results, run, scan.codes, imagenet_classes())
    code_ref, logits_ref = resolve_layer(model, "penultimate"), resolve_layer(model, "logits")
    header = ("recipe", "step", "own (radii)", "sibling (median)", "in facet", "own class")
    rows, seconds = [], {}
    for recipe in args.recipes.split(","):
        started = time.perf_counter()
        traj = run_recipe(recipe, model, targets, jobs, args.steps or None, code_ref,
                          logits_ref)
        seconds[recipe] = time.perf_counter() - started
        rows += summary_rows(recipe, traj)
        print(plain(header, summary_rows(recipe, traj)), flush=True)
    setting = (f"{len(pairs)} constructed neurons, {args.per_class} photos per class, k={args.k}, "
               f"mean of {args.mean_of}, steps {args.steps or 'each recipe’s own'}, "
               f"{len(jobs)} facets; central view of each step; seconds: "
               + ", ".join(f"{r} {s:.0f}" for r, s in seconds.items()))
    print(f"# {setting}\n# {machine()}")
    if not args.no_write:
        command = " ".join(["python benchmarks/diagnose.py", *argv])
        atomic_write_text(RESULTS / f"diagnose-k{args.k}.md", "\n".join([
            "# Where facet pictures leave their facet", "", f"`{command}` on {machine()}.", "",
            f"Settings: {setting}.", "", markdown(header, rows), ""]) + "\n")


if __name__ == "__main__":
    main()

"""`RUN/results.json`: the machine-readable face of a run (schema `mfv.results/1`).

Built from whatever the run directory holds, so it can be refreshed after every stage. Paths of
generated files are relative to the run directory; input images keep the path they were given
with (relative ones resolve against `data.base`). The schema is documented in `docs/results.md`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mfv.facets import load_facets
from mfv.io import read_json
from mfv.scan import ScanResult

if TYPE_CHECKING:
    from mfv.pipeline import Run

SCHEMA = "mfv.results/1"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("mfv", "torch", "numpy", "scipy", "scikit-learn", "scikit-image", "openTSNE",
                    "pillow"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_results(run: Run) -> dict:
    """Assemble results.json content from the run directory's current state."""
    root = run.dir
    previous = root / "results.json"
    created = read_json(previous).get("created") if previous.exists() else None
    scan_manifest = root / "scan" / "manifest.json"
    manifest = read_json(scan_manifest) if scan_manifest.exists() else None
    complete = manifest is not None and manifest.get("status") == "complete"
    evaluation = read_json(root / "evaluate.json") if (root / "evaluate.json").exists() else {}
    results: dict = {
        "schema": SCHEMA,
        "mfv_version": versions().get("mfv", "unknown"),
        "created": created or _now(),
        "updated": _now(),
        "stages": {},
        "model": run.model.describe(),
        "data": None,
        "settings": run.settings.to_dict(),
        "versions": versions(),
        "timings": dict(run.timings),
        "targets": [],
    }
    if complete:
        results["data"] = {
            "source": manifest["source"], "base": os.getcwd(),
            "n_images": len(manifest["images"]), "n_valid": manifest["n_valid"],
            "fingerprint": manifest["fingerprint"], "skipped": manifest["bad"],
            "code_layer": manifest["code_layer"],
        }
    stages = {"scan": complete}
    scan = ScanResult(root / "scan", manifest) if complete else None
    paths = [row[0] for row in manifest["images"]] if complete else []
    labels = [row[1] for row in manifest["images"]] if complete else []
    any_facets = any_render = False
    for target, slug in zip(run.targets, run.slugs, strict=True):
        entry = _target_entry(run, scan, target, slug, paths, labels,
                              evaluation.get(slug, {}))
        any_facets |= bool(entry["facets"])
        any_render |= any(f["visualizations"] for f in entry["facets"])
        results["targets"].append(entry)
    stages.update(facets=any_facets, render=any_render, evaluate=bool(evaluation),
                  report=(root / "index.html").exists())
    results["stages"] = {k: "done" if v else "missing" for k, v in stages.items()}
    if evaluation.get("_summary"):
        results["evaluation"] = evaluation["_summary"]
    return results


def _target_entry(run: Run, scan: ScanResult | None, target, slug: str, paths: list[str],
                  labels: list, metrics: dict) -> dict:
    classes = run.model.classes
    entry = {
        "spec": target.spec, "slug": slug, "class_index": target.class_index,
        "class_name": (classes.names[target.class_index]
                       if classes is not None and target.class_index is not None else None),
        "target": target.to_dict(), "selection": None, "activation_max_real": None,
        "k_requested": None, "k_chosen": None, "map": [], "facets": [], "baselines": {},
        "metrics": metrics.get("target", {}),
    }
    facet_dir = run.dir / "facets" / slug
    if not (facet_dir / "facets.json").exists() or scan is None:
        return entry
    facets = load_facets(facet_dir)
    scan_acts = scan.activation_of(scan.target_index(target.spec), facets.selected)
    entry["selection"] = {"policy": facets.settings.get("selection_policy"),
                          "n": int(len(facets.selected)), "top_n": run.settings.top_n}
    entry["activation_max_real"] = float(np.nanmax(scan_acts)) if len(scan_acts) else None
    entry["k_requested"], entry["k_chosen"] = facets.k_requested, facets.k_chosen
    entry["clustering"] = {"settings": facets.settings, "timings": facets.timings,
                           "scores": {str(k): v for k, v in facets.scores.items()}}
    entry["map"] = [
        {"path": paths[i], "x": round(float(x), 4), "y": round(float(y), 4),
         "facet": int(f), "activation": round(float(a), 5), "label": labels[i]}
        for i, (x, y), f, a in zip(facets.selected, facets.coords_2d, facets.assignment,
                                   scan_acts, strict=True)]
    target_dir = run.dir / "targets" / slug
    rendered = read_json(target_dir / "render.json") if (target_dir / "render.json").exists() \
        else {}

    def rel(name: str) -> str:
        return Path("targets", slug, name).as_posix()

    facet_metrics = metrics.get("facets", {})
    for facet in facets.facets:
        stem = f"facet{facet.rank:02d}"
        visuals = {}
        for name, record in rendered.items():
            if name.startswith(stem + "_"):
                recipe = name[len(stem) + 1:]
                visuals[recipe] = {"path": rel(record["path"]), "activation": record["activation"],
                                   "trace": rel(record["trace"])}
        entry["facets"].append({
            "rank": facet.rank, "size": facet.size,
            "members": [paths[i] for i in facet.members],
            "representatives": [paths[i] for i in facet.representatives],
            "mean_image": rel(f"{stem}_mean.png"),
            "activation_real": {"mean": facet.activation_mean, "max": facet.activation_max},
            "visualizations": visuals,
            "metrics": facet_metrics.get(stem, {}),
        })
    for name, record in sorted(rendered.items()):
        if name.startswith("random"):
            recipe = name.split("_", 1)[1]
            entry["baselines"].setdefault(recipe, []).append(
                {"path": rel(record["path"]), "activation": record["activation"],
                 "trace": rel(record["trace"])})
    return entry


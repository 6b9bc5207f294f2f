"""`RUN/results.json`: the machine-readable face of a run, built as `mfv.results.Results`.

Built from the plain objects the pipeline holds (the scan, each target's facets, visualizations
and metrics), never by reading files back, so it says exactly what the current settings have
produced. Paths of generated files are relative to the run directory; input images keep the path
they were given with (relative ones resolve against `data.base`). The model, its schema version
and `docs/results.schema.json` are in `mfv.results.model`; the file is strict JSON.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

from mfv.core.io import atomic_write_text
from mfv.facets.find import FacetResult
from mfv.models.targets import Target
from mfv.results.model import SCHEMA, STAGES, Results
from mfv.runtime.rundir import RenderEntry, RunDir
from mfv.scan.scanner import ScanResult

__all__ = ["STAGES", "RunState", "TargetRecord", "build", "write"]


@dataclass
class TargetRecord:
    """What the run holds for one target, as far as it got."""

    target: Target
    slug: str
    class_name: str | None = None
    facets: FacetResult | None = None
    facets_key: str | None = None
    visuals: list[RenderEntry] = field(default_factory=list)  # current ones only
    metrics: dict | None = None


@dataclass
class RunState:
    """What the pipeline holds when it publishes: `done` names the stages finished for the
    current settings; `error` says why the run stopped early (the results then cover what was
    finished); `created` is the first run's time, kept across reruns."""

    settings: dict
    model: dict
    device: str
    scan: ScanResult | None
    records: Sequence[TargetRecord]
    timings: dict
    done: set[str]
    error: str | None = None
    created: str | None = None
    evaluation: dict | None = None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("mfv", "torch", "numpy", "scipy", "scikit-learn", "scikit-image", "openTSNE",
                    "pillow"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(run: RunDir, state: RunState) -> Results:
    """The typed results of the run as far as `state` goes."""
    s = state
    found = versions()
    doc: dict = {
        "schema": SCHEMA, "mfv_version": found.get("mfv", "unknown"),
        "created": s.created or now(), "updated": now(),
        "status": "failed" if s.error else ("complete" if s.done >= set(STAGES) else "partial"),
        "error": s.error,
        "stages": {stage: "done" if stage in s.done else "missing" for stage in STAGES},
        "model": s.model, "device": s.device, "data": None, "settings": s.settings,
        "versions": found, "timings": dict(s.timings),
        "targets": [_target(run, s.scan, record, s.settings) for record in s.records],
    }
    if s.scan is not None:
        m = s.scan.manifest
        doc["data"] = {"source": m["source"], "base": os.getcwd(), "n_images": len(m["images"]),
                       "n_valid": m["n_valid"], "fingerprint": m["fingerprint"],
                       "skipped": m["bad"], "code_layer": m["code_layer"], "scan_key": m["key"]}
    if s.evaluation:
        doc["evaluation"] = s.evaluation
    return Results.model_validate(doc)


def write(run: RunDir, results: Results) -> None:
    """Write results.json (atomically, strict JSON)."""
    atomic_write_text(run.results_file, results.to_json())


def _target(run: RunDir, scan: ScanResult | None, record: TargetRecord, settings: dict) -> dict:
    target = record.target
    entry: dict = {
        "spec": target.spec, "slug": record.slug, "class_index": target.class_index,
        "class_name": record.class_name, "target": target.to_dict(), "selection": None,
        "activation_max_real": None, "k_requested": None, "k_chosen": None, "map": [],
        "facets": [], "baselines": {}, "metrics": (record.metrics or {}).get("target", {}),
    }
    facets = record.facets
    if facets is None or scan is None:
        return entry
    paths, labels = scan.paths, scan.labels
    acts = scan.activation_of(scan.target_index(target.spec), facets.selected)
    entry["selection"] = {"policy": facets.settings.get("selection_policy"),
                          "n": int(len(facets.selected)), "top_n": settings.get("top_n")}
    entry["activation_max_real"] = float(np.nanmax(acts)) if len(acts) else None
    entry["k_requested"], entry["k_chosen"] = facets.k_requested, facets.k_chosen
    entry["clustering"] = {"settings": facets.settings, "timings": facets.timings,
                           "scores": {str(k): v for k, v in facets.scores.items()}}
    entry["map"] = [
        {"path": paths[i], "x": round(float(x), 4), "y": round(float(y), 4), "facet": int(f),
         "activation": round(float(a), 5), "label": labels[i]}
        for i, (x, y), f, a in zip(facets.selected, facets.coords_2d, facets.assignment, acts,
                                   strict=True)]
    store = run.target(record.slug)

    def visual(e: RenderEntry) -> dict:
        out = {"path": run.relative(store.file(e.files["image"])), "activation": e.activation,
               "trace": run.relative(store.file(e.files["trace"]))}
        if "alpha" in e.files:
            out["alpha"] = run.relative(store.file(e.files["alpha"]))
        return out

    facet_metrics = (record.metrics or {}).get("facets", {})
    for facet in facets.facets:
        entry["facets"].append({
            "rank": facet.rank, "size": facet.size,
            "members": [paths[i] for i in facet.members],
            "representatives": [paths[i] for i in facet.representatives],
            "boxes": [list(facet_box) for i in facet.members
                      if (facet_box := facets.box_of(i)) is not None],
            "mean_image": run.relative(store.mean_image_file(record.facets_key, facet.rank)),
            "activation_real": {"mean": facet.activation_mean, "max": facet.activation_max},
            "visualizations": {e.recipe: visual(e) for e in record.visuals
                               if e.kind == "facet" and e.rank == facet.rank},
            "metrics": facet_metrics.get(f"facet{facet.rank:02d}", {}),
        })
    for e in sorted((e for e in record.visuals if e.kind == "random"), key=lambda e: e.rank):
        entry["baselines"].setdefault(e.recipe, []).append(visual(e))
    return entry

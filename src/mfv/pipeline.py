"""The pipeline: images → scan → facets → render → evaluate → report, over one run directory.

`run()` checks everything it can before it touches the run directory (settings, device, model,
targets, images), takes the directory's lock, and runs the stages in order. Each stage keys its
results by what determines them (`mfv.rundir`), reuses what is stored under the same key, and
hands what it made to the next stage. `results.json` and `index.html` are written after the last
stage asked for, and also when a stage fails — then they cover what was finished, with the error.
Stages before the requested one run when missing; stored results of later stages that still
match the settings are shown too.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from mfv.errors import MfvError
from mfv.evaluate import Picture, evaluate_target, networks, summary
from mfv.facets import FacetOptions, facet_means, facets_of_target
from mfv.images import load_rgb
from mfv.models import LoadedModel, load_model
from mfv.preprocess import Preprocess
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, RenderOptions, Result, render_batches
from mfv.render.plan import RenderSettings, Visual, plan
from mfv.render.recipes import FACET_RECIPES, AnchorSettings
from mfv.report import write_report
from mfv.results import STAGES, TargetRecord, build
from mfv.rundir import RunDir, check_out, digest, open_run, slug
from mfv.scan import ScanResult, scan
from mfv.settings import Settings, make_settings
from mfv.sources import ImageList, open_images
from mfv.targets import Target, parse_targets, resolve_layer

METRICS_VERSION = 3  # bump when evaluate's metrics change, so stored ones are recomputed


def run(settings: Settings | None = None, *, model: str | nn.Module | LoadedModel | None = None,
        preprocess: Preprocess | None = None, until: str = "report", **options) -> dict:
    """Run the pipeline up to `until` (a stage name) and return the results object (what
    `RUN/results.json` holds).

    `mfv.run(images="photos/", targets=["bell pepper"], out="runs/pepper")` in a notebook is
    `mfv run --images photos/ --target "bell pepper" --out runs/pepper` on the command line.
    `model` may be a name or file (as `--model`), an `nn.Module` (with its `preprocess`), or a
    `LoadedModel`; the run directory records its class, size and weights' fingerprint.
    """
    if until not in STAGES:
        raise MfvError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    line = _prepare(settings, model, preprocess, options)
    with open_run(line.settings.out) as rundir:
        return _Line(*line, rundir).run(until)


def scan_images(settings: Settings | None = None, *,
                model: str | nn.Module | LoadedModel | None = None,
                preprocess: Preprocess | None = None, **options) -> ScanResult:
    """Only the scan of a run (its targets and `scan_targets`), returned as a `ScanResult`."""
    line = _prepare(settings, model, preprocess, options)
    with open_run(line.settings.out) as rundir:
        stages = _Line(*line, rundir)
        stages.run("scan")
        return stages.scanned


@dataclass(frozen=True)
class _Inputs:
    settings: Settings
    model: LoadedModel
    images: ImageList
    targets: list[Target]
    scan_targets: list[Target]

    def __iter__(self):
        return iter((self.settings, self.model, self.images, self.targets, self.scan_targets))


def _prepare(settings: Settings | None, model, preprocess, options: dict) -> _Inputs:
    """Everything a run needs, checked before the run directory is touched: settings, device
    and model, targets (before the images, so a typo is reported first), images."""
    settings = settings.updated(**options) if settings is not None else make_settings(**options)
    check_out(settings.out)
    loaded = prepare_model(settings, model, preprocess)
    if model is not None and not isinstance(model, str):
        settings = settings.updated(model=loaded.name)
    targets = []
    if settings.targets or not settings.scan_targets:
        targets = parse_run_targets(settings.targets, loaded, settings)
    scan_targets = parse_targets(list(settings.scan_targets), loaded, settings.reduction,
                                 settings.activation)
    return _Inputs(settings, loaded, open_images(settings.images), targets, scan_targets)


def prepare_model(settings: Settings, model: str | nn.Module | LoadedModel | None = None,
                  preprocess: Preprocess | None = None) -> LoadedModel:
    """The model a run uses, on its device, at its input size."""
    loaded = load_model(model if model is not None else settings.model, device=settings.device,
                        weights=settings.weights, preprocess=preprocess)
    if settings.size is not None:
        loaded.preprocess = loaded.preprocess.resized(settings.size)
    return loaded


def parse_run_targets(specs: Sequence[str], model: LoadedModel, settings: Settings
                      ) -> list[Target]:
    if not specs:
        raise MfvError("no target given: add --target LAYER:UNIT or a class name "
                       "(see `mfv layers MODEL`)")
    targets = parse_targets(list(specs), model, settings.reduction, settings.activation)
    if any(spec.strip().endswith(":*") for spec in specs):
        raise MfvError("LAYER:* (every unit) is for scanning; give single units, class names "
                       "or sums as --target")
    return targets


@dataclass
class _Line:
    """One pipeline run over a locked run directory: the stages and what they have made."""

    settings: Settings
    model: LoadedModel
    images: ImageList
    targets: list[Target]
    scan_targets: list[Target]
    rundir: RunDir
    scanned: ScanResult | None = None
    records: list[TargetRecord] = field(default_factory=list)
    means: list[list[np.ndarray]] = field(default_factory=list)
    planned: list[Visual] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        classes = self.model.classes
        self.records = [TargetRecord(t, slug(t.spec, t.to_dict()), class_name=(
            classes.names[t.class_index] if classes is not None and t.class_index is not None
            else None)) for t in self.targets]
        self.timings = self.rundir.read_record("timings") or {}

    def run(self, until: str) -> dict:
        self.rundir.write_record("settings", self.settings.to_dict())
        self.rundir.write_record("model", self.model.describe())
        last = STAGES.index(until)
        try:
            self._timed("scan", self._scan)
            for i, stage in enumerate(("facets", "render", "evaluate"), start=1):
                if not self.records:
                    break
                execute = i <= last
                self._timed(stage, functools.partial(getattr(self, f"_{stage}"), execute))
        except BaseException as error:
            self._collect_visuals()  # what a failed render finished is shown
            self._publish(error=str(error) or type(error).__name__)
            raise
        results = self._publish()
        if until == "report" and self.done >= {"facets", "render", "evaluate"}:
            self._prune()
        return results

    def _timed(self, stage: str, work) -> None:
        started = time.perf_counter()
        if work() is not False:  # a stage that did real work records its time
            self.timings[stage] = round(time.perf_counter() - started, 3)
            self.rundir.write_record("timings", self.timings)

    # ----------------------------------------------------------------------------- stages
    def _scan(self) -> bool:
        s = self.settings
        merged = list({t.spec: t for t in [*self.scan_targets, *self.targets]}.values())
        self.scanned = scan(self.model, self.images, merged, self.rundir,
                            code_layer=s.code_layer, batch_size=s.scan_batch_size,
                            workers=s.workers, mode=s.scan_mode, top_n=s.top_n,
                            progress=s.progress)
        if self.scanned is None:  # pragma: no cover - only with shards
            raise MfvError("the scan is incomplete")
        self.done.add("scan")
        self.timings["scan"] = round(self.scanned.manifest["seconds"], 3)  # its own compute time
        return False

    def _facets(self, execute: bool) -> bool:
        s, result = self.settings, self.scanned
        labels = result.class_labels(self.model.classes)
        options = FacetOptions(s.selection, s.top_n, s.facets, s.mean_of, s.embedding, s.merge,
                               s.min_facet_size, s.seed)
        worked = False
        self.means = []
        for record in self.records:
            target = record.target
            key = digest({"scan": result.key, "target": target.to_dict(),
                          "options": options.__dict__, "mean_resize": s.mean_resize,
                          "size": self.model.preprocess.input_size})
            stored = self.rundir.target(record.slug).load_facets(key)
            if stored is None and not execute:
                return worked
            if stored is None:
                facets = facets_of_target(result.activations_of(result.target_index(target.spec)),
                                          result.codes, result.valid, labels, target.classes,
                                          options, target.spec)
                means = facet_means(facets, functools.partial(self._pixels, result.paths))
                self.rundir.target(record.slug).save_facets(key, facets, means)
                stored, worked = (facets, means), True
            record.facets, record.facets_key = stored[0], key
            self.means.append(stored[1])
        self.done.add("facets")
        return worked

    def _pixels(self, paths: list[str], indices: np.ndarray) -> np.ndarray:
        """(m, S, S, 3) images at the model's input size in 0..255, resized for mean images."""
        pre, policy = self.model.preprocess, self.settings.mean_resize
        return np.stack([np.round(pre.to_array(load_rgb(paths[i]), policy) * 255)
                         .astype(np.uint8).transpose(1, 2, 0) for i in indices])

    def _render(self, execute: bool) -> bool:
        if "facets" not in self.done:
            return False
        s = self.settings
        self.planned = plan([r.target.to_dict() for r in self.records],
                            [r.slug for r in self.records], self.means,
                            [r.facets_key for r in self.records], self._render_settings())
        stores = [self.rundir.target(r.slug) for r in self.records]
        indexes = [store.render_index() for store in stores]
        todo = [v for v in self.planned
                if (stored := indexes[v.target].get(v.slot)) is None or stored.key != v.key]
        worked = bool(todo) and execute
        if worked:
            for recipe in s.recipes:
                self._render_recipe(recipe, [v for v in todo if v.recipe == recipe], stores)
        if self._collect_visuals() == len(self.planned):
            self.done.add("render")
        return worked

    def _render_settings(self) -> RenderSettings:
        s = self.settings
        spectrum = digest(self.scanned.spectrum) if "maco" in s.recipes else None
        return RenderSettings(s.recipes, s.baseline, s.steps, s.as_written, s.seed,
                              self.model.preprocess.input_size, self.model.fingerprint(),
                              s.code_layer, self._anchor_settings(), s.maco_crops, spectrum)

    def _anchor_settings(self) -> AnchorSettings:
        s = self.settings
        return AnchorSettings(s.anchor_weight, s.match_weight, s.match_layers)

    def _anchor(self, visual: Visual) -> Anchor | None:
        """The facet a visualization of an anchored recipe keeps to (None for random starts)."""
        if visual.kind != "facet" or visual.recipe not in FACET_RECIPES:
            return None
        facet = self.records[visual.target].facets.facets[visual.rank]
        photos = self._pixels(self.scanned.paths, facet.representatives)
        return Anchor(facet.code_centre, facet.code_spread, facet.activation_max,
                      photos.transpose(0, 3, 1, 2).astype(np.float32))

    def _collect_visuals(self) -> int:
        """Give each record the stored visualizations that the plan still asks for; how many."""
        current = {(v.target, v.slot): v.key for v in self.planned}
        for t, record in enumerate(self.records):
            index = self.rundir.target(record.slug).render_index()
            record.visuals = [e for slot, e in sorted(index.items())
                              if current.get((t, slot)) == e.key]
        return sum(len(r.visuals) for r in self.records)

    def _render_recipe(self, recipe: str, todo: list[Visual], stores) -> None:
        if not todo:
            return
        s = self.settings

        def save(rows: list[int], results: list[Result]) -> None:
            by_target: dict[int, list] = {}
            for row, res in zip(rows, results, strict=True):
                v = todo[row]
                entry = stores[v.target].write_visual(v.kind, v.rank, recipe, v.key,
                                                      image=res.image, trace=res.trace,
                                                      activation=res.activation, alpha=res.alpha)
                by_target.setdefault(v.target, []).append(entry)
            for t, entries in by_target.items():
                stores[t].record(entries)

        jobs = [Job(v.target, None if v.start is None else
                    torch.from_numpy(np.asarray(v.start, np.float32)).permute(2, 0, 1), v.seed,
                    self._anchor(v)) for v in todo]
        options = RenderOptions(s.steps, s.as_written, s.code_layer, self._anchor_settings(),
                                s.maco_crops, self.scanned.spectrum if recipe == "maco" else None)
        render_batches(self.model, self.targets, jobs, recipe, options,
                       batch_size=s.batch_size, progress=s.progress, on_batch=save)

    def _evaluate(self, execute: bool) -> bool:
        if "render" not in self.done:
            return False
        s, result = self.settings, self.scanned
        labels = result.class_labels(self.model.classes)
        nets = None
        worked = False
        for record in self.records:
            store = self.rundir.target(record.slug)
            key = digest({"visuals": sorted(e.key for e in record.visuals),
                          "facets": record.facets_key, "judges": list(s.judges),
                          "code_layer": s.code_layer, "seed": s.seed,
                          "version": METRICS_VERSION})
            metrics = store.load_evaluation(key)
            if metrics is None and not execute:
                return worked
            if metrics is None:
                if nets is None:
                    nets = networks(self.model, resolve_layer(self.model, s.code_layer),
                                    s.judges)
                metrics = self._evaluate_target(record, labels, *nets)
                store.save_evaluation(key, metrics)
                worked = True
            record.metrics = metrics
        self.done.add("evaluate")
        return worked

    def _evaluate_target(self, record: TargetRecord, labels, own, judges) -> dict:
        result, facets = self.scanned, record.facets
        store = self.rundir.target(record.slug)
        real = result.activation_of(result.target_index(record.target.spec), facets.selected)
        pictures = [Picture(e.kind, e.rank, e.recipe, e.activation,
                            _open_rgb(store.file(e.files["image"]))) for e in record.visuals]
        members = [[result.paths[i] for i in f.members] for f in facets.facets]
        truth = labels[facets.selected] if labels is not None else None
        return evaluate_target(own, judges, record.target, facets, pictures, members,
                               float(np.nanmax(real)), truth, self.settings.seed)

    # ----------------------------------------------------------------------------- outputs
    def _publish(self, error: str | None = None) -> dict:
        """Write results.json and the report for what the current settings have produced."""
        previous = self.rundir.read_record("results")
        done = set(self.done) if error is None else self.done - {"report"}
        evaluation = summary({r.slug: r.metrics for r in self.records if r.metrics}) \
            if "evaluate" in done else None
        common = dict(settings=self.settings.to_dict(), model=self.model.describe(),
                      device=str(self.model.device),
                      scan=self.scanned, records=self.records, timings=self.timings,
                      error=error, created=(previous or {}).get("created"),
                      evaluation=evaluation)
        results = build(self.rundir, done=done | ({"report"} if error is None else set()),
                        **common)
        write_report(self.rundir, results, progress=self.settings.progress)
        self.rundir.write_record("results", results)
        return results

    def _prune(self) -> None:
        current: dict[str, tuple[str | None, dict]] = {
            r.slug: (r.facets_key, {}) for r in self.records}
        for v in self.planned:
            current[self.records[v.target].slug][1][v.slot] = v.key
        self.rundir.prune({self.scanned.key}, current)


def _open_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))

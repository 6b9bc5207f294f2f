"""The pipeline: images → scan → facets → render → evaluate → report, over one run directory.

`run()` checks everything it can before it touches the run directory (settings, device, model,
targets, images), takes the directory's lock, and runs the stages in order. Each stage keys its
results by what determines them (`mfv.runtime.rundir`), reuses what is stored under the same key,
and hands what it made to the next stage. `results.json` and `index.html` are written after the last
stage asked for, and also when a stage fails — then they cover what was finished, with the error.
Stages before the requested one run when missing; stored results of later stages that still
match the settings are shown too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from mfv.core.allocator import release_free_memory
from mfv.core.errors import MfvError
from mfv.core.io import WriteError
from mfv.core.keys import digest, slug
from mfv.data.preprocess import Preprocess
from mfv.data.sources import ImageList
from mfv.evaluate.evaluation import summary
from mfv.facets.cluster import CLUSTERING
from mfv.facets.patches import PATCH_CODE
from mfv.models import LoadedModel
from mfv.models.targets import Target, negated_spec, negation_pairs, parse_target
from mfv.render.batch import default_batch_size
from mfv.render.plan import RenderSettings, Visual, plan
from mfv.render.recipes import get
from mfv.report import write_report
from mfv.results.model import Results
from mfv.runtime.backend import Backend, make_backend, run_all
from mfv.runtime.lock import open_run
from mfv.runtime.prepare import Inputs, check_model_name, prepare
from mfv.runtime.results import STAGES, RunState, TargetRecord, build, write
from mfv.runtime.rundir import RenderEntry, RunDir
from mfv.runtime.settings import Settings
from mfv.runtime.tasks import (
    RunContext,
    anchor_settings,
    evaluate_unit,
    facets_unit,
    render_label,
    render_unit,
    scan_on,
)
from mfv.scan.scanner import ScanResult

METRICS_VERSION = 4  # bump when evaluate's metrics change, so stored ones are recomputed


def run(settings: Settings | None = None, *, model: str | nn.Module | LoadedModel | None = None,
        preprocess: Preprocess | None = None, backend: str | Backend | None = None,
        until: str = "report", **options) -> Results:
    """Run the pipeline up to `until` (a stage name) and return its typed results (what
    `RUN/results.json` holds; `.to_dict()` gives the plain dict, `.root` the run directory).

    `mfv.run(images="photos/", targets=["bell pepper"], out="runs/pepper")` in a notebook is
    `mfv run --images photos/ --target "bell pepper" --out runs/pepper` on the command line.
    `model` may be a name or file (as `--model`), an `nn.Module` (with its `preprocess`), or a
    `LoadedModel`; the run directory records its class, size and weights' fingerprint.
    `backend` is "local" or "ray" (as `--backend`), or a `mfv.runtime.backend` backend whose workers
    the caller keeps across runs. The process keeps its allocator settings and the library only
    logs (`logging`); `mfv.core.allocator.keep_freed_memory()` is the command line's speed-up.
    """
    if until not in STAGES:
        raise MfvError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    if isinstance(backend, str):
        options["backend"], backend = backend, None
    line = with_negations(prepare(settings, model, preprocess, options,
                                  scan_only=until == "scan"))
    with _backend(line, backend) as workers, open_run(line.settings.out) as rundir:
        return _Line(*line, rundir, workers).run(until)


def scan_images(settings: Settings | None = None, *,
                model: str | nn.Module | LoadedModel | None = None,
                preprocess: Preprocess | None = None, **options) -> ScanResult:
    """Only the scan of a run (its targets and `scan_targets`), returned as a `ScanResult`."""
    line = with_negations(prepare(settings, model, preprocess, options, scan_only=True))
    with _backend(line, None) as backend, open_run(line.settings.out) as rundir:
        stages = _Line(*line, rundir, backend)
        stages.run("scan")
        return stages.scanned


def with_negations(line: Inputs) -> Inputs:
    """With `--negative`: each target's negation (`negated_spec`, what it shuns) added after
    the targets, once; made like any target, paired with its positive by `negation_pairs`."""
    s = line.settings
    if s.evaluate.observer not in ("auto", "none"):  # checked before any work, like --judges
        check_model_name(s.evaluate.observer, "--observer")
    if not s.evaluate.negative:
        return line
    have = {t.spec for t in line.targets}
    added = []
    for target in line.targets:
        spec = negated_spec(target, line.model.logits_layer)
        if spec not in have:
            have.add(spec)
            added.append(parse_target(spec, line.model, s.reduction, s.activation, s.sum))
    return dataclasses.replace(line, targets=[*line.targets, *added])


@contextlib.contextmanager
def _backend(line: Inputs, given: Backend | None) -> Iterator[Backend]:
    """The backend the caller gave, or the run's own (`--backend`), closed when it ends."""
    if given is not None:
        yield given
        return
    where = line.settings.backend
    with make_backend(where.kind, line.model, where.ray_address, where.ray_workers) as backend:
        yield backend


@dataclass
class _Line:
    """One pipeline run over a locked run directory: the stages and what they have made. Each
    stage finds its missing units (by key) and hands them to the backend (`mfv.runtime.tasks`)."""

    settings: Settings
    model: LoadedModel
    images: ImageList
    targets: list[Target]
    scan_targets: list[Target]
    rundir: RunDir
    backend: Backend
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

    def run(self, until: str) -> Results:
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
            with contextlib.suppress(WriteError):  # a full disk: its first failed write is news
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
        release_free_memory()

    def _context(self, **changes) -> RunContext:
        merged = tuple({t.spec: t for t in [*self.scan_targets, *self.targets]}.values())
        return RunContext(str(self.rundir.root), self.settings, tuple(self.targets),
                          tuple(r.slug for r in self.records), merged,
                          scan_key=self.scanned.key if self.scanned else None,
                          facets_keys=tuple(r.facets_key for r in self.records), **changes)

    # ----------------------------------------------------------------------------- stages
    def _scan(self) -> bool:
        context = self._context(images=self.images)
        started = time.perf_counter()
        self.scanned = scan_on(self.backend, self.model, context, self.rundir)
        if self.scanned is None:  # pragma: no cover - a shard vanished meanwhile
            raise MfvError("the scan is incomplete; run the same command again")
        self.done.add("scan")
        seconds = self.scanned.manifest["seconds"]  # its own compute time, or the workers' wall
        self.timings["scan"] = round(time.perf_counter() - started if self.backend.workers > 1
                                     and seconds < 1 else seconds, 3)
        return False

    def _facets(self, execute: bool) -> bool:
        s, result = self.settings, self.scanned
        for record in self.records:
            record.facets_key = digest({
                "scan": result.key, "target": record.target.to_dict(),
                "options": s.facets.key(), "mean_resize": s.facets.mean_resize,
                "size": self.model.preprocess.input_size, "patch": PATCH_CODE,
                "clustering": CLUSTERING})
        missing = [i for i, r in enumerate(self.records)
                   if self.rundir.target(r.slug).load_facets(r.facets_key) is None]
        if missing and not execute:
            return False
        run_all(self.backend, facets_unit, self._context(), missing,
                         lambda i: f"facets of {self.targets[i].spec!r}")
        self.means = []
        for record in self.records:
            record.facets, means = self.rundir.target(record.slug).load_facets(record.facets_key)
            self.means.append(means)
        self.done.add("facets")
        return bool(missing)

    def _render(self, execute: bool) -> bool:
        if "facets" not in self.done:
            return False
        s = self.settings
        self.planned = plan([r.target.to_dict() for r in self.records],
                            [r.slug for r in self.records], self.means,
                            [r.facets_key for r in self.records], self._render_settings(),
                            [r.facets.unit_side if s.render.picture_scale == "unit" else None
                             for r in self.records])
        stores = [self.rundir.target(r.slug) for r in self.records]
        indexes = [store.render_index() for store in stores]
        todo = [v for v in self.planned
                if (stored := indexes[v.target].get(v.slot)) is None or stored.key != v.key]
        worked = bool(todo) and execute
        if worked:
            size = s.render.batch_size or default_batch_size(self.model)
            batches = [chunk for recipe in s.render.recipes
                       for group in [[v for v in todo if v.recipe == recipe]]
                       for chunk in (group[i:i + size] for i in range(0, len(group), size))]
            for entries in self.backend.imap(render_unit, self._context(), batches,
                                             render_label):
                self._record(entries)  # each batch indexed as soon as it is back
        if self._collect_visuals() == len(self.planned):
            self.done.add("render")
        return worked

    def _record(self, entries: list[tuple[int, RenderEntry]]) -> None:
        by_target: dict[int, list[RenderEntry]] = {}
        for t, entry in entries:
            by_target.setdefault(t, []).append(entry)
        for t, group in by_target.items():
            self.rundir.target(self.records[t].slug).record(group)

    def _render_settings(self) -> RenderSettings:
        s = self.settings
        r = s.render
        spectrum = digest(self.scanned.spectrum) if any(
            get(recipe).needs_spectrum for recipe in r.recipes) else None
        return RenderSettings(r.recipes, r.baseline, r.steps, r.as_written, s.seed,
                              self.model.preprocess.input_size, self.model.fingerprint(),
                              s.scan.code_layer, anchor_settings(s), r.maco_crops, spectrum,
                              r.batch_size or default_batch_size(self.model))

    def _collect_visuals(self) -> int:
        """Give each record the stored visualizations that the plan still asks for; how many."""
        current = {(v.target, v.slot): v.key for v in self.planned}
        for t, record in enumerate(self.records):
            index = self.rundir.target(record.slug).render_index()
            record.visuals = [e for slot, e in sorted(index.items())
                              if current.get((t, slot)) == e.key]
        return sum(len(r.visuals) for r in self.records)

    def _evaluate(self, execute: bool) -> bool:
        if "render" not in self.done:
            return False
        s = self.settings
        pairs = negation_pairs(self.targets, self.model.logits_layer)
        shunned = [tuple(self.records[pairs[i]].visuals) if i in pairs else ()
                   for i in range(len(self.records))]
        ev = s.evaluate
        keys = [digest({"visuals": sorted(e.key for e in r.visuals), "facets": r.facets_key,
                        "judges": list(s.evaluate.judges), "code_layer": s.scan.code_layer,
                        "seed": s.seed, "version": METRICS_VERSION,
                        "mis": [ev.observer, ev.observer_layer, ev.observer_weights,
                                sorted(v.key for v in shunned[i])]})
                for i, r in enumerate(self.records)]
        stores = [self.rundir.target(r.slug) for r in self.records]
        for record, store, key in zip(self.records, stores, keys, strict=True):
            record.metrics = store.load_evaluation(key)
        missing = [i for i, r in enumerate(self.records) if r.metrics is None]
        if missing and not execute:
            return False
        items = [(i, tuple(self.records[i].visuals), shunned[i]) for i in missing]
        for i, metrics in zip(missing, self.backend.imap(
                evaluate_unit, self._context(), items,
                lambda item: f"evaluation of {self.targets[item[0]].spec!r}"), strict=True):
            stores[i].save_evaluation(keys[i], metrics)
            self.records[i].metrics = metrics
        self.done.add("evaluate")
        return bool(missing)

    # ----------------------------------------------------------------------------- outputs
    def _publish(self, error: str | None = None) -> Results:
        """Write results.json and the report for what the current settings have produced."""
        previous = self.rundir.read_record("results")
        done = set(self.done) if error is None else self.done - {"report"}
        evaluation = summary({r.slug: r.metrics for r in self.records if r.metrics}) \
            if "evaluate" in done else None
        results = build(self.rundir, RunState(
            settings=self.settings.to_dict(), model=self.model.describe(),
            device=str(self.model.device), scan=self.scanned, records=self.records,
            timings=self.timings, done=done | ({"report"} if error is None else set()),
            error=error, created=(previous or {}).get("created"), evaluation=evaluation))
        for i, j in negation_pairs(self.targets, self.model.logits_layer).items():
            results.targets[i].negation = results.targets[j].slug
            results.targets[j].negation_of = results.targets[i].slug
        write_report(self.rundir, results, progress=self.settings.progress)
        write(self.rundir, results)
        return results.at(self.rundir.root)

    def _prune(self) -> None:
        current: dict[str, tuple[str | None, dict]] = {
            r.slug: (r.facets_key, {}) for r in self.records}
        for v in self.planned:
            current[self.records[v.target].slug][1][v.slot] = v.key
        self.rundir.prune({self.scanned.key}, current)

"""`mfv sweep`: how multifaceted is each layer of a network? (the paper's RQ1/RQ3, measured)

1. One streaming scan records, for every unit of every chosen layer, its top-N images (spatial
   maps reduced as `--reduction` says) and each image's code — in memory units × N, never
   images × units (`mfv.scan.scanner` in top-N mode, chunked and resumable).
2. A seeded sample of units per layer (`--units`): what each unit saw — for hidden units on
   spatial maps the crop around each top image's peak at the layer's patch side, as `mfv run
   --region patch` clusters it; else the whole photo (`mfv.study.seen`: every distinct crop or
   photo coded once, by the swept network and by the independent one) — is clustered into
   facets by the paper's pipeline (automatic k), and scored (`mfv.study.measures`): the number
   of facets, their silhouette (the clustering's own space), 1 − MonoScore and the PURE-style
   separation ratio in an **independent** embedding (another network's penultimate codes of
   the crops or photos), each against the layer's chance level: the same measure on random
   sets of the layer's pooled top crops (or photos), as large as a unit's top.
3. Per layer, a calibration: constructed units that fire for two known kinds — max(a, b) of
   two of the layer's units with nearly disjoint top images, each scaled by its mean top
   activation — must read as more multifaceted than the units a and b themselves; where they
   do not (the mean difference's 95 % interval reaches 0), the measure has no power at that
   layer, and the plot and the answer say so.
4. Per layer: the mean over its units with a bootstrap confidence interval, plotted against
   depth; a few example units per layer keep their facets' mean images (means of the crops for
   patch units) and members for the report's Layers page; `--render N` also runs the pipeline
   (default recipe) on N units per layer, over the same scan.

Clustering the units, chance sets and constructed units is the study's main cost after the
crops' codes: it runs in parallel processes, one per core (`mfv.study.measures.parallel_map`),
or on the backend's workers with `--backend ray`.

Everything lands in `RUN/sweep/` (`mfv.runtime.rundir.SweepStore`), results in
`RUN/sweep/sweep.json` (format `mfv.sweep/1`, described in `docs/sweep.md`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from mfv.core.allocator import release_free_memory
from mfv.core.errors import MfvError
from mfv.core.keys import digest, slug
from mfv.data.preprocess import Preprocess
from mfv.data.sources import open_images
from mfv.facets.cluster import CLUSTERING
from mfv.facets.find import mean_image
from mfv.facets.patches import PATCH_CODE, load_crops, peak_boxes, resolve_region
from mfv.models import LoadedModel, load_model
from mfv.models.onnx_engine import engine_name
from mfv.models.targets import Target, parse_targets, resolve_layer
from mfv.report import write_layers_page
from mfv.report.plots import plot_layer_measures
from mfv.results.metrics import SWEEP_MEASURES
from mfv.results.model import Sweep
from mfv.runtime.backend import Backend, Worker, make_backend
from mfv.runtime.lock import check_out, open_run
from mfv.runtime.pipeline import run as run_pipeline
from mfv.runtime.prepare import check_layers, check_model_name, prepare_model
from mfv.runtime.rundir import RunDir
from mfv.runtime.settings import Settings, make_settings
from mfv.runtime.tasks import RunContext, patch_side, pixels, scan_on
from mfv.scan.scanner import ScanResult
from mfv.study.calibration import (
    POWER_MEASURES,
    Unit,
    calibrate,
    calibration_pairs,
    calibration_point,
    two_kind_unit,
)
from mfv.study.chance import chance_level, chance_sets, overall_chance
from mfv.study.measures import MEASURES, bootstrap_ci, measure_set, parallel_map
from mfv.study.seen import CODE_ENGINE, Items, code_items, firing_centres_of, table, whole_boxes
from mfv.study.trend import answer

SWEEP_FORMAT = "mfv.sweep/1"
EXAMPLES = 3  # example units per layer whose facets the Layers page shows


def block_layers(model: LoadedModel) -> list[str]:
    """The outputs of a network's blocks (the children of its Sequential / ModuleList stages
    that are themselves made of modules: EfficientNet's MBConv blocks, ResNet's bottlenecks, a
    ViT's transformer blocks), in order, then the logits layer."""
    shapes = {info.path: info.shape for info in model.layers()}
    blocks = []
    for name, module in model.module.named_modules():
        for child, sub in module.named_children():
            path = f"{name}.{child}" if name else child
            if isinstance(module, (nn.Sequential, nn.ModuleList)) and any(True for _ in
                                                                          sub.children()) \
                    and len(shapes.get(path, ())) in (2, 3):
                blocks.append(path)
    if not blocks:
        raise MfvError(f"found no blocks in {model.name}; give --layers L1,L2,... "
                       "(see `mfv layers`)")
    return [*blocks, *([model.logits_layer] if model.logits_layer else [])]


def choose_layers(model: LoadedModel, spec: str) -> list[str]:
    """`auto` (every block output plus the logits) or a comma-separated list of module paths."""
    if spec == "auto":
        return block_layers(model)
    layers = [p.strip() for p in spec.split(",") if p.strip()]
    for path in layers:
        try:
            resolve_layer(model, path)
        except MfvError as exc:  # a typo: one line naming the option
            raise MfvError(f"--layers {path}: {exc}") from None
    if not layers:
        raise MfvError("--layers: give 'auto' or a comma-separated list of layers")
    return layers


@dataclass(frozen=True)
class _Seen:
    """How a layer's units see their images: `region` "patch" (the crop of `side` px around
    each peak) or "image" (the whole photo)."""

    region: str
    side: int | None = None


def sweep(settings: Settings | None = None, *, model: str | nn.Module | LoadedModel | None = None,
          preprocess: Preprocess | None = None, **options) -> dict:
    """Run the layer sweep and return what `RUN/sweep/sweep.json` holds (undefined numbers as
    None)."""
    settings = settings.updated(**options) if settings is not None else make_settings(**options)
    settings = settings.updated(scan_mode="topn")  # units × N in memory, never images × units
    check_out(settings.out)
    loaded = prepare_model(settings, model, preprocess)
    check_layers(settings, loaded)
    check_model_name(settings.sweep.embedder, "--embedder")
    if settings.sweep.embedder == loaded.name:
        raise MfvError(f"--embedder {loaded.name} is the network being swept; an independent "
                       "embedding needs another network (e.g. efficientnet_lite2)")
    layers = choose_layers(loaded, settings.sweep.layers)
    targets = parse_targets([f"{layer}:*" for layer in layers], loaded, settings.reduction,
                            settings.activation)
    images = open_images(settings.images)
    started = time.perf_counter()
    where = settings.backend
    with make_backend(where.kind, loaded, where.ray_address, where.ray_workers) as backend, \
            open_run(settings.out) as run:
        context = RunContext(str(run.root), settings, (), (), tuple(targets), images)
        result = scan_on(backend, loaded, context, run)
        release_free_memory()  # a stage ends: the next allocates blocks of other sizes
        doc = _measure(run, settings, loaded, layers, result, targets, backend)
        doc["timings"]["total"] = round(time.perf_counter() - started, 3)
        doc = Sweep.model_validate(doc).to_dict()  # strict JSON: undefined numbers are None
        run.sweep.write("sweep", doc)
    if settings.sweep.render:
        _render(settings, loaded, doc)
    with open_run(settings.out) as run:
        write_layers_page(run, doc, progress=settings.progress)
    return doc


def _sampled_units(settings: Settings, result: ScanResult, layers: Sequence[str]
                   ) -> dict[str, list[Unit]]:
    """Per layer, the units to measure (a seeded sample, or all) that some image activates."""
    rng = np.random.default_rng(settings.seed)
    by_layer: dict[str, list[int]] = {}
    for column, spec in enumerate(result.targets):
        layer = spec.rsplit(":", 1)[0]
        by_layer.setdefault(layer, []).append(column)
    out = {}
    for layer in layers:
        columns = by_layer[layer]
        units = settings.sweep.units
        if units != "all" and len(columns) > units:
            columns = sorted(rng.choice(columns, units, replace=False).tolist())
        units = []
        for column in columns:
            rows, values = result.top(column, settings.facets.top_n)
            if len(rows) >= 2 and values.max() > 0 and np.ptp(values) > 0:
                units.append(Unit(layer, int(result.targets[column].rsplit(":", 1)[1]),
                                  int(column), rows, values))
        out[layer] = units
    return out


def _how_seen(run: RunDir, settings: Settings, model: LoadedModel, result: ScanResult,
              units: dict[str, list[Unit]], targets: Sequence[Target]) -> dict[str, _Seen]:
    """Per layer, patch or whole photo (`--region`, as `mfv run` decides it for each target)
    and the patch side (`mfv.runtime.tasks.patch_side`: the layer's effective field within
    3/14-3/7 of the input, or `--patch-size`)."""
    by_spec = {t.spec: t for t in targets}
    worker = Worker(model)
    context = RunContext(str(run.root), settings, (), (), (), scan_key=result.key)
    out = {}
    for layer, members in units.items():
        if not members:
            out[layer] = _Seen("image")
            continue
        target = by_spec[result.targets[members[0].column]]
        region = resolve_region(settings.facets.region, target, result.grid(members[0].column))
        out[layer] = _Seen(region, patch_side(worker, context, target.terms[0].layer)
                           if region == "patch" else None)
    return out


def _all_boxes(settings: Settings, model: LoadedModel, result: ScanResult,
               todo: Sequence[Unit], seen: dict[str, _Seen], targets: Sequence[Target]
               ) -> list[np.ndarray]:
    """Each unit's items' boxes, as `mfv run --region patch` crops them (`mfv.facets.patches`):
    a square of the layer's side centred on the scan's peak for a unit read at its map's
    centre (`--reduction center`), else where its map fires most (`firing_centre`); whole
    photos for image layers."""
    by_spec = {t.spec: t for t in targets}
    size = model.preprocess.input_size
    out: list[np.ndarray] = [whole_boxes(len(u.rows)) for u in todo]
    moved = []
    for i, u in enumerate(todo):
        if seen[u.layer].region != "patch":
            continue
        target = by_spec[result.targets[u.column]]
        out[i] = peak_boxes(result.peak_pixels(u.column, u.rows), seen[u.layer].side, size)
        if target.reduction not in ("center", "cls"):
            term = target.terms[0]
            moved.append((i, (term.layer, term.unit, term.weight, u.rows)))
    if moved:
        centres = firing_centres_of(model, result, [m for _, m in moved], settings.progress)
        for (i, _), c in zip(moved, centres, strict=True):
            out[i] = peak_boxes(c, seen[todo[i].layer].side, size)
    return out


def _measure(run: RunDir, settings: Settings, model: LoadedModel, layers: Sequence[str],
             result: ScanResult, targets: Sequence[Target], backend: Backend) -> dict:
    t0 = time.perf_counter()
    s = settings
    units = _sampled_units(settings, result, layers)
    seen = _how_seen(run, settings, model, result, units, targets)
    todo = [u for layer in layers for u in units[layer]]
    items, of_unit = table([u.rows for u in todo],
                           _all_boxes(settings, model, result, todo, seen, targets))
    index = {(u.layer, u.unit): idx for u, idx in zip(todo, of_unit, strict=True)}
    embedder, codes, embedding = _codes(run, settings, model, result, items)
    release_free_memory()
    t1 = time.perf_counter()
    options = {"top_n": s.facets.top_n, "embedding": s.facets.embedding,
               "mean_of": s.facets.m, "seed": s.seed, "embedder": embedder,
               "region": s.facets.region, "patch": PATCH_CODE, "clustering": CLUSTERING,
               "version": 4}
    sets = _Sets(run, result.key, options, codes, embedding, s, backend)
    # every unit, then per layer its chance sets and calibration pairs, measured at once
    for u in todo:
        sets.add(("unit", u.layer, u.unit), index[u.layer, u.unit], u.values)
    draws = {}
    pairs = {}
    kinds = {}  # per layer, each calibration pair's items' known kinds
    for depth, layer in enumerate(layers):
        pool = np.unique(np.concatenate([index[layer, u.unit] for u in units[layer]])) \
            if units[layer] else np.zeros(0, np.int64)
        draws[layer] = chance_sets(pool, s.facets.top_n, s.seed + 1 + depth)
        for i, chosen in enumerate(draws[layer]):
            sets.add(("chance", layer, i), chosen, None)
        pairs[layer] = calibration_pairs(units[layer], s.facets.top_n, s.seed + 1 + depth)
        kinds[layer] = []
        for a, b in pairs[layer]:
            chosen, values, kind = two_kind_unit(a, b, index, s.facets.top_n)
            sets.add(("pair", layer, (a.unit, b.unit)), chosen, values)
            kinds[layer].append(kind)
    measured = sets.run(s.progress)
    t2 = time.perf_counter()
    per_layer = []
    for depth, layer in enumerate(layers):
        docs = [_unit_doc(measured["unit", u.layer, u.unit], u, result, items,
                          index[u.layer, u.unit], seen[layer]) for u in units[layer]]
        entry = {"layer": layer, "depth": depth, "region": seen[layer].region,
                 "patch_side": seen[layer].side, "units": docs}
        entry["chance"] = chance_level([measured["chance", layer, i]
                                        for i in range(len(draws[layer]))])
        entry["calibration"] = calibrate(
            pairs[layer], {u.unit: d for u, d in zip(units[layer], docs, strict=True)},
            [measured["pair", layer, (a.unit, b.unit)] for a, b in pairs[layer]],
            kinds[layer], s.seed)
        entry["summary"] = {name: dict(zip(("mean", "low", "high"), bootstrap_ci(
            [u[name] for u in entry["units"]], seed=s.seed), strict=True))
            for name in MEASURES}
        entry["examples"] = _examples(run, settings, model, entry)
        per_layer.append(entry)
    level = overall_chance(per_layer)
    stem = run.sweep.plot_stem
    label = {name: SWEEP_MEASURES[name].label for name in MEASURES}
    plot_layer_measures(
        [e["layer"] for e in per_layer],
        {label[name]: [tuple(e["summary"][name][k] for k in ("mean", "low", "high"))
                       for e in per_layer] for name in MEASURES},
        {label[name]: [e["chance"][name]["mean"] for e in per_layer] for name in MEASURES},
        stem,
        calibration={label[name]: [calibration_point(e, name) for e in per_layer]
                     for name in POWER_MEASURES})
    return {
        "format": SWEEP_FORMAT, "model": model.describe(), "device": str(model.device),
        "settings": settings.to_dict(), "scan_key": result.key,
        "data": {"source": result.manifest["source"], "base": os.getcwd(),
                 "n_images": len(result.paths), "n_valid": int(result.valid.sum())},
        "embedder": embedder, "measures": list(MEASURES), "chance": level,
        "plot": {fmt: run.relative(stem.with_name(f"{stem.name}.{fmt}"))
                 for fmt in ("png", "svg")},
        "layers": per_layer, "answer": answer(per_layer, level),
        "timings": {"scan": round(result.manifest["seconds"], 3),
                    "embedding": round(t1 - t0, 3), "facets": round(t2 - t1, 3),
                    "summary": round(time.perf_counter() - t2, 3),
                    "items": len(items), "crops": int((~items.whole).sum())},
    }


def _codes(run: RunDir, settings: Settings, model: LoadedModel, result: ScanResult,
           items: Items) -> tuple[str, np.ndarray, np.ndarray]:
    """Every item's clustering code and independent code (`mfv.study.seen.code_items`), stored
    under a key of the scan, both networks, the code layer and the items."""
    name = settings.sweep.embedder
    embedder = load_model(name, device=model.device)
    key = digest(result.key, model.fingerprint(), embedder.fingerprint(),
                 settings.scan.code_layer, PATCH_CODE, items.rows, items.boxes,
                 engine_name(model, CODE_ENGINE), engine_name(embedder, CODE_ENGINE))[:16]
    codes, other = run.sweep.read_array(f"codes-{key}"), run.sweep.read_array(f"embedding-{key}")
    if codes is not None and other is not None and len(codes) == len(other) == len(items):
        return name, codes, other
    codes, other = code_items(model, embedder, result, items,
                              resolve_layer(model, settings.scan.code_layer), settings.progress)
    run.sweep.write_array(f"codes-{key}", codes)
    run.sweep.write_array(f"embedding-{key}", other)
    return name, codes, other


class _Sets:
    """Sets of items to cluster and measure (units, chance sets, calibration units), each
    stored under its key once measured; `run` measures the missing ones, in parallel
    processes when there are enough of them."""

    def __init__(self, run: RunDir, scan_key: str, options: dict, codes: np.ndarray,
                 embedding: np.ndarray, settings: Settings, backend: Backend) -> None:
        self.store, self.scan_key, self.options = run.sweep, scan_key, options
        self.backend = backend
        self.codes, self.embedding, self.settings = codes, embedding, settings
        self.todo: list[tuple[tuple, str, np.ndarray, np.ndarray | None]] = []

    def add(self, name: tuple, chosen: np.ndarray, values: np.ndarray | None) -> None:
        key = digest(self.scan_key, self.options, repr(name), chosen,
                     values if values is not None else "equal")
        self.todo.append((name, key, chosen, values))

    def run(self, progress: bool) -> dict[tuple, dict]:
        out, missing = {}, []
        for name, key, chosen, values in self.todo:
            stored = self.store.read_unit(key)
            if stored is not None:
                out[name] = stored
            else:
                missing.append((name, key, chosen, values))
        tasks = _Tasks(self.codes, self.embedding, missing, self.settings)
        bar = tqdm(total=len(tasks), desc="sweep: facets", unit="set", disable=not progress)
        done = (self.backend.imap(_on_worker, None, tasks, lambda t: t[-1])
                if self.backend.workers > 1 else
                parallel_map(measure_set, tasks, size=sum(len(m[2]) for m in missing)))
        for (name, key, _, _), doc in zip(missing, done, strict=True):
            self.store.write_unit(key, doc)
            out[name] = doc
            bar.update()
        bar.close()
        return out


class _Tasks(Sequence):
    """The sets to measure as `measure_set` tasks, each built (its rows of both codes copied)
    only when a worker asks for it: built all at once they held every set's rows, 6.4 GB for
    the 3,102 sets of `--units all` over 1,000 photos."""

    def __init__(self, codes: np.ndarray, embedding: np.ndarray,
                 missing: Sequence[tuple[tuple, str, np.ndarray, np.ndarray | None]],
                 settings: Settings) -> None:
        self.codes, self.embedding, self.missing, self.settings = \
            codes, embedding, missing, settings

    def __len__(self) -> int:
        return len(self.missing)

    def __getitem__(self, i: int) -> tuple:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        name, _, chosen, values = self.missing[i]
        s = self.settings
        return (self.codes[chosen], self.embedding[chosen], values, s.seed, s.facets.m,
                s.facets.embedding, _label(name))


def _on_worker(worker: Worker, context: None, task: tuple) -> dict:
    """`measure_set` as a unit of a backend (`--backend ray`)."""
    return measure_set(task)


def _label(name: tuple) -> str:
    kind, layer, what = name
    if kind == "unit":
        return f"{layer}:{what}"
    if kind == "pair":
        return f"{layer}: constructed unit {what[0]} | {what[1]}"
    return f"{layer}: chance set {what}"


def _unit_doc(m: dict, u: Unit, result: ScanResult, items: Items, chosen: np.ndarray,
              seen: _Seen) -> dict:
    """A measured unit as sweep.json lists it: members and representatives as input paths
    (and, for patches, the representatives' boxes, which its mean images average)."""
    doc = {"layer": u.layer, "unit": u.unit, "activation_max": float(u.values.max()),
           "region": seen.region,
           **{k: v for k, v in m.items() if k not in ("members", "representatives")}}
    for name in ("members", "representatives"):
        doc[name] = [[result.paths[int(items.rows[chosen[i]])] for i in rows]
                     for rows in m[name]]
    if seen.region == "patch":
        doc["representative_boxes"] = [[items.boxes[chosen[i]].tolist() for i in rows]
                                       for rows in m["representatives"]]
    return doc


def _examples(run: RunDir, settings: Settings, model: LoadedModel, entry: dict) -> list[dict]:
    """The first few measured units of a layer, with their facets' mean images stored: each the
    mean of the facet's representatives — their crops (`mfv.facets.patches.load_crops`) for
    patch units, else the photos resized as `--mean-resize` says — as `mfv run` makes it
    (`mfv.runtime.tasks.pixels`, `mfv.facets.find.mean_image`)."""
    out = []
    for unit in entry["units"][:EXAMPLES]:
        folder = run.sweep.example_dir(slug(entry["layer"], {"layer": entry["layer"]}),
                                       unit["unit"])
        boxes = unit.get("representative_boxes") or [None] * len(unit["representatives"])
        facets = []
        for rank, (members, chosen, box) in enumerate(zip(
                unit["members"], unit["representatives"], boxes, strict=True)):
            key = digest(chosen, box if box is not None else settings.facets.mean_resize,
                         model.preprocess.to_dict())[:10]
            mean_file = folder / f"mean{rank:02d}-{key}.png"
            if not run.sweep.has_image(mean_file):  # missing, or damaged (then one warning)
                where = range(len(chosen))
                photos = (pixels(model, settings.facets.mean_resize, chosen, where)
                          if box is None else
                          load_crops(model, chosen, np.arange(len(chosen)), np.array(box)))
                run.sweep.write_image(mean_file, mean_image(photos))
            facets.append({"rank": rank, "size": len(members),
                           "mean_image": run.relative(mean_file),
                           "members": members[:12], "representatives": chosen,
                           **({"boxes": box} if box is not None else {})})
        out.append({"unit": unit["unit"], "k": unit["k"], "facets": facets})
    return out


def _render(settings: Settings, model: LoadedModel, doc: dict) -> None:
    """The pipeline (default recipe) on the first `--render` measured units of each layer,
    over the sweep's scan (the same targets and top-N mode: the same scan key)."""
    chosen = [f"{e['layer']}:{u['unit']}" for e in doc["layers"]
              for u in e["units"][:settings.sweep.render]]
    run_pipeline(settings.updated(targets=tuple(chosen), scan_targets=tuple(
        f"{layer['layer']}:*" for layer in doc["layers"]), selection="top", facets="auto",
        scan_mode="topn"), model=model)


def sweep_summary(doc: dict) -> list[dict]:
    """One row per layer: its measures' means and CIs (for printing and the README table)."""
    return [{"layer": e["layer"], "units": len(e["units"]),
             **{name: e["summary"][name] for name in MEASURES}} for e in doc["layers"]]

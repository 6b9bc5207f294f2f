"""`mfv sweep`: how multifaceted is each layer of a network? (the paper's RQ1/RQ3, measured)

1. One streaming scan records, for every unit of every chosen layer, its top-N images (spatial
   maps reduced as `--reduction` says) and each image's code — in memory units × N, never
   images × units (`mfv.scan.scanner` in top-N mode, chunked and resumable).
2. A seeded sample of units per layer (`--units`): each unit's top-N images are clustered into
   facets by the paper's pipeline (automatic k), and scored (`mfv.study.measures`): the number
   of facets, their silhouette (the clustering's own space), 1 − MonoScore and the PURE-style
   separation ratio in an **independent** embedding (another network's penultimate codes), each
   against its chance level: the same measure on random image sets of the same size.
3. Per layer: the mean over its units with a bootstrap confidence interval, plotted against
   depth; a few example units per layer keep their facets' mean images and members for the
   report's Layers page; `--render N` also runs the pipeline (default recipe) on N units per
   layer, over the same scan.

Everything lands in `RUN/sweep/` (`mfv.runtime.rundir.SweepStore`), results in
`RUN/sweep/sweep.json` (format `mfv.sweep/1`, described in `docs/sweep.md`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from mfv.core.errors import MfvError
from mfv.core.keys import digest, slug
from mfv.data.preprocess import Preprocess
from mfv.data.sources import open_images
from mfv.facets.find import mean_image
from mfv.models import LoadedModel, load_model
from mfv.models.read import read_photos
from mfv.models.targets import parse_targets, resolve_layer
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
from mfv.runtime.tasks import RunContext, pixels, scan_on
from mfv.scan.scanner import ScanResult
from mfv.study.measures import bootstrap_ci, mono_score, percentile_ci, unit_measures

SWEEP_FORMAT = "mfv.sweep/1"
MEASURES = ("k", "silhouette", "polysemanticity", "separation")
CHANCE_REPEATS = 20
EXAMPLES = 3  # example units per layer whose facets the Layers page shows
EMBED_BATCH = 32


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
class _Unit:
    layer: str
    unit: int
    rows: np.ndarray  # the unit's top-N images (scan rows), best first
    values: np.ndarray  # its activations on them


def sweep(settings: Settings | None = None, *, model: str | nn.Module | LoadedModel | None = None,
          preprocess: Preprocess | None = None, **options) -> dict:
    """Run the layer sweep and return what `RUN/sweep/sweep.json` holds."""
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
        doc = _measure(run, settings, loaded, layers, result, backend)
        doc["timings"]["total"] = round(time.perf_counter() - started, 3)
        run.sweep.write("sweep", Sweep.model_validate(doc).to_dict())  # strict JSON
    if settings.sweep.render:
        _render(settings, loaded, doc)
    with open_run(settings.out) as run:
        write_layers_page(run, doc, progress=settings.progress)
    return doc


def _sampled_units(settings: Settings, result: ScanResult, layers: Sequence[str]
                   ) -> dict[str, list[_Unit]]:
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
                units.append(_Unit(layer, int(result.targets[column].rsplit(":", 1)[1]),
                                   rows, values))
        out[layer] = units
    return out


@dataclass(frozen=True)
class _SweepContext:
    """What every unit's measurement needs (shipped once to each worker)."""

    root: str
    settings: Settings
    scan_key: str
    options: dict
    codes: np.ndarray  # every image's code (the space the facets are found in)
    embedding: np.ndarray  # the independent network's codes of the needed images
    row_of: dict[int, int]  # scan row → row of `embedding`
    paths: tuple[str, ...]


def _measure_unit(worker: Worker, ctx: _SweepContext, u: _Unit) -> dict:
    """One unit's facets and measures, stored under their key (a unit of `mfv.runtime.backend`)."""
    run, s = RunDir(ctx.root), ctx.settings
    key = digest(ctx.scan_key, ctx.options, u.layer, u.unit)
    stored = run.sweep.read_unit(key)
    if stored is not None:
        return stored
    try:
        m = unit_measures(ctx.codes[u.rows], ctx.embedding[[ctx.row_of[int(r)] for r in u.rows]],
                          u.values, seed=s.seed, m=s.facets.m, embedding=s.facets.embedding)
    except MfvError as error:  # the message names the unit it is about
        raise MfvError(f"{u.layer}:{u.unit}: {error}") from None
    doc = {"layer": u.layer, "unit": u.unit, "activation_max": float(u.values.max()),
           **m.to_dict(), **{name: [[ctx.paths[int(u.rows[i])] for i in rows] for rows in
                                    getattr(m, name)] for name in ("members", "representatives")}}
    run.sweep.write_unit(key, doc)
    return doc


def _measure(run: RunDir, settings: Settings, model: LoadedModel, layers: Sequence[str],
             result: ScanResult, backend: Backend) -> dict:
    t0 = time.perf_counter()
    units = _sampled_units(settings, result, layers)
    pool = np.flatnonzero(result.valid)
    size = settings.facets.top_n
    rng = np.random.default_rng(settings.seed + 1)
    chance_sets = [np.sort(rng.choice(pool, min(size, pool.size), replace=False))
                   for _ in range(CHANCE_REPEATS)]
    needed = np.unique(np.concatenate([*(u.rows for us in units.values() for u in us),
                                       *chance_sets]))
    embedder, embedding = _independent_codes(run, settings, model, result, needed)
    t1 = time.perf_counter()
    codes = np.asarray(result.codes)
    row_of = {int(r): i for i, r in enumerate(needed)}
    options = {"top_n": size, "embedding": settings.facets.embedding,
               "mean_of": settings.facets.m,
               "seed": settings.seed, "embedder": embedder, "version": 2}
    context = _SweepContext(str(run.root), settings, result.key, options, codes, embedding,
                            row_of, tuple(result.paths))
    todo = [u for layer in layers for u in units[layer]]
    measured: dict[tuple[str, int], dict] = {}
    bar = tqdm(total=len(todo), desc="sweep: facets", unit="unit",
               disable=not settings.progress)
    for unit, doc in zip(todo, backend.imap(_measure_unit, context, todo,
                                            lambda u: f"unit {u.layer}:{u.unit}"), strict=True):
        measured[unit.layer, unit.unit] = doc
        bar.update()
    bar.close()
    per_layer = [{"layer": layer, "depth": depth,
                  "units": [measured[u.layer, u.unit] for u in units[layer]]}
                 for depth, layer in enumerate(layers)]
    t2 = time.perf_counter()
    chance_key = digest(result.key, options, chance_sets)[:16]
    level = run.sweep.read(f"chance-{chance_key}")
    if level is None:
        level = _chance(codes, embedding, row_of, chance_sets, settings)
        run.sweep.write(f"chance-{chance_key}", level)
    for entry in per_layer:
        entry["summary"] = {name: dict(zip(("mean", "low", "high"), bootstrap_ci(
            [u[name] for u in entry["units"]], seed=settings.seed), strict=True))
            for name in MEASURES}
        entry["examples"] = _examples(run, settings, model, entry)
    stem = run.sweep.plot_stem
    label = {name: SWEEP_MEASURES[name].label for name in MEASURES}
    plot_layer_measures(
        [e["layer"] for e in per_layer],
        {label[name]: [tuple(e["summary"][name][k] for k in ("mean", "low", "high"))
                       for e in per_layer] for name in MEASURES},
        {label[name]: [level[name]["mean"]] * len(per_layer) for name in MEASURES}, stem)
    return {
        "format": SWEEP_FORMAT, "model": model.describe(), "device": str(model.device),
        "settings": settings.to_dict(), "scan_key": result.key,
        "data": {"source": result.manifest["source"], "base": os.getcwd(),
                 "n_images": len(result.paths), "n_valid": int(result.valid.sum())},
        "embedder": embedder, "measures": list(MEASURES), "chance": level,
        "plot": {fmt: run.relative(stem.with_name(f"{stem.name}.{fmt}"))
                 for fmt in ("png", "svg")},
        "layers": per_layer, "answer": _answer(per_layer, level),
        "timings": {"scan": round(result.manifest["seconds"], 3),
                    "embedding": round(t1 - t0, 3), "facets": round(t2 - t1, 3),
                    "summary": round(time.perf_counter() - t2, 3)},
    }


def _independent_codes(run: RunDir, settings: Settings, model: LoadedModel, result: ScanResult,
                       rows: np.ndarray) -> tuple[str, np.ndarray]:
    """Penultimate codes of the given images by the independent network (`--embedder`), in the
    order of `rows`; stored under a key of the network and the rows."""
    name = settings.sweep.embedder
    embedder = load_model(name, device=model.device)
    key = digest(result.key, embedder.fingerprint(), rows)
    stored = run.sweep.read_array(f"embedding-{key[:16]}")
    if stored is not None:
        return name, stored
    read = read_photos(embedder, [result.paths[int(r)] for r in rows],
                       [resolve_layer(embedder, "penultimate")], batch_size=EMBED_BATCH,
                       progress="sweep: independent codes" if settings.progress else None)
    if not len(read.kept):
        raise MfvError(f"none of the {len(rows)} images the sweep needs can be read any more")
    codes = np.zeros((len(rows), read.outputs[0].shape[1]), np.float32)
    codes[read.kept] = read.outputs[0]  # a file unreadable since the scan: a zero code
    run.sweep.write_array(f"embedding-{key[:16]}", codes)
    return name, codes


def _chance(codes: np.ndarray, embedding: np.ndarray, row_of: dict[int, int],
            sets: Sequence[np.ndarray], settings: Settings) -> dict:
    """Every measure on random image sets of the unit's size (equal weights for MonoScore)."""
    draws: dict[str, list[float]] = {name: [] for name in MEASURES}
    for rows in sets:
        other = embedding[[row_of[int(r)] for r in rows]]
        # a random set has no activations: a ramp stands in (it only orders the facets)
        m = unit_measures(codes[rows], other, np.linspace(2.0, 1.0, len(rows)),
                          seed=settings.seed, m=settings.facets.m,
                          embedding=settings.facets.embedding)
        draws["k"].append(m.k)
        draws["silhouette"].append(m.silhouette)
        draws["polysemanticity"].append(1.0 - mono_score(other))
        draws["separation"].append(m.separation)
    out = {}
    for name, values in draws.items():
        v = np.asarray(values, np.float64)
        finite = v[np.isfinite(v)]
        out[name] = {"mean": SWEEP_MEASURES[name].combine(values),  # None: no finite draw
                     "std": float(finite.std()) if finite.size else None, "draws": len(v)}
    return out


def _examples(run: RunDir, settings: Settings, model: LoadedModel, entry: dict) -> list[dict]:
    """The first few measured units of a layer, with their facets' mean images stored: each the
    mean of the facet's representatives resized as `--mean-resize` says, as `mfv run` makes it
    (`mfv.runtime.tasks.pixels`, `mfv.facets.find.mean_image`)."""
    out = []
    for unit in entry["units"][:EXAMPLES]:
        folder = run.sweep.example_dir(slug(entry["layer"], {"layer": entry["layer"]}),
                                       unit["unit"])
        facets = []
        for rank, (members, chosen) in enumerate(zip(unit["members"], unit["representatives"],
                                                     strict=True)):
            key = digest(chosen, settings.facets.mean_resize, model.preprocess.to_dict())[:10]
            mean_file = folder / f"mean{rank:02d}-{key}.png"
            if not run.sweep.has_image(mean_file):  # missing, or damaged (then one warning)
                run.sweep.write_image(mean_file, mean_image(pixels(
                    model, settings.facets.mean_resize, chosen, range(len(chosen)))))
            facets.append({"rank": rank, "size": len(members),
                           "mean_image": run.relative(mean_file),
                           "members": members[:12]})
        out.append({"unit": unit["unit"], "k": unit["k"], "facets": facets})
    return out


def _answer(per_layer: Sequence[dict], level: dict) -> dict:
    """Does multifacetedness grow with depth? The slope of each measure's layer means against
    depth (per layer of depth), with a bootstrap interval over units, and the first-vs-last
    quarter contrast."""
    out = {}
    for name in MEASURES:
        depth = np.array([e["depth"] for e in per_layer], np.float64)
        per_unit = [np.array([u[name] for u in e["units"]], np.float64) for e in per_layer]
        means = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in per_unit])
        ok = np.isfinite(means)
        if ok.sum() < 2:
            out[name] = {"slope": float("nan"), "low": float("nan"), "high": float("nan")}
            continue
        slope = float(np.polyfit(depth[ok], means[ok], 1)[0])
        finite = [(d, v[np.isfinite(v)]) for d, v in zip(depth, per_unit, strict=True)
                  if np.isfinite(v).any()]
        low, high = percentile_ci([v for _, v in finite], functools.partial(
            _slope, np.array([d for d, _ in finite])))
        quarter = max(1, len(per_layer) // 4)
        first, last = np.nanmean(means[:quarter]), np.nanmean(means[-quarter:])
        out[name] = {"slope": slope, "low": float(low), "high": float(high),
                     "first_quarter": float(first), "last_quarter": float(last),
                     "chance": level[name]["mean"]}
    return out


def _slope(depth: np.ndarray, *layers: np.ndarray, axis: int = -1) -> np.ndarray:
    """The least-squares slope of the layers' mean values against depth (vectorized over
    bootstrap resamples: each layer's values (..., units))."""
    means = np.stack([v.mean(axis=axis) for v in layers])
    return np.polyfit(depth, means.reshape(len(depth), -1), 1)[0].reshape(means.shape[1:])


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

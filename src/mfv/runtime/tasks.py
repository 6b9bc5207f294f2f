"""The stages' units of work: what a backend (`mfv.runtime.backend`) runs, here or on a Ray worker.

Each unit is a module-level function `unit(worker, context, item)`: it reads what it needs from
the run directory (the scan by its key, a target's facets by theirs), computes, and writes its
result there atomically under its key — so a unit that is run twice (a retried Ray task) writes
the same files and loses nothing. The driver decides which units are missing, and alone writes
indexes (`TargetDir.record`), evaluations and the public files.

- `scan_shard`: every n-th chunk of the scan (`mfv.scan.scanner.scan(shard=...)`), not merged;
- `facets_unit`: one target's facets and mean images;
- `render_unit`: one batch of pictures (the driver cuts the batches, so they are the same
  whatever runs them), files written, index entries returned;
- `evaluate_unit`: one target's metrics, returned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mfv.data.images import load_rgb
from mfv.data.sources import ImageList
from mfv.evaluate.evaluation import Picture, evaluate_target, networks
from mfv.facets.find import FacetOptions, facet_means, facets_of_target
from mfv.models import LoadedModel
from mfv.models.targets import Target, resolve_layer
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.plan import Visual
from mfv.render.recipes import FACET_RECIPES, AnchorSettings
from mfv.runtime.backend import Backend, Worker, run_all
from mfv.runtime.rundir import RenderEntry, RunDir
from mfv.runtime.settings import Settings
from mfv.scan.scanner import ScanResult, scan


@dataclass(frozen=True)
class RunContext:
    """What every unit of a run shares: where the run lives, its settings and inputs, and the
    keys of what earlier stages stored."""

    root: str
    settings: Settings
    targets: tuple[Target, ...]
    slugs: tuple[str, ...]
    scanned_targets: tuple[Target, ...]  # what the scan records (its targets and scan_targets)
    images: ImageList | None = None  # only the scan needs the list itself
    scan_key: str | None = None
    facets_keys: tuple[str | None, ...] = ()

    @property
    def run(self) -> RunDir:
        return RunDir(self.root)

    @functools.cached_property
    def scanned(self) -> ScanResult:
        return ScanResult.load(self.run.scan(self.scan_key))


def facet_options(settings: Settings) -> FacetOptions:
    return FacetOptions(settings.selection, settings.top_n, settings.facets, settings.mean_of,
                        settings.embedding, settings.merge, settings.min_facet_size,
                        settings.seed)


def anchor_settings(settings: Settings) -> AnchorSettings:
    return AnchorSettings(settings.anchor_weight, settings.match_weight, settings.match_layers)


def pixels(model: LoadedModel, policy: str, paths: Sequence[str], indices: np.ndarray
           ) -> np.ndarray:
    """(m, S, S, 3) images at the model's input size in 0..255, resized as `policy` says."""
    pre = model.preprocess
    return np.stack([np.round(pre.to_array(load_rgb(paths[i]), policy) * 255)
                     .astype(np.uint8).transpose(1, 2, 0) for i in indices])


# --------------------------------------------------------------------------------- scan
def _scan_options(s: Settings) -> dict:
    """The settings that decide a scan, as `mfv.scan.scanner.scan` takes them."""
    return dict(code_layer=s.code_layer, batch_size=s.scan_batch_size, workers=s.workers,
                mode=s.scan_mode, top_n=s.top_n)


def scan_shard(worker: Worker, ctx: RunContext, shard: tuple[int, int]) -> None:
    """Every `shard[1]`-th chunk of the scan from `shard[0]`, written, not merged."""
    scan(worker.model, ctx.images, list(ctx.scanned_targets), ctx.run,
         **_scan_options(ctx.settings), shard=shard, merge=False, progress=False)


def scan_label(shard: tuple[int, int]) -> str:
    return f"scan shard {shard[0] + 1}/{shard[1]}"


def scan_on(backend: Backend, model: LoadedModel, ctx: RunContext, run: RunDir
            ) -> ScanResult | None:
    """The scan of `ctx`'s targets: with several workers its shards run on them first, then
    this process merges them (or, alone, scans everything)."""
    if backend.workers > 1:
        run_all(backend, scan_shard, ctx, [(i, backend.workers) for i in range(backend.workers)],
                scan_label)
    return scan(model, ctx.images, list(ctx.scanned_targets), run,
                **_scan_options(ctx.settings), progress=ctx.settings.progress)


# ------------------------------------------------------------------------------- facets
def facets_unit(worker: Worker, ctx: RunContext, index: int) -> None:
    """Target `index`'s facets and mean images, stored under `ctx.facets_keys[index]`."""
    result, target, s = ctx.scanned, ctx.targets[index], ctx.settings
    labels = result.class_labels(worker.model.classes)
    facets = facets_of_target(result.activations_of(result.target_index(target.spec)),
                              result.codes, result.valid, labels, target.classes,
                              facet_options(s), target.spec)
    means = facet_means(facets, functools.partial(pixels, worker.model, s.mean_resize,
                                                  result.paths))
    ctx.run.target(ctx.slugs[index]).save_facets(ctx.facets_keys[index], facets, means)


# ------------------------------------------------------------------------------- render
def render_unit(worker: Worker, ctx: RunContext, visuals: Sequence[Visual]
                ) -> list[tuple[int, RenderEntry]]:
    """One batch of pictures of one recipe: rendered, their files written; the index entries
    (by target index) returned for the driver to record."""
    model, s = worker.model, ctx.settings
    recipe = visuals[0].recipe
    run = ctx.run
    jobs = [Job(v.target, None if v.start is None else
                torch.from_numpy(np.asarray(v.start, np.float32)).permute(2, 0, 1), v.seed,
                _anchor(worker, ctx, v)) for v in visuals]
    options = RenderOptions(s.steps, s.as_written, s.code_layer, anchor_settings(s),
                            s.maco_crops, ctx.scanned.spectrum if recipe == "maco" else None)
    results = render_batches(model, list(ctx.targets), jobs, recipe, options,
                             batch_size=len(jobs), progress=s.progress)
    out = []
    for v, res in zip(visuals, results, strict=True):
        store = run.target(ctx.slugs[v.target])
        out.append((v.target, store.write_visual(v.kind, v.rank, recipe, v.key, image=res.image,
                                                 trace=res.trace, activation=res.activation,
                                                 alpha=res.alpha)))
    return out


def _anchor(worker: Worker, ctx: RunContext, visual: Visual) -> Anchor | None:
    """The facet a picture of an anchored recipe keeps to (None for random starts)."""
    if visual.kind != "facet" or visual.recipe not in FACET_RECIPES:
        return None
    stored = ctx.run.target(ctx.slugs[visual.target]).load_facets(
        ctx.facets_keys[visual.target])
    facet = stored[0].facets[visual.rank]
    photos = pixels(worker.model, ctx.settings.mean_resize, ctx.scanned.paths,
                    facet.representatives)
    return Anchor(facet.code_centre, facet.code_spread, facet.activation_max,
                  photos.transpose(0, 3, 1, 2).astype(np.float32))


def render_label(visuals: Sequence[Visual]) -> str:
    v = visuals[0]
    return f"render batch of {len(visuals)} {v.recipe} pictures (first: target {v.target}, " \
           f"{v.kind} {v.rank})"


# ----------------------------------------------------------------------------- evaluate
def evaluate_unit(worker: Worker, ctx: RunContext,
                  item: tuple[int, tuple[RenderEntry, ...]]) -> dict:
    """Every metric of target `item[0]` over its current pictures `item[1]`."""
    index, visuals = item
    model, s = worker.model, ctx.settings
    if "networks" not in worker.cache:  # the judges load once per worker
        worker.cache["networks"] = networks(model, resolve_layer(model, s.code_layer),
                                            s.judges)
    own, judges = worker.cache["networks"]
    result, target = ctx.scanned, ctx.targets[index]
    store = ctx.run.target(ctx.slugs[index])
    facets = store.load_facets(ctx.facets_keys[index])[0]
    real = result.activation_of(result.target_index(target.spec), facets.selected)
    pictures = [Picture(e.kind, e.rank, e.recipe, e.activation,
                        _open_rgb(store.file(e.files["image"]))) for e in visuals]
    members = [[result.paths[i] for i in f.members] for f in facets.facets]
    labels = result.class_labels(model.classes)
    truth = labels[facets.selected] if labels is not None else None
    return evaluate_target(own, judges, target, facets, pictures, members,
                           float(np.nanmax(real)), truth, s.seed)


def _open_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))

"""The stages' units of work: what a backend (`mfv.runtime.backend`) runs, here or on a Ray worker.

Each unit is a module-level function `unit(worker, context, item)`: it reads what it needs from
the run directory (the scan by its key, a target's facets by theirs), computes, and writes its
result there atomically under its key — so a unit that is run twice (a retried Ray task) writes
the same files and loses nothing. The driver decides which units are missing, and alone writes
indexes (`TargetDir.record`), evaluations and the public files.

- `scan_shard`: every n-th chunk of the scan (`mfv.scan.scanner.scan(shard=...)`), not merged;
- `facets_unit`: one target's facets and mean images (of whole photos, or for hidden spatial
  units of the patches around their peaks: `mfv.facets.patches`);
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
from mfv.evaluate import mis
from mfv.evaluate.evaluation import Case, Picture, evaluate_target, mis_ranking, networks
from mfv.evaluate.observer import load_observer
from mfv.facets.find import FacetResult, facet_means, facets_of_target
from mfv.facets.patches import PATCH_CODE, Patches, frames, load_crops, resolve_region
from mfv.models import LoadedModel
from mfv.models.receptive import ERF_IMAGES, receptive_fields
from mfv.models.targets import LayerRef, Target, negation_pairs, resolve_layer
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.plan import Visual
from mfv.render.recipes import AnchorSettings, get
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


def anchor_settings(settings: Settings) -> AnchorSettings:
    r = settings.render
    return AnchorSettings(r.anchor_weight, r.match_weight, r.match_layers,
                          match_every=r.match_every)


def pixels(model: LoadedModel, policy: str, paths: Sequence[str], indices: np.ndarray
           ) -> np.ndarray:
    """(m, S, S, 3) images at the model's input size in 0..255, resized as `policy` says."""
    pre = model.preprocess
    return np.stack([np.round(pre.to_array(load_rgb(paths[i]), policy) * 255)
                     .astype(np.uint8).transpose(1, 2, 0) for i in indices])


# --------------------------------------------------------------------------------- scan
def scan_shard(worker: Worker, ctx: RunContext, shard: tuple[int, int]) -> None:
    """Every `shard[1]`-th chunk of the scan from `shard[0]`, written, not merged."""
    scan(worker.model, ctx.images, list(ctx.scanned_targets), ctx.run, ctx.settings.scan,
         shard=shard, merge=False, progress=False)


def scan_label(shard: tuple[int, int]) -> str:
    return f"scan shard {shard[0] + 1}/{shard[1]}"


def scan_on(backend: Backend, model: LoadedModel, ctx: RunContext, run: RunDir
            ) -> ScanResult | None:
    """The scan of `ctx`'s targets: with several workers its shards run on them first, then
    this process merges them (or, alone, scans everything)."""
    if backend.workers > 1:
        run_all(backend, scan_shard, ctx, [(i, backend.workers) for i in range(backend.workers)],
                scan_label)
    return scan(model, ctx.images, list(ctx.scanned_targets), run, ctx.settings.scan,
                progress=ctx.settings.progress)


# ------------------------------------------------------------------------------- facets
def facets_unit(worker: Worker, ctx: RunContext, index: int) -> None:
    """Target `index`'s facets and mean images, stored under `ctx.facets_keys[index]`: of the
    whole photos, or (`--region patch`) of the crops around the target's peaks."""
    result, target, s = ctx.scanned, ctx.targets[index], ctx.settings
    labels = result.class_labels(worker.model.classes)
    t = result.target_index(target.spec)
    if resolve_region(s.facets.region, target, result.grid(t)) == "patch":
        side = patch_side(worker, ctx, target.terms[0].layer)
        patches = Patches(worker.model, result.paths,
                          functools.partial(result.peak_pixels, t), side,
                          resolve_layer(worker.model, s.scan.code_layer), target)
        facets = facets_of_target(result.activations_of(t), patches.codes, result.valid,
                                  labels, target.classes, s.facets, target.spec)
        facets.boxes = patches.boxes(facets.selected)
        facets.settings.update(region="patch", patch_side=side, patch_code=PATCH_CODE)
        means = facet_means(facets, patches.pixels)
    else:
        facets = facets_of_target(result.activations_of(t), result.codes, result.valid,
                                  labels, target.classes, s.facets, target.spec)
        facets.settings["region"] = "image"
        means = facet_means(facets, functools.partial(
            pixels, worker.model, s.facets.mean_resize, result.paths))
    ctx.run.target(ctx.slugs[index]).save_facets(ctx.facets_keys[index], facets, means)


def patch_side(worker: Worker, ctx: RunContext, layer: LayerRef) -> int:
    """The side of a layer's patches (`--patch-size`), by default its effective receptive field
    (90 % of the gradient over the scan's first valid images, measured once per worker, scan
    and layer) kept within 3/14 and 3/7 of the input (48-96 px at 224): smaller crops of early
    layers are a blur once resized, larger ones of deep layers are the whole photo again
    (docs/hidden-units.md)."""
    given, size = ctx.settings.facets.patch_size, worker.model.preprocess.input_size
    if given != "auto":
        return min(int(given), size)
    key = f"patch side {ctx.scan_key} {layer.key}"
    if key not in worker.cache:
        model = worker.model
        first = np.flatnonzero(ctx.scanned.valid)[:ERF_IMAGES]
        images = torch.from_numpy(frames(model, ctx.scanned.paths, first)).to(model.device)
        fields = receptive_fields(model, [layer],
                                  images=images.permute(0, 3, 1, 2).float() / 255)
        worker.cache[key] = fields[layer.key].side()
    return int(np.clip(worker.cache[key], round(size * 3 / 14), round(size * 3 / 7)))


def facet_photos(model: LoadedModel, ctx: RunContext, facets: FacetResult,
                 indices: np.ndarray) -> np.ndarray:
    """(m, S, S, 3) uint8: the given members as the facets saw them, their crops for patch
    facets, else the whole photos resized as the run says."""
    paths = ctx.scanned.paths
    if facets.boxes is None:
        return pixels(model, ctx.settings.facets.mean_resize, paths, indices)
    return load_crops(model, paths, indices, np.array([facets.box_of(i) for i in indices]))


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
                _anchor(worker, ctx, v), v.view) for v in visuals]
    r = s.render
    options = RenderOptions(r.steps, r.as_written, s.scan.code_layer, anchor_settings(s),
                            r.maco_crops, ctx.scanned.spectrum if get(recipe).needs_spectrum
                            else None)
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
    """The facet a picture keeps to, for recipes that keep to one (None for random starts)."""
    if visual.kind != "facet" or not get(visual.recipe).needs_anchor:
        return None
    stored = ctx.run.target(ctx.slugs[visual.target]).load_facets(
        ctx.facets_keys[visual.target])
    facet = stored[0].facets[visual.rank]
    photos = facet_photos(worker.model, ctx, stored[0], facet.representatives)
    return Anchor(facet.code_centre, facet.code_spread, facet.activation_max,
                  photos.transpose(0, 3, 1, 2).astype(np.float32))


def render_label(visuals: Sequence[Visual]) -> str:
    v = visuals[0]
    return f"render batch of {len(visuals)} {v.recipe} pictures (first: target {v.target}, " \
           f"{v.kind} {v.rank})"


# ----------------------------------------------------------------------------- evaluate
def evaluate_unit(worker: Worker, ctx: RunContext,
                  item: tuple[int, tuple[RenderEntry, ...], tuple[RenderEntry, ...]]) -> dict:
    """Every metric of target `item[0]` over its current pictures `item[1]`; `item[2]` are the
    pictures of its negation (`--negative`; the MIS task's negative references)."""
    index, visuals, *rest = item
    model, s = worker.model, ctx.settings
    if "networks" not in worker.cache:  # the judges load once per worker
        worker.cache["networks"] = networks(model, resolve_layer(model, s.scan.code_layer),
                                            s.evaluate.judges)
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
    pairs = negation_pairs(ctx.targets, model.logits_layer)
    partner = pairs.get(index)
    negation = None if partner is None else ctx.targets[partner]
    shunned_store = None if partner is None else ctx.run.target(ctx.slugs[partner])
    shunned = [Picture(e.kind, e.rank, e.recipe, e.activation,
                       _open_rgb(shunned_store.file(e.files["image"])))
               for e in (rest[0] if rest and shunned_store else ())]
    observer = ranking = None
    if s.evaluate.observer != "none" and index not in pairs.values():  # not for a negation
        ranking = mis_ranking(result, target.spec, negation.spec if negation else None)
    if ranking is not None and mis.fitting_references(len(ranking)) >= 1:
        key = ("observer", s.evaluate.observer, s.evaluate.observer_layer,
               s.evaluate.observer_weights)
        if key not in worker.cache:  # loads once per worker (a judge's network when it is
            worker.cache[key] = load_observer(  # the same), keeps its photos' embeddings
                s.evaluate.observer, model, s.evaluate.observer_layer,
                s.evaluate.observer_weights, loaded=[j.model for j in judges])
        observer = worker.cache[key]
    boxes = None if facets.boxes is None else [[facets.box_of(i) for i in f.members]
                                                 for f in facets.facets]
    view = facets.unit_side if s.render.picture_scale == "unit" else None
    entry = evaluate_target(own, judges, Case(target, facets, pictures, members,
                                              float(np.nanmax(real)), truth, ranking,
                                              result.paths, shunned, boxes, view),
                            s.seed, observer)
    if ranking is not None and observer is None:  # too few photos: no observer is loaded
        entry["target"].update(mis={"skipped": mis.too_few(len(ranking))})
    return entry


def _open_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))

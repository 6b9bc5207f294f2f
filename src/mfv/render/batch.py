"""The batch driver: many jobs (targets × facets × starts) of one recipe in as few batches as
fit on the device, each result handed back as soon as its batch is done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from mfv.errors import MfvError
from mfv.models import LoadedModel
from mfv.render.anchor import Anchor, AnchoredObjective, default_match_layers
from mfv.render.fourier import fourier_loop
from mfv.render.maco import maco_loop
from mfv.render.objective import Objective, Rendered, measure
from mfv.render.paper import paper_loop
from mfv.render.recipes import RECIPES, AnchorSettings, FourierSettings, MacoSettings, schedule
from mfv.targets import Target, resolve_layer


@dataclass(frozen=True)
class Job:
    """One visualization to make: which target, from which start image (None: noise), seed,
    and for the anchored recipe its facet (None: the target alone)."""

    target: int
    start: torch.Tensor | None = None  # (3, S, S) in 0..255 at the model's input size
    seed: int = 0
    anchor: Anchor | None = None


@dataclass(frozen=True)
class RenderOptions:
    """What a recipe needs besides its jobs."""

    steps: int | None = None  # rescale the recipe's iterations (None: its own)
    as_written: bool = False  # the paper's schedules as written, not as the authors' code ran
    code_layer: str = "penultimate"  # where the anchored recipe pulls toward the facet
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    maco_crops: int | None = None  # MACO's crops per step (None: the published 32)
    amplitude: np.ndarray | None = None  # MACO's fixed amplitude: the scanned images' spectrum


@dataclass
class Result:
    """One finished visualization."""

    image: np.ndarray  # (H, W, 3) uint8, the whole canvas
    trace: np.ndarray  # objective per step
    activation: float  # the target on the final image's central crop
    alpha: np.ndarray | None = None  # (H, W) importance in 0..1, where the recipe makes one


def _run_batch(recipe: str, objective: Objective, jobs: Sequence[Job], options: RenderOptions,
               progress: bool, desc: str) -> Rendered:
    starts, seeds = [j.start for j in jobs], [j.seed for j in jobs]
    fourier = FourierSettings().with_steps(options.steps)
    if recipe == "fourier":
        return fourier_loop(objective, starts, seeds, fourier, progress, desc)
    if recipe == "maco":
        if options.amplitude is None:
            raise MfvError("the maco recipe needs the images' amplitude spectrum "
                           "(RenderOptions.amplitude: a finished scan's `spectrum`)")
        settings = MacoSettings().with_steps(options.steps)
        if options.maco_crops is not None:
            settings = replace(settings, crops=options.maco_crops)
        return maco_loop(objective, starts, seeds, settings,
                         torch.as_tensor(options.amplitude, dtype=torch.float32), progress, desc)
    if recipe == "anchored":
        model = objective.model
        match = options.anchor.match_layers or default_match_layers(model)
        anchored = AnchoredObjective(
            objective, [j.anchor for j in jobs], resolve_layer(model, options.code_layer),
            options.anchor, [resolve_layer(model, path) for path in match])
        return fourier_loop(anchored, starts, seeds, fourier, progress, desc)
    return paper_loop(objective, starts, seeds, schedule(recipe, options.steps),
                      options.as_written, progress, desc)


def default_batch_size(model: LoadedModel) -> int:
    """CPU: 8 (throughput barely grows beyond). CUDA: start large; `render` halves on OOM."""
    return 8 if model.device.type == "cpu" else 64


def render_batches(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                   recipe: str = "paper-mean", options: RenderOptions | None = None,
                   batch_size: int | None = None, progress: bool = True,
                   on_batch: Callable[[list[int], list[Result]], None] | None = None
                   ) -> list[Result]:
    """Make one visualization per job, `batch_size` jobs at a time (all targets mixed).

    `options.steps` rescales the recipe's iterations (None: the paper's 370 / 530 steps, the
    Fourier recipes' 256). `on_batch(indices, results)` is called after each batch, so callers
    can save as they go.
    """
    options = options or RenderOptions()
    if recipe not in RECIPES:
        raise MfvError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    size = model.preprocess.input_size
    for job in jobs:
        if job.start is not None and tuple(job.start.shape) != (3, size, size):
            raise MfvError(f"start images must be (3, {size}, {size}) in 0..255, got "
                           f"{tuple(job.start.shape)}")
    batch = batch_size or default_batch_size(model)
    results: list[Result | None] = [None] * len(jobs)
    order = list(range(len(jobs)))
    start = 0
    while start < len(order):
        rows = order[start:start + batch]
        chosen = [jobs[i] for i in rows]
        objective = Objective(model, targets, [j.target for j in chosen])
        desc = f"{recipe} {start + len(rows)}/{len(jobs)}"
        try:
            out = _run_batch(recipe, objective, chosen, options, progress, desc)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            continue
        finals = measure(objective, out.images, whole=recipe == "maco")
        images = out.images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        alphas = out.alpha.float().cpu().numpy() if out.alpha is not None else None
        batch_results = [Result(images[b].numpy(), out.trace[b], float(finals[b]),
                                None if alphas is None else alphas[b]) for b in range(len(rows))]
        for i, r in zip(rows, batch_results, strict=True):
            results[i] = r
        if on_batch is not None:
            on_batch(rows, batch_results)
        start += len(rows)
    return results  # type: ignore[return-value]

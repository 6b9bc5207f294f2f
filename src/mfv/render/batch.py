"""The batch driver: many jobs (targets × facets × starts) of one recipe in as few batches as
fit on the device, each result handed back as soon as its batch is done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfv.errors import MfvError
from mfv.models import LoadedModel
from mfv.render.fourier import fourier_loop
from mfv.render.objective import Objective, Rendered, measure
from mfv.render.paper import paper_loop
from mfv.render.recipes import RECIPES, FourierSettings, schedule
from mfv.targets import Target


@dataclass(frozen=True)
class Job:
    """One visualization to make: which target, from which start image (None: noise), seed."""

    target: int
    start: torch.Tensor | None = None  # (3, S, S) in 0..255 at the model's input size
    seed: int = 0


@dataclass
class Result:
    """One finished visualization."""

    image: np.ndarray  # (H, W, 3) uint8, the whole canvas
    trace: np.ndarray  # objective per step
    activation: float  # the target on the final image's central crop
    alpha: np.ndarray | None = None  # (H, W) importance in 0..1, where the recipe makes one


def _run_batch(recipe: str, objective: Objective, jobs: Sequence[Job], steps: int | None,
               as_written: bool, progress: bool, desc: str) -> Rendered:
    starts, seeds = [j.start for j in jobs], [j.seed for j in jobs]
    if recipe == "fourier":
        return fourier_loop(objective, starts, seeds, FourierSettings().with_steps(steps),
                            progress, desc)
    return paper_loop(objective, starts, seeds, schedule(recipe, steps), as_written, progress,
                      desc)


def default_batch_size(model: LoadedModel) -> int:
    """CPU: 8 (throughput barely grows beyond). CUDA: start large; `render` halves on OOM."""
    return 8 if model.device.type == "cpu" else 64


def render_batches(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                   recipe: str = "paper-mean", steps: int | None = None,
                   as_written: bool = False, batch_size: int | None = None,
                   progress: bool = True,
                   on_batch: Callable[[list[int], list[Result]], None] | None = None
                   ) -> list[Result]:
    """Make one visualization per job, `batch_size` jobs at a time (all targets mixed).

    `steps` rescales the recipe's iterations (None: the paper's 370 / 530 steps, fourier 256).
    `on_batch(indices, results)` is called after each batch, so callers can save as they go.
    """
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
            out = _run_batch(recipe, objective, chosen, steps, as_written, progress, desc)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            continue
        finals = measure(objective, out.images)
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

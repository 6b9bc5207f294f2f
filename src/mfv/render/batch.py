"""The batch driver: many jobs (targets × facets × starts) of one recipe in as few batches as
fit on the device, each result handed back as soon as its batch is done.

Batch size, when the caller gives none (`batch_size_for`): on CUDA the largest that fits, found
by probing (the recipe's own loop for a few steps at batch 1, 2, 4, ... until the device runs
out of memory or `PROBE_LIMIT`), remembered for the process in the model's cache per recipe,
input size and pass settings; on the CPU `CPU_BATCH`, the measured throughput optimum; elsewhere
`OTHER_BATCH`. The jobs are then spread evenly over as few batches as that allows. A batch that
runs out of memory anyway is halved and retried (a given `batch_size` too; it is otherwise kept
as given).

How the model's pass runs (`RenderOptions.precision`, `.channels_last`) is `Forward`'s business
(`mfv.render.objective`); the model's weights are in channels_last layout for the whole call
when the pass is (`prepared`), and reported activations use a float32 pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfv.core.errors import MfvError
from mfv.models import LoadedModel
from mfv.models.passes import prepared
from mfv.models.targets import Target
from mfv.render.anchor import Anchor
from mfv.render.objective import Objective, Rendered, measure
from mfv.render.options import RenderOptions
from mfv.render.recipes import DEFAULT, get
from mfv.render.recipes.base import Batch

# Images per batch on the CPU: Lite0's forward+backward per image is flat from batch 8 to 16 on 2
# cores (`benchmarks/steps.py`: ~2x faster than batch 1), so the default k = 10 facets of a
# target go in one batch rather than as 5 + 5.
CPU_BATCH = 10
OTHER_BATCH = 8  # devices neither CPU nor CUDA: not probed (their out-of-memory errors differ)
PROBE_LIMIT = 512  # the probe stops here: GPU throughput has long stopped growing


@dataclass(frozen=True)
class Job:
    """One visualization to make: which target, from which start image (None: the recipe's
    random start), seed, for a recipe that keeps to a facet its anchor (None: the target
    alone), and for a hidden unit's patch facets the side its target reads the canvas at
    (`mfv.render.objective.unit_view`; None: the canvas as it is)."""

    target: int
    start: torch.Tensor | None = None  # (3, S, S) in 0..255 at the model's input size
    seed: int = 0
    anchor: Anchor | None = None
    view: int | None = None


@dataclass
class Result:
    """One finished visualization."""

    image: np.ndarray  # (H, W, 3) uint8, the whole canvas
    trace: np.ndarray  # objective per step
    activation: float  # the target on the final image's central crop
    alpha: np.ndarray | None = None  # (H, W) importance in 0..1, where the recipe makes one


def _run_batch(recipe: str, objective: Objective, jobs: Sequence[Job], options: RenderOptions,
               progress: bool, desc: str) -> Rendered:
    batch = Batch(objective, [j.start for j in jobs], [j.seed for j in jobs],
                  [j.anchor for j in jobs], progress, desc)
    return get(recipe).render(batch, options)


def default_batch_size(model: LoadedModel) -> int:
    """A batch size without probing: `CPU_BATCH` on the CPU, 64 on CUDA, `OTHER_BATCH` else
    (`batch_size_for` probes CUDA for the largest that fits)."""
    kind = model.device.type
    return CPU_BATCH if kind == "cpu" else 64 if kind == "cuda" else OTHER_BATCH


def batch_size_for(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                   recipe: str, options: RenderOptions | None = None,
                   probe: bool | None = None) -> int:
    """How many of `jobs` to render at once (module doc): probed (`probe`; None: on CUDA) for
    the largest that fits, at most `PROBE_LIMIT`, else `default_batch_size`; never more than
    the jobs, and spread evenly (100 jobs that fit 64 at a time run as 2 × 50)."""
    options = options or RenderOptions()
    if not jobs:
        return 1
    if model.device.type == "cuda" if probe is None else probe:
        with prepared(model, options.forward(model.device)):
            most = probe_batch(model, targets, jobs, recipe, options)
    else:
        most = default_batch_size(model)
    most = max(1, min(most, len(jobs)))
    return math.ceil(len(jobs) / math.ceil(len(jobs) / most))


def _probe_key(model: LoadedModel, recipe: str, options: RenderOptions) -> tuple:
    """What decides a batch's memory: device, recipe, input size, the pass, the crops per step
    and the captured layers."""
    return (str(model.device), recipe, model.preprocess.input_size,
            options.forward(model.device), options.maco_crops, options.code_layer,
            options.anchor)


def _probe_memo(model: LoadedModel) -> dict:
    """(largest batch known to fit, smallest known to fail or None) per `_probe_key`: kept in
    the model's own cache, so it lasts as long as the loaded model (the process)."""
    return model._cache.setdefault("render-batch", {})


def probe_batch(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                recipe: str, options: RenderOptions | None = None,
                limit: int = PROBE_LIMIT) -> int:
    """The largest batch of this recipe that runs on the model's device: the recipe's own loop
    for a few steps (`Recipe.probe_options`: its peak memory) on 1, 2, 4, ... and
    finally min(limit, len(jobs)) jobs (cycled from `jobs`), until the device runs out of
    memory. What fitted and what failed is remembered (`_probe_memo`), so sizes are tried once
    per process; a later call with more jobs probes on from there."""
    options = options or RenderOptions()
    memo = _probe_memo(model)
    key = _probe_key(model, recipe, options)
    fits, fails = memo.get(key, (0, None))
    need = max(1, min(limit, len(jobs)))
    size = 1
    while fails is None or size < fails:
        if size > fits:
            if not _fits(model, targets, [jobs[i % len(jobs)] for i in range(size)], recipe,
                         options):
                fails = size
                break
            fits = size
        if size >= need:
            break
        size = min(2 * size, need)
    memo[key] = (fits, fails)
    return max(1, fits)


def _fits(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job], recipe: str,
          options: RenderOptions) -> bool:
    """Whether a batch of `jobs` runs a few steps of the recipe without running out of memory
    (the recipe's `probe_options`: its peak memory in as few steps as that takes)."""
    probe = get(recipe).probe_options(options, len(jobs))
    objective = Objective(model, targets, [j.target for j in jobs], probe.forward(model.device),
                          [j.view for j in jobs])
    try:
        _run_batch(recipe, objective, jobs, probe, False, "probe")
        ok = True
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        ok = False
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        torch.cuda.empty_cache()
    return ok


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is the device running out of memory (torch's own error, or a CUDA
    library's allocation failure reported as a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _remember_failure(model: LoadedModel, recipe: str, options: RenderOptions, batch: int
                      ) -> None:
    """A batch that ran out of memory: later probes stay below it."""
    memo = _probe_memo(model)
    key = _probe_key(model, recipe, options)
    fits, fails = memo.get(key, (0, None))
    memo[key] = (min(fits, batch - 1), batch if fails is None else min(fails, batch))


def render_batches(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                   recipe: str = DEFAULT, options: RenderOptions | None = None,
                   batch_size: int | None = None, progress: bool = True,
                   on_batch: Callable[[list[int], list[Result]], None] | None = None
                   ) -> list[Result]:
    """Make one visualization per job, `batch_size` jobs at a time (all targets mixed; None:
    `batch_size_for`, probed on CUDA).

    `options.steps` rescales the recipe's iterations (None: the recipe's own).
    `on_batch(indices, results)` is called after each batch, so callers can save as they go.
    """
    options = options or RenderOptions()
    get(recipe)  # a known recipe
    size = model.preprocess.input_size
    for job in jobs:
        if job.start is not None and tuple(job.start.shape) != (3, size, size):
            raise MfvError(f"start images must be (3, {size}, {size}) in 0..255, got "
                           f"{tuple(job.start.shape)}")
    forward = options.forward(model.device)
    with prepared(model, forward):
        batch = batch_size or batch_size_for(model, targets, jobs, recipe, options)
        return _render_all(model, targets, jobs, recipe, options, batch, progress, on_batch)


def _render_all(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                recipe: str, options: RenderOptions, batch: int, progress: bool,
                on_batch: Callable[[list[int], list[Result]], None] | None) -> list[Result]:
    forward = options.forward(model.device)
    results: list[Result | None] = [None] * len(jobs)
    start = 0
    while start < len(jobs):
        rows = list(range(start, min(start + batch, len(jobs))))
        chosen = [jobs[i] for i in rows]
        objective = Objective(model, targets, [j.target for j in chosen], forward,
                              [j.view for j in chosen])
        desc = f"{recipe} {start + len(rows)}/{len(jobs)}"
        try:
            out = _run_batch(recipe, objective, chosen, options, progress, desc)
        except RuntimeError as error:
            if batch == 1 or not out_of_memory(error):
                raise
            _remember_failure(model, recipe, options, batch)
            batch = max(1, batch // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        saved = out.images.round().clamp(0, 255)  # the 8-bit picture the user gets
        finals = measure(objective, saved, whole=get(recipe).whole_canvas)
        images = saved.to(torch.uint8).permute(0, 2, 3, 1).cpu()
        alphas = out.alpha.float().cpu().numpy() if out.alpha is not None else None
        batch_results = [Result(images[b].numpy(), out.trace[b], float(finals[b]),
                                None if alphas is None else alphas[b]) for b in range(len(rows))]
        for i, r in zip(rows, batch_results, strict=True):
            results[i] = r
        if on_batch is not None:
            on_batch(rows, batch_results)
        start += len(rows)
    return results  # type: ignore[return-value]

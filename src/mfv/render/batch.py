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
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from mfv.core.errors import MfvError
from mfv.models import LoadedModel
from mfv.models.passes import Forward, default_channels_last, prepared
from mfv.models.targets import Target, resolve_layer
from mfv.render.anchor import Anchor, AnchoredObjective, default_match_layers
from mfv.render.fourier import fourier_loop
from mfv.render.maco import GPU_PASS_IMAGES, maco_loop
from mfv.render.objective import Objective, Rendered, measure
from mfv.render.paper import paper_loop
from mfv.render.recipes import (
    RECIPES,
    SCHEDULES,
    AnchorSettings,
    FourierSettings,
    MacoSettings,
    schedule,
)

# Images per batch on the CPU: Lite0's forward+backward per image is flat from batch 8 to 16 on 2
# cores (`benchmarks/sweep.py`: ~2x faster than batch 1), so the default k = 10 facets of a
# target go in one batch rather than as 5 + 5.
CPU_BATCH = 10
OTHER_BATCH = 8  # devices neither CPU nor CUDA: not probed (their out-of-memory errors differ)
PROBE_LIMIT = 512  # the probe stops here: GPU throughput has long stopped growing


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
    precision: str = "float32"  # the model's pass: "float32", or "bfloat16" (autocast; GPUs)
    channels_last: bool | None = None  # the pass's memory layout (None: `default_channels_last`)

    def __post_init__(self) -> None:
        Forward(self.precision)  # checks it

    def forward(self, device: torch.device) -> Forward:
        """How the model's pass runs on `device` (batch norms as affine maps: always)."""
        layout = default_channels_last(device) if self.channels_last is None \
            else self.channels_last
        return Forward(self.precision, layout, affine_batchnorm=True)


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
    """What decides a batch's memory: device, recipe, input size, the pass, MACO's crops and
    the anchored recipe's captured layers."""
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
    for a few steps (its peak memory: one MACO pass, every paper octave) on 1, 2, 4, ... and
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
    (MACO: its crops capped to one pass, the most it holds at once)."""
    steps = 2 * len(SCHEDULES[recipe]) if recipe in SCHEDULES else 2
    crops = options.maco_crops or MacoSettings().crops
    probe = replace(options, steps=steps,
                    maco_crops=min(crops, max(1, GPU_PASS_IMAGES // len(jobs))))
    objective = Objective(model, targets, [j.target for j in jobs], probe.forward(model.device))
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
                   recipe: str = "paper-mean", options: RenderOptions | None = None,
                   batch_size: int | None = None, progress: bool = True,
                   on_batch: Callable[[list[int], list[Result]], None] | None = None
                   ) -> list[Result]:
    """Make one visualization per job, `batch_size` jobs at a time (all targets mixed; None:
    `batch_size_for`, probed on CUDA).

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
    forward = options.forward(model.device)
    with prepared(model, forward):
        batch = batch_size or batch_size_for(model, targets, jobs, recipe, options)
        return _render_all(model, targets, jobs, recipe, options, forward, batch, progress,
                           on_batch)


def _render_all(model: LoadedModel, targets: Sequence[Target], jobs: Sequence[Job],
                recipe: str, options: RenderOptions, forward: Forward, batch: int,
                progress: bool, on_batch: Callable[[list[int], list[Result]], None] | None
                ) -> list[Result]:
    results: list[Result | None] = [None] * len(jobs)
    start = 0
    while start < len(jobs):
        rows = list(range(start, min(start + batch, len(jobs))))
        chosen = [jobs[i] for i in rows]
        objective = Objective(model, targets, [j.target for j in chosen], forward)
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
        finals = measure(objective, saved, whole=recipe == "maco")
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

"""MACO (Fel et al., NeurIPS 2023, arXiv 2306.06805), batched: optimize only the Fourier phase of
a canvas whose amplitude is the natural images' mean spectrum (the scan's), with NAdam on many
random crops, and accumulate the input gradients into a transparency (attribution) map.

Per step and sample: the canvas (`MacoImage`), `crops` square boxes of it (centre ~ N(1/2, 0.15)
of the side, side ~ N(mean, 0.05) clipped to [0.05, 1], the mean going linearly 0.5 -> 0.05
over the run) resized bilinearly to the model's input, outside the canvas mid-grey, plus Gaussian
noise of sd `noise` and uniform noise of width `noise` (grey levels); the objective is the mean
over the crops; NAdam ascends it on the phase; |d objective / d canvas| is summed over the steps.
The transparency is that sum averaged over the colour channels, clipped at its 80th percentile
and divided by its maximum (the reference code's `plot_maco`), (H, W) in 0..1. A picture is
measured on its whole canvas resized to the input (the crops see every scale).

Defaults (`MacoSettings`) are those of the authors' implementation released with the paper
(xplique `maco`, July 2023); how they compare with the later Horama code, and what fewer crops
cost in quality, is in docs/benchmarks.md ("MACO"). Crop geometry and the start phase come from a
per-sample CPU generator, the noise from a per-sample generator on the model's device, both
seeded by the sample's seed: a batch gives each sample what it would get alone (up to float
rounding), on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mfv.core.errors import MfvError
from mfv.data.spectrum import check_amplitude, resize_amplitude
from mfv.render.maco_param import MacoImage
from mfv.render.objective import Objective, Rendered
from mfv.render.recipes import register
from mfv.render.recipes.base import Batch, Recipe, optimize

if TYPE_CHECKING:
    from mfv.render.options import RenderOptions
    from mfv.render.plan import RenderSettings

NAMES = ("maco",)
GREY = 127.5  # what the crops see outside the canvas (0 in the reference code's value range)
# Crops per forward pass by default: on 2 CPU cores Lite0 runs 8-image passes faster per crop
# than 32-image ones (cache); on a GPU larger passes pay (memory: ~the pass's activations).
CPU_PASS_IMAGES, GPU_PASS_IMAGES = 8, 128


@dataclass(frozen=True)
class MacoSettings:
    """MACO's optimization settings (the reference implementation's defaults, module doc)."""

    steps: int = 256
    lr: float = 1.0  # NAdam, on the (standardized) phase
    crops: int = 32  # random crops per step and sample
    box: tuple[float, float] = (0.5, 0.05)  # mean crop side / canvas side, first -> last step
    box_sd: float = 0.05  # sd of each crop's side around the mean
    box_min: float = 0.05  # crop sides are clipped to [box_min, 1]
    center_sd: float = 0.15  # sd of crop centres around the canvas centre (fraction of the side)
    noise: float = 10.2  # grey levels: N(0, noise^2) + U(-noise / 2, noise / 2) on every crop
    canvas: float = 512 / 224  # canvas side / model input side
    alpha_percentile: float = 80.0  # the transparency is clipped at this percentile

    def __post_init__(self) -> None:
        if self.steps < 0 or self.crops < 1 or self.lr <= 0 or self.canvas < 1:
            raise MfvError("MACO needs steps >= 0, crops >= 1, lr > 0 and canvas >= 1")
        spreads = (self.box_sd, self.center_sd, self.noise)
        if not 0 < self.box_min <= 1 or not all(0 < b <= 1 for b in self.box) or \
                min(spreads) < 0 or not 0 < self.alpha_percentile <= 100:
            raise MfvError("MACO box sizes must be in (0, 1], spreads and noise >= 0, and the "
                           "alpha percentile in (0, 100]")

    def with_steps(self, steps: int | None) -> MacoSettings:
        return self if steps is None else replace(self, steps=steps)

    def canvas_size(self, input_size: int) -> int:
        return max(input_size, round(self.canvas * input_size))


def maco_loop(objective: Objective, starts: Sequence[torch.Tensor | None], seeds: Sequence[int],
              settings: MacoSettings | None, amplitude: torch.Tensor,
              max_images: int | None = None) -> Rendered:
    """MACO on a batch: `starts[b]` a (3, S, S) 0..255 image (its phase is the start) or None
    (random phase); `amplitude` the natural images' mean spectrum (`AmplitudeSpectrum.result()`,
    any size: resampled to the canvas). Returns the canvases (B, 3, M, M) in 0..255, the objective
    (mean over the crops) at every step (B, steps), and the transparency (B, M, M) in 0..1.
    `max_images` caps the crops per forward pass (default: `CPU_PASS_IMAGES` on the CPU,
    `GPU_PASS_IMAGES` elsewhere); results are the same up to float rounding."""
    return run_maco(Batch(objective, starts, seeds), settings or MacoSettings(), amplitude,
                    max_images)


def run_maco(batch: Batch, settings: MacoSettings, amplitude: torch.Tensor,
             max_images: int | None = None) -> Rendered:
    """`maco_loop` on a `Batch`."""
    check_amplitude(amplitude)
    objective, device, size = batch.objective, batch.device, batch.size
    side = settings.canvas_size(size)
    count = len(batch.seeds)
    gens = batch.generators()
    phase = torch.stack([torch.randn((3, side, side // 2 + 1), generator=g) for g in gens])
    geometry = _crop_geometry(gens, settings).to(device)  # (steps, B, crops, 3)
    noise_gens = [torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
                  for g in gens]
    image = MacoImage(resize_amplitude(amplitude.float(), side).to(device), phase.to(device))
    rows = [b for b, s in enumerate(batch.starts) if s is not None]
    if rows:
        image.set_image(_canvas_starts([batch.starts[b] for b in rows], size, side, device), rows)
    optimizer = torch.optim.NAdam(image.parameters(), lr=settings.lr)
    max_images = max_images or (CPU_PASS_IMAGES if device.type == "cpu" else GPU_PASS_IMAGES)
    per_pass = max(1, max_images // count)
    tiled: dict[int, Objective] = {}
    saliency = torch.zeros(count, side, side, device=device)

    def step(i: int) -> torch.Tensor:
        pixels = image()
        canvas = pixels.detach().requires_grad_(True)
        value = torch.zeros(count, device=device)
        for first in range(0, settings.crops, per_pass):
            n = min(per_pass, settings.crops - first)
            if n not in tiled:
                tiled[n] = objective.tiled(n)
            crops = _crops(canvas, geometry[i, :, first:first + n], size)
            crops = crops + _noise(noise_gens, n, size, settings.noise, crops)
            values = tiled[n](crops).view(n, count)
            (values.sum() / settings.crops).backward()
            value = value + values.detach().sum(0) / settings.crops
        saliency.add_(canvas.grad.abs().mean(dim=1))
        optimizer.zero_grad(set_to_none=True)
        pixels.backward(-canvas.grad)  # ascend: NAdam minimizes
        optimizer.step()
        return value

    trace = optimize(batch, settings.steps, step)
    with torch.no_grad():
        final = image().clamp(0, 255)
    return Rendered(final, trace, transparency(saliency, settings.alpha_percentile))


def transparency(saliency: torch.Tensor, percentile: float = 80.0) -> torch.Tensor:
    """(B, H, W) summed |gradients| -> MACO's transparency in 0..1: clipped at the per-sample
    `percentile`, divided by the maximum. Where that percentile is 0 (gradients on less than
    100 - percentile % of the canvas, where the reference would divide by 0) it is not clipped;
    all zero stays zero."""
    flat = saliency.flatten(1).float()
    ceiling = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    ceiling = torch.where(ceiling > 0, ceiling, flat.amax(dim=1, keepdim=True))
    clipped = torch.minimum(flat, ceiling)
    alpha = torch.where(ceiling > 0, clipped / ceiling.clamp(min=1e-30), torch.zeros_like(flat))
    return alpha.view_as(saliency)


def _crop_geometry(gens: Sequence[torch.Generator], s: MacoSettings) -> torch.Tensor:
    """Every step's crops for each sample, (steps, B, crops, 3): centre x, centre y, side, all
    as fractions of the canvas side, drawn from the sample's own generator."""
    means = torch.linspace(s.box[0], s.box[1], s.steps, dtype=torch.float64) if s.steps > 1 \
        else torch.full((s.steps,), s.box[0], dtype=torch.float64)
    per_sample = []
    for g in gens:
        centers = 0.5 + torch.randn(s.steps, s.crops, 2, generator=g, dtype=torch.float64) \
            * s.center_sd
        sides = means[:, None] + torch.randn(s.steps, s.crops, generator=g,
                                             dtype=torch.float64) * s.box_sd
        per_sample.append(torch.cat([centers, sides.clamp(s.box_min, 1.0)[..., None]], dim=-1))
    return torch.stack(per_sample, dim=1).float()


def _crops(canvas: torch.Tensor, geometry: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear size x size crops of (B, 3, M, M) canvases at `geometry` (B, k, 3), crop-major:
    row j * B + b is sample b's crop j; mid-grey outside the canvas. One grid_sample per call:
    sample b's k crops are stacked into one tall grid, so the canvas is never copied."""
    batch, k = geometry.shape[:2]
    base = (torch.arange(size, device=canvas.device, dtype=canvas.dtype) + 0.5) / size * 2 - 1
    cx, cy, side = (geometry[..., i].to(canvas.dtype)[..., None, None] for i in range(3))
    gx = (2 * cx - 1 + side * base.view(1, 1, 1, -1)).expand(batch, k, size, size)
    gy = (2 * cy - 1 + side * base.view(1, 1, -1, 1)).expand(batch, k, size, size)
    grid = torch.stack([gx, gy], dim=-1).reshape(batch, k * size, size, 2)
    out = F.grid_sample(canvas - GREY, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) + GREY
    return out.view(batch, 3, k, size, size).permute(2, 0, 1, 3, 4).reshape(k * batch, 3, size,
                                                                              size)


def _noise(gens: Sequence[torch.Generator], count: int, size: int, level: float,
           like: torch.Tensor) -> torch.Tensor:
    """Gaussian (sd `level`) plus uniform (width `level`) noise for `count` crops of every sample,
    crop-major like `_crops`; drawn crop by crop from each sample's generator, so a sample's
    noise does not depend on the batch or on how the crops are split into passes."""
    shape = (3, size, size)
    out = torch.empty(count, len(gens), *shape, device=like.device, dtype=like.dtype)
    for j in range(count):
        for b, g in enumerate(gens):
            normal = torch.randn(shape, generator=g, device=like.device, dtype=like.dtype)
            uniform = torch.rand(shape, generator=g, device=like.device, dtype=like.dtype)
            out[j, b] = normal * level + (uniform - 0.5) * level
    return out.view(count * len(gens), *shape)


def _canvas_starts(starts: Sequence[torch.Tensor], size: int, side: int,
                   device: torch.device) -> torch.Tensor:
    """Start images (3, S, S) in 0..255 -> (n, 3, M, M) on the device (bicubic when M > S)."""
    for s in starts:
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (3, size, size):
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise MfvError(f"start images must be (3, {size}, {size}) in 0..255, got {shape}")
    images = torch.stack([s.to(device, torch.float32) for s in starts])
    if side != size:
        images = F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False)
    return images.clamp(0, 255)


class Maco(Recipe):
    """MACO on the scanned images' amplitude (`RenderOptions.amplitude`), with
    `RenderOptions.maco_crops` crops a step (None: the published 32)."""

    name = "maco"
    needs_spectrum = True
    whole_canvas = True

    def settings(self, options: RenderOptions) -> MacoSettings:
        settings = MacoSettings().with_steps(options.steps)
        return settings if options.maco_crops is None else replace(settings,
                                                                    crops=options.maco_crops)

    def key_material(self, settings: RenderSettings) -> dict[str, Any]:
        return {"crops": settings.maco_crops, "spectrum": settings.spectrum}

    def probe_options(self, options: RenderOptions, batch: int) -> RenderOptions:
        """Two steps with the crops capped to one pass: the most a step holds at once."""
        crops = min(self.settings(options).crops, max(1, GPU_PASS_IMAGES // batch))
        return replace(options, steps=2, maco_crops=crops)

    def render(self, batch: Batch, options: RenderOptions) -> Rendered:
        if options.amplitude is None:
            raise MfvError("the maco recipe needs the images' amplitude spectrum "
                           "(RenderOptions.amplitude: a finished scan's `spectrum`)")
        return run_maco(batch, self.settings(options),
                        torch.as_tensor(options.amplitude, dtype=torch.float32))


register(Maco())

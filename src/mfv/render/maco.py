"""MACO (Fel et al., NeurIPS 2023, arXiv 2306.06805), batched: optimize only the Fourier phase of
a canvas whose amplitude is the natural images' mean spectrum, with NAdam on many random crops,
and accumulate the input gradients into a transparency (attribution) map.

Per step and sample: the canvas (`MacoImage`), `crops` square boxes of it (centre ~ N(1/2, 0.15)
of the side, side ~ N(mean, 0.05) clipped to [0.05, 1], the mean going linearly 0.5 -> 0.05
over the run) resized bilinearly to the model's input, outside the canvas mid-grey, plus Gaussian
noise of sd `noise` and uniform noise of width `noise` (grey levels); the objective is the mean
over the crops; NAdam ascends it on the phase; |d objective / d canvas| is summed over the steps.
The transparency is that sum averaged over the colour channels, clipped at its 80th percentile
and divided by its maximum (the reference code's `plot_maco`), (H, W) in 0..1.

Defaults (`MacoSettings`) are those of the authors' implementation released with the paper
(xplique `maco`, Fel, July 2023): 256 steps, NAdam lr 1.0, 32 crops, a 512 px canvas for a 224 px
model (`canvas` = 512 / 224), box 0.5 -> 0.05, noise 0.08 on a (-1, 1) value range (10.2 grey
levels). Their later PyTorch code (serre-lab/Horama `maco`) uses 1000 steps, 6 crops of a 1280 px
canvas, box sides uniform in [0.25, 0.30] (documented as 0.20-0.25), noise 0.05 on a (-2.5, 2.5)
range (2.55 grey levels) and bicubic antialiased resizing; `HORAMA` approximates it. Crop
geometry and the start phase come from a per-sample CPU generator, the noise from a per-sample
generator on the model's device, both seeded by the sample's seed: a batch gives each sample what
it would get alone (up to float rounding), on any device.

Cost on 2 CPU cores (Lite0, 224 px, one class logit): ~44 ms a crop in 8-image passes when the
machine is quiet, so 32 crops cost ~1.4 s a step and sample (256 steps: ~6 min a sample);
`CPU_CROPS` = 4 costs ~0.19 s (~0.8 min). Measured quality (one run, tench, 32 fixed evaluation
crops): 32 crops x 64 steps logit 14.7 / p 0.94; 4 crops x 256 steps (a third of that time) 13.6 /
0.92; 4 crops x 64 steps 11.1 / 0.77. Starting from an image: at lr 1.0 its phase is scrambled
within a few steps (correlation with the photo 0.81 -> 0.44 after 1 step, 0.12 after 10); at lr
0.1 it fades gradually (0.74 after 10 steps, 0.46 after 100) while the logit rises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mfv.core.errors import MfvError
from mfv.data.spectrum import check_amplitude, resize_amplitude
from mfv.render.maco_param import MacoImage
from mfv.render.objective import Objective, Rendered
from mfv.render.recipes import MacoSettings

GREY = 127.5  # what the crops see outside the canvas (0 in the reference code's value range)
# Crops per forward pass by default: on 2 CPU cores Lite0 runs 8-image passes at ~44 ms a crop,
# 32-image passes at ~74 (cache); on a GPU larger passes pay (memory: ~the pass's activations).
CPU_PASS_IMAGES, GPU_PASS_IMAGES = 8, 128


HORAMA = MacoSettings(steps=1000, crops=6, box=(0.275, 0.275), box_sd=0.05 / math.sqrt(12),
                      box_min=0.25, noise=2.55, canvas=1280 / 224)
CPU_CROPS = 4  # a CPU-friendly crop count, `replace(MacoSettings(), crops=CPU_CROPS)`: 8x cheaper


def maco_loop(objective: Objective, starts: Sequence[torch.Tensor | None], seeds: Sequence[int],
              settings: MacoSettings | None, amplitude: torch.Tensor, progress: bool = False,
              desc: str = "render", max_images: int | None = None) -> Rendered:
    """MACO on a batch: `starts[b]` a (3, S, S) 0..255 image (its phase is the start) or None
    (random phase); `amplitude` the natural images' mean spectrum (`AmplitudeSpectrum.result()`,
    any size: resampled to the canvas). Returns the canvases (B, 3, M, M) in 0..255, the objective
    (mean over the crops) at every step (B, steps), and the transparency (B, M, M) in 0..1.
    `max_images` caps the crops per forward pass (default: `CPU_PASS_IMAGES` on the CPU,
    `GPU_PASS_IMAGES` elsewhere); results are the same up to float rounding."""
    settings = settings or MacoSettings()
    check_amplitude(amplitude)
    model = objective.model
    device = model.device
    size = model.preprocess.input_size
    side = settings.canvas_size(size)
    batch = len(seeds)
    if len(starts) != batch:
        raise MfvError(f"got {len(starts)} starts for {batch} seeds")
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    shape = (3, side, side // 2 + 1)
    phase = torch.stack([torch.randn(shape, generator=g) for g in gens])
    geometry = _crop_geometry(gens, settings)  # (steps, B, crops, 3) on the CPU
    noise_gens = [torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
                  for g in gens]
    image = MacoImage(resize_amplitude(amplitude.float(), side).to(device), phase.to(device))
    rows = [b for b, s in enumerate(starts) if s is not None]
    if rows:
        image.set_image(_canvas_starts([starts[b] for b in rows], size, side, device), rows)
    optimizer = torch.optim.NAdam(image.parameters(), lr=settings.lr)
    geometry = geometry.to(device)
    max_images = max_images or (CPU_PASS_IMAGES if device.type == "cpu" else GPU_PASS_IMAGES)
    per_pass = max(1, max_images // batch)
    tiled = {}
    saliency = torch.zeros(batch, side, side, device=device)
    trace = []
    for step in tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress,
                     leave=False):
        pixels = image()
        canvas = pixels.detach().requires_grad_(True)
        value = torch.zeros(batch, device=device)
        for first in range(0, settings.crops, per_pass):
            count = min(per_pass, settings.crops - first)
            if count not in tiled:
                tiled[count] = objective.tiled(count)
            crops = _crops(canvas, geometry[step, :, first:first + count], size)
            crops = crops + _noise(noise_gens, count, size, settings.noise, crops)
            values = tiled[count](crops).view(count, batch)
            (values.sum() / settings.crops).backward()
            value = value + values.detach().sum(0) / settings.crops
        grad = canvas.grad
        saliency += grad.abs().mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        pixels.backward(-grad)  # ascend: NAdam minimizes
        optimizer.step()
        trace.append(value)
    with torch.no_grad():
        final = image().clamp(0, 255)
    trace_array = (torch.stack(trace, dim=1).float().cpu().numpy() if trace
                   else np.zeros((batch, 0), np.float32))
    return Rendered(final, trace_array, transparency(saliency, settings.alpha_percentile))


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

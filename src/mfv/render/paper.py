"""The authors' optimizer (paper-spec §2.3–2.5), batched: every sample has its own objective,
start image and randomness.

Per step: a Gaussian-jittered crop of an upscaled canvas, the gradient of the target, an
optional margin mask, the normalized step `x += step / mean|g| · g`, clipping to 0..255,
TV-Bregman denoising of the crop, write-back. Octaves (upscaling, step and TV ramps, crop
windows) come from the schedule (`mfv.render.recipes`). A sample's randomness comes only from
its own seed, so a batch gives the images each sample would get alone (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mfv.render.objective import Objective, Rendered
from mfv.render.recipes import Octave
from mfv.render.tv import tv_bregman

PAPER_NOISE = (175.0, 8.0)  # the authors' random start: grey 175 + N(0, 8²) per pixel
PAPER_REFERENCE_SIZE = 227  # margins in the schedules are given at CaffeNet's input size


def paper_noise(seed: int, size: int) -> np.ndarray:
    """The authors' start image, (3, S, S) RGB, drawn from the seed's stream."""
    rng = np.random.RandomState(seed)
    return _noise(rng, size)


def _noise(rng: np.random.RandomState, size: int) -> np.ndarray:
    mean, sd = PAPER_NOISE
    return rng.normal([mean] * 3, sd, (size, size, 3)).transpose(2, 0, 1)


def _margin_mask(size: int, margin: int, like: torch.Tensor) -> torch.Tensor | None:
    margin = round(margin * size / PAPER_REFERENCE_SIZE)
    if margin <= 0:
        return None
    mask = torch.zeros(size, size, dtype=like.dtype, device=like.device)
    mask[margin:size - margin, margin:size - margin] = 1
    return mask


def _normalized_step(crops: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
    """x + step / mean|g| · g per sample; a zero gradient leaves the sample unchanged."""
    scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True)
    factor = torch.where(scale > 0, step / scale.clamp(min=1e-30), torch.zeros_like(scale))
    return crops + factor * grad


def paper_loop(objective: Objective, starts: Sequence[torch.Tensor | None], seeds: Sequence[int],
               octaves: Sequence[Octave], as_written: bool = False, progress: bool = False,
               desc: str = "render") -> Rendered:
    """The authors' engine on a batch. `starts[b]` is a (3, S, S) 0..255 image or None (noise)."""
    model = objective.model
    size = model.preprocess.input_size
    device = model.device
    rngs = [np.random.RandomState(seed) for seed in seeds]
    # The authors' script draws the noise image first, even when a start image replaces it.
    noise = [_noise(rng, size) for rng in rngs]
    canvas = torch.stack([
        (s.to(device, torch.float32) if s is not None else
         torch.from_numpy(n).to(device, torch.float32)) for s, n in zip(starts, noise, strict=True)
    ])
    trace: list[np.ndarray] = []
    total = sum(o.iters for o in octaves)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for octave in octaves:
        if octave.scale is not None and octave.scale != 1.0:
            side = round(canvas.shape[-1] * octave.scale)
            canvas = F.interpolate(canvas, size=(side, side), mode="bicubic", align_corners=False)
        slack = canvas.shape[-1] - size
        mask = _margin_mask(size, octave.margin, canvas)
        # The octave's crop corners drawn up front (the same draws in the same order as step
        # by step) and moved to the device at once: no host-to-device copy, so no wait, per step.
        corners = torch.tensor([[_offsets(rng, slack, octave.window) for rng in rngs]
                                for _ in range(octave.iters)], dtype=torch.long
                               ).view(octave.iters, len(rngs), 2).to(device)
        for i in range(octave.iters):
            window = _CropWindow(corners[i], size)
            crops = window.read(canvas).requires_grad_(True)
            value = objective(crops, octave.objective)
            (grad,) = torch.autograd.grad(value.sum(), crops)
            trace.append(value.detach().float())  # stays on the device: no wait per step
            if mask is not None:
                grad = grad * mask
            with torch.no_grad():
                crops = _normalized_step(crops.detach(), grad, octave.step_size(i, as_written))
                window.write(canvas, tv_bregman(crops.clamp_(0, 255), octave.tv(i, as_written)))
            bar.update()
    bar.close()
    return Rendered(canvas.clamp(0, 255), torch.stack(trace, dim=1).cpu().numpy())


class _CropWindow:
    """One size×size window per sample at its own offset, read and written with one indexing
    kernel each (not two per sample)."""

    def __init__(self, corner: torch.Tensor, size: int):
        """`corner`: (B, 2) long offsets (row, column) on the canvas's device."""
        device = corner.device
        span = torch.arange(size, device=device)
        self.index = (torch.arange(len(corner), device=device).view(-1, 1, 1), slice(None),
                      (corner[:, 0, None] + span).unsqueeze(2),
                      (corner[:, 1, None] + span).unsqueeze(1))

    def read(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas[self.index].permute(0, 3, 1, 2).contiguous()  # indexing puts C last

    def write(self, canvas: torch.Tensor, crops: torch.Tensor) -> None:
        canvas[self.index] = crops.permute(0, 2, 3, 1)


def _offsets(rng: np.random.RandomState, slack: int, window: float) -> tuple[int, int]:
    """Gaussian crop offsets around the centre, clipped and truncated as in the original."""
    if slack <= 0:
        return 0, 0
    mid, sd = slack / 2, slack * window
    ox = int(np.clip(rng.normal(mid, sd), 0, slack))
    oy = int(np.clip(rng.normal(mid, sd), 0, slack))
    return ox, oy

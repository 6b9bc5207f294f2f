"""Activation maximization, batched: every sample has its own objective, start and randomness.

Two optimizers share one objective:
- `paper_loop`: the authors' engine (paper-spec §2.3–2.5) — Gaussian-jittered crops of an upscaled
  canvas, gradient of the target, margin mask, normalized step `x += step / mean|g| · g`, clip to
  0..255, TV-Bregman denoising of the crop, write-back; octaves as data (`schedules.py`).
- `fourier_loop`: Lucid-style — a colour-decorrelated Fourier parameterization (which here can
  start from a given image), Adam, random pad/scale/rotate/jitter per sample.

Images live in the 0..255 RGB domain; the model's preprocessing runs inside the forward pass.
A sample's randomness comes only from its own seed, so a batch gives the images each sample
would get alone (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mfv.models import LoadedModel
from mfv.render.param import FourierImage
from mfv.render.schedules import Octave
from mfv.render.tv import tv_bregman
from mfv.targets import LayerRef, Target, TargetBank, capture

PAPER_NOISE = (175.0, 8.0)  # the authors' random start: grey 175 + N(0, 8²) per pixel
PAPER_REFERENCE_SIZE = 227  # margins in the schedules are given at CaffeNet's input size


class Objective:
    """Per-sample objectives: sample b maximizes `targets[assign[b]]`.

    `kind="prob"` uses the softmax probability of the target's class (the center-bias recipe's
    first octaves); targets that are not a single class logit keep their own value.
    """

    def __init__(self, model: LoadedModel, targets: Sequence[Target], assign: Sequence[int]):
        self.model = model
        self.bank = TargetBank(targets)
        self.assign = torch.as_tensor(list(assign), dtype=torch.long)
        classes = [targets[a].class_index for a in assign]
        self.class_of = torch.tensor([-1 if c is None else c for c in classes])
        self.logits = LayerRef(model.logits_layer) if model.logits_layer else None
        self.layers = list(dict.fromkeys([*self.bank.layers, *([self.logits] if
                                          self.logits else [])]))

    def __call__(self, images: torch.Tensor, kind: str = "target") -> torch.Tensor:
        """Objective value per sample for a (B, 3, S, S) batch in 0..255 (differentiable)."""
        with capture(self.model, self.layers) as store:
            self.model(images / 255.0)
            values = self.bank(store)
            rows = torch.arange(len(images), device=values.device)
            value = values[rows, self.assign.to(values.device)]
            if kind == "prob" and self.logits is not None:
                has_class = (self.class_of >= 0).to(values.device)
                probs = store[self.logits.key].softmax(-1)
                prob = probs[rows, self.class_of.clamp(min=0).to(values.device)]
                value = torch.where(has_class, prob, value)
        return value


@dataclass
class Rendered:
    """Final canvases (B, 3, H, W) in 0..255 and the objective traced at every step (B, steps)."""

    images: torch.Tensor
    trace: np.ndarray


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
               octaves: Sequence[Octave], quirks: bool = True, progress: bool = False,
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
        for i in range(octave.iters):
            window = _CropWindow([_offsets(rng, slack, octave.window) for rng in rngs], size,
                                 device)
            crops = window.read(canvas).requires_grad_(True)
            value = objective(crops, octave.objective)
            (grad,) = torch.autograd.grad(value.sum(), crops)
            trace.append(value.detach().float())  # stays on the device: no wait per step
            if mask is not None:
                grad = grad * mask
            with torch.no_grad():
                crops = _normalized_step(crops.detach(), grad, octave.step_size(i, quirks))
                window.write(canvas, tv_bregman(crops.clamp_(0, 255), octave.tv(i, quirks)))
            bar.update()
    bar.close()
    return Rendered(canvas.clamp(0, 255), torch.stack(trace, dim=1).cpu().numpy())


class _CropWindow:
    """One size×size window per sample at its own offset, read and written with one indexing
    kernel each (not two per sample)."""

    def __init__(self, offsets: Sequence[tuple[int, int]], size: int, device: torch.device):
        corner = torch.tensor(offsets, dtype=torch.long).view(-1, 2).to(device)
        span = torch.arange(size, device=device)
        self.index = (torch.arange(len(offsets), device=device).view(-1, 1, 1), slice(None),
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


@dataclass(frozen=True)
class FourierSettings:
    """Lucid's defaults: Adam 0.05, pad 12, jitter 8, scale ±5 %, rotate ±5°, jitter 4."""

    steps: int = 256
    lr: float = 0.05
    pad: int = 12
    jitter: int = 8
    scales: tuple[float, ...] = (1.0, 0.975, 1.025, 0.95, 1.05)
    degrees: float = 5.0
    decorrelate: bool = True


def _random_affine(gen: torch.Generator, s: FourierSettings, size: int) -> torch.Tensor:
    """A 2×3 affine (normalized coords) for one sample: scale, rotation, translation."""
    u = torch.rand(4, generator=gen).tolist()
    scale = s.scales[min(int(u[0] * len(s.scales)), len(s.scales) - 1)]
    angle = math.radians((2 * u[1] - 1) * s.degrees)
    shift = [(2 * v - 1) * (s.jitter + 4) * 2 / (size + 2 * s.pad) for v in u[2:]]
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]])


def fourier_loop(objective: Objective, starts: Sequence[torch.Tensor | None],
                 seeds: Sequence[int], settings: FourierSettings = FourierSettings(),
                 progress: bool = False, desc: str = "render") -> Rendered:
    """Adam on a Fourier parameterization that starts exactly at `starts` (noise where None)."""
    model = objective.model
    size = model.preprocess.input_size
    device = model.device
    init = torch.stack([
        (s.to(torch.float32) if s is not None else
         torch.from_numpy(paper_noise(seed, size)).float())
        for s, seed in zip(starts, seeds, strict=True)]).to(device)
    image = FourierImage(len(init), (size, size), init=init,
                         decorrelate=settings.decorrelate).to(device)
    optimizer = torch.optim.Adam(image.parameters(), lr=settings.lr)
    gens = [torch.Generator().manual_seed(int(seed) + 1) for seed in seeds]
    # Every step's transforms up front, moved to the device once (each sample's own stream).
    thetas = torch.stack([torch.stack([_random_affine(g, settings, size) for g in gens])
                          for _ in range(settings.steps)]).to(device) if settings.steps else None
    trace = []
    for step in tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress,
                     leave=False):
        pixels = image()
        theta = thetas[step].to(pixels.dtype)
        padded = F.pad(pixels, [settings.pad] * 4, mode="reflect")
        grid = F.affine_grid(theta, list(padded.shape), align_corners=False)
        moved = F.grid_sample(padded, grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False)
        crop = moved[..., settings.pad:settings.pad + size, settings.pad:settings.pad + size]
        value = objective(crop)
        optimizer.zero_grad(set_to_none=True)
        (-value.sum()).backward()
        optimizer.step()
        trace.append(value.detach().float())
    with torch.no_grad():
        final = image().clamp(0, 255)
    return Rendered(final, torch.stack(trace, dim=1).cpu().numpy())


def measure(objective: Objective, images: torch.Tensor) -> np.ndarray:
    """The objective on the central input-size crop of each canvas (what the optimizer saw)."""
    size = objective.model.preprocess.input_size
    top = (images.shape[-2] - size) // 2
    left = (images.shape[-1] - size) // 2
    crop = images[..., top:top + size, left:left + size].to(objective.model.device,
                                                            torch.float32)
    with torch.no_grad():
        return objective(crop).float().cpu().numpy()

"""Lucid-style optimizer, batched: a colour-decorrelated Fourier parameterization that starts
exactly at a given image (noise where none), Adam, random pad / scale / rotate / jitter per
sample (each sample's own random stream).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mfv.render.objective import Objective, Rendered
from mfv.render.paper import paper_noise
from mfv.render.param import FourierImage
from mfv.render.recipes import FourierSettings


def _random_affine(gen: torch.Generator, s: FourierSettings, size: int) -> torch.Tensor:
    """A 2×3 affine (normalized coords) for one sample: scale, rotation, translation."""
    u = torch.rand(4, generator=gen).tolist()
    scale = s.scales[min(int(u[0] * len(s.scales)), len(s.scales) - 1)]
    angle = math.radians((2 * u[1] - 1) * s.degrees)
    shift = [(2 * v - 1) * (s.jitter + 4) * 2 / (size + 2 * s.pad) for v in u[2:]]
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]])


def fourier_loop(objective: Objective, starts: Sequence[torch.Tensor | None],
                 seeds: Sequence[int], settings: FourierSettings | None = None,
                 progress: bool = False, desc: str = "render") -> Rendered:
    """Adam on a Fourier parameterization that starts exactly at `starts` (noise where None)."""
    settings = settings or FourierSettings()
    model = objective.model
    size = model.preprocess.input_size
    device = model.device
    init = torch.stack([
        (s.to(torch.float32) if s is not None else
         torch.from_numpy(paper_noise(seed, size)).float())
        for s, seed in zip(starts, seeds, strict=True)]).to(device)
    image = FourierImage(len(init), (size, size), init=init, decorrelate=settings.decorrelate,
                         exact=False).to(device)
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
        # The padded canvas's grid, sampled only where the crop keeps it.
        grid = F.affine_grid(theta, list(padded.shape), align_corners=False)
        inner = slice(settings.pad, settings.pad + size)
        crop = F.grid_sample(padded, grid[:, inner, inner], mode="bilinear",
                             padding_mode="reflection", align_corners=False)
        ascend, value = objective.maximize(crop)
        optimizer.zero_grad(set_to_none=True)
        (-ascend.sum()).backward()
        optimizer.step()
        trace.append(value.detach().float())
    with torch.no_grad():
        final = image().clamp(0, 255)
    return Rendered(final, torch.stack(trace, dim=1).cpu().numpy())

"""Lucid's optimizer, batched: a colour-decorrelated Fourier parameterization that starts exactly
at a given image (the authors' noise where none), Adam, random pad / scale / rotate / jitter per
sample (each sample's own random stream)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mfv.render.objective import Objective, Rendered
from mfv.render.param import FourierImage
from mfv.render.recipes import register
from mfv.render.recipes.base import Batch, Recipe, optimize
from mfv.render.recipes.paper import paper_noise

if TYPE_CHECKING:
    from mfv.render.options import RenderOptions

NAMES = ("fourier",)


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

    def with_steps(self, steps: int | None) -> FourierSettings:
        return self if steps is None else replace(self, steps=steps)


def _random_affine(gen: torch.Generator, s: FourierSettings, size: int) -> torch.Tensor:
    """A 2×3 affine (normalized coords) for one sample: scale, rotation, translation."""
    u = torch.rand(4, generator=gen).tolist()
    scale = s.scales[min(int(u[0] * len(s.scales)), len(s.scales) - 1)]
    angle = math.radians((2 * u[1] - 1) * s.degrees)
    shift = [(2 * v - 1) * (s.jitter + 4) * 2 / (size + 2 * s.pad) for v in u[2:]]
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[cos, -sin, shift[0]], [sin, cos, shift[1]]])


def _crop_grid(theta: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`F.affine_grid(theta, ...)` of the padded canvas at the crop's pixels only: (B, S, S, 2)
    for (B, 2, 3) affines and the crop's S pixel centres in the canvas's normalized coordinates
    (broadcast products: the same numbers, without the whole canvas's grid or a batched matrix
    product of inner dimension 3)."""
    x, y = centres.view(1, 1, -1), centres.view(1, -1, 1)
    t = theta.unsqueeze(-1).unsqueeze(-1)  # (B, 2, 3, 1, 1)
    gx = t[:, 0, 0] * x + t[:, 0, 1] * y + t[:, 0, 2]
    gy = t[:, 1, 0] * x + t[:, 1, 1] * y + t[:, 1, 2]
    return torch.stack([gx, gy], dim=-1)


def fourier_loop(objective: Objective, starts: Sequence[torch.Tensor | None],
                 seeds: Sequence[int], settings: FourierSettings | None = None,
                 progress: bool = False, desc: str = "render") -> Rendered:
    """Adam on a Fourier parameterization that starts exactly at `starts` (noise where None).
    The objective's `maximize` gives what is ascended and what is traced (`AnchoredObjective`
    ascends its anchor terms too)."""
    return run_fourier(Batch(objective, starts, seeds, progress=progress, desc=desc),
                    settings or FourierSettings())


def run_fourier(batch: Batch, settings: FourierSettings) -> Rendered:
    """`fourier_loop` on a `Batch` (what the recipes built on it call)."""
    size, device, objective = batch.size, batch.device, batch.objective
    init = torch.stack([
        (s.to(torch.float32) if s is not None else
         torch.from_numpy(paper_noise(seed, size)).float())
        for s, seed in zip(batch.starts, batch.seeds, strict=True)]).to(device)
    image = FourierImage(len(init), (size, size), init=init, decorrelate=settings.decorrelate,
                         exact=False).to(device)
    optimizer = torch.optim.Adam(image.parameters(), lr=settings.lr)
    gens = batch.generators(offset=1)
    # Every step's transforms up front, moved to the device once (each sample's own stream).
    thetas = torch.stack([torch.stack([_random_affine(g, settings, size) for g in gens])
                          for _ in range(settings.steps)]).to(device) if settings.steps else None
    # The padded canvas's pixel centres (align_corners=False) where the crop keeps them.
    padded_size = size + 2 * settings.pad
    centres = (torch.arange(settings.pad, settings.pad + size, device=device,
                            dtype=torch.float32) * 2 + 1) / padded_size - 1

    def step(i: int) -> torch.Tensor:
        pixels = image()
        padded = F.pad(pixels, [settings.pad] * 4, mode="reflect")
        grid = _crop_grid(thetas[i].to(pixels.dtype), centres.to(pixels.dtype))
        crop = F.grid_sample(padded, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)
        ascend, value = objective.maximize(crop, step=i)
        optimizer.zero_grad(set_to_none=True)
        (-ascend.sum()).backward()
        optimizer.step()
        return value

    trace = optimize(batch, settings.steps, step)
    with torch.no_grad():
        return Rendered(image().clamp(0, 255), trace)


class Fourier(Recipe):
    """Lucid's recipe: `FourierSettings`, `RenderOptions.steps` of them."""

    name = "fourier"

    def render(self, batch: Batch, options: RenderOptions) -> Rendered:
        return run_fourier(batch, FourierSettings().with_steps(options.steps))


register(Fourier())

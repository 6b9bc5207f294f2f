"""What a recipe needs besides its jobs: `RenderOptions` (the render stage's options object)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mfv.models.passes import Forward, default_channels_last
from mfv.render.anchor import AnchorSettings


@dataclass(frozen=True)
class RenderOptions:
    """What a recipe needs besides its jobs (each recipe reads the fields it uses)."""

    steps: int | None = None  # rescale the recipe's iterations (None: its own)
    as_written: bool = False  # the paper's schedules as written, not as the authors' code ran
    code_layer: str = "penultimate"  # where an anchored recipe pulls toward the facet
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    maco_crops: int | None = None  # crops per step of recipes that sample crops (None: theirs)
    amplitude: np.ndarray | None = None  # the scanned images' amplitude spectrum
    precision: str = "float32"  # the model's pass: "float32", or "bfloat16" (autocast; GPUs)
    channels_last: bool | None = None  # the pass's memory layout (None: `default_channels_last`)

    def __post_init__(self) -> None:
        Forward(self.precision)  # checks it

    def forward(self, device: torch.device) -> Forward:
        """How the model's pass runs on `device` (batch norms as affine maps: always)."""
        layout = default_channels_last(device) if self.channels_last is None \
            else self.channels_last
        return Forward(self.precision, layout, affine_batchnorm=True)

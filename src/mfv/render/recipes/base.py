"""What a recipe is, and the loop skeleton every recipe's loop is built on.

A `Recipe` owns its name, its settings (read from `RenderOptions`), what goes into a picture's
key besides the common parts (`key_material`), what it needs from earlier stages (its facet as an
anchor, the scanned images' amplitude spectrum), the view it is measured on, and its loop
(`render`). A loop gets a `Batch` (objective, starts, seeds, anchors) and runs its steps through
`optimize`, which owns the progress bar and the per-step trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mfv.core.errors import MfvError
from mfv.render.anchor import Anchor
from mfv.render.objective import Objective, Rendered

if TYPE_CHECKING:
    from mfv.render.options import RenderOptions
    from mfv.render.plan import RenderSettings


@dataclass(frozen=True)
class Batch:
    """What a loop renders: sample b maximizes its own target (`objective`), from `starts[b]`
    ((3, S, S) in 0..255 at the model's input size; None: the recipe's random start), with its
    own randomness (`seeds[b]`) and, for recipes that keep to a facet, `anchors[b]`."""

    objective: Objective
    starts: Sequence[torch.Tensor | None]
    seeds: Sequence[int]
    anchors: Sequence[Anchor | None] = ()
    progress: bool = False
    desc: str = "render"

    def __post_init__(self) -> None:
        if len(self.starts) != len(self.seeds) or len(self.anchors) not in (0, len(self.seeds)):
            raise MfvError(f"got {len(self.starts)} starts and {len(self.anchors)} anchors for "
                           f"{len(self.seeds)} seeds")

    @property
    def size(self) -> int:
        return self.objective.model.preprocess.input_size

    @property
    def device(self) -> torch.device:
        return self.objective.model.device

    def generators(self, offset: int = 0) -> list[torch.Generator]:
        """One CPU generator per sample, seeded by its seed (+ `offset`): a sample gets what it
        would get alone, whatever the batch."""
        return [torch.Generator().manual_seed(int(seed) + offset) for seed in self.seeds]


def optimize(batch: Batch, steps: int, step: Callable[[int], torch.Tensor]) -> np.ndarray:
    """Run `step(i)` for i < steps under one progress bar; each returns the samples' objective
    (B,), kept on the device until the end (no wait per step). Returns the trace (B, steps)."""
    trace = []
    bar = tqdm(total=steps, desc=batch.desc, unit="step", disable=not batch.progress,
               leave=False)
    for i in range(steps):
        trace.append(step(i).detach().float())
        bar.update()
    bar.close()
    if not trace:
        return np.zeros((len(batch.seeds), 0), np.float32)
    return torch.stack(trace, dim=1).cpu().numpy()


class Recipe:
    """One way to render pictures (module doc). Subclasses set `name` and write `render`."""

    name: str = ""
    needs_anchor: bool = False  # keeps to its facet: `Batch.anchors` (None for random starts)
    needs_spectrum: bool = False  # the scanned images' amplitude (`RenderOptions.amplitude`)
    whole_canvas: bool = False  # measured on the whole canvas resized (else its central crop)

    def key_material(self, settings: RenderSettings) -> dict[str, Any]:
        """What decides this recipe's pictures besides the target, start, seed, steps, size
        and model (`mfv.render.plan`); a recipe that keeps to a facet also gets its facet."""
        return {}

    def probe_options(self, options: RenderOptions, batch: int) -> RenderOptions:
        """The shortest run that reaches the recipe's peak memory (the batch-size probe)."""
        return replace(options, steps=2)

    def render(self, batch: Batch, options: RenderOptions) -> Rendered:
        """The recipe's loop on one batch: final canvases in 0..255 and the trace."""
        raise NotImplementedError

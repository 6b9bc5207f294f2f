"""The Python API: `mfv.visualize` renders a target's pictures from a model in memory.

    import mfv
    result = mfv.visualize("efficientnet_lite0", "_fc:1", steps=64)
    result.images[0].save("tench.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mfv.core.errors import MfvError
from mfv.data.images import load_rgb
from mfv.data.preprocess import Preprocess
from mfv.data.spectrum import AmplitudeSpectrum
from mfv.models import LoadedModel, load_model
from mfv.models.targets import parse_target
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.objective import function_target
from mfv.render.recipes import DEFAULT, get
from mfv.results.display import pictures_html
from mfv.runtime.rundir import RunDir
from mfv.runtime.tasks import pixels


@dataclass
class Visualization:
    """What `visualize` made: one picture per start, each with its trace (the target at every
    step) and final activation (the target on the picture, as the recipe measures it)."""

    arrays: list[np.ndarray]  # (H, W, 3) uint8
    traces: list[np.ndarray]
    activations: list[float]
    target: str
    recipe: str
    alphas: list[np.ndarray | None] = field(default_factory=list)  # transparency, if any

    @property
    def images(self) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.arrays]

    def to_arrays(self) -> list[np.ndarray]:
        return [a.copy() for a in self.arrays]

    def _repr_html_(self) -> str:
        """In a notebook: the pictures in a small grid, each with its activation and where
        its trace started."""
        captions = [f"#{i} activation {a:.4g}" + (f" (from {t[0]:.3g})" if len(t) else "")
                    for i, (a, t) in enumerate(zip(self.activations, self.traces, strict=True))]
        return pictures_html(self.arrays, captions, f"{self.target} · {self.recipe}")


def visualize(model: str | nn.Module | LoadedModel, target: str | Callable, *,
              recipe: str = DEFAULT, start: Any = None, steps: int | None = None,
              size: int | None = None, seed: int = 0, device: str = "auto") -> Visualization:
    """Render `target` of `model` with `recipe`, one picture per start.

    - `model`: a name as `--model` takes it, an `nn.Module` (read with ImageNet's mean and std
      at 224 px), or `mfv.load_model(module, preprocess=...)`'s result for another input;
      `size` changes its input size.
    - `target`: a target string (`"_fc:1"`, `"_blocks.10:37"`, `"_fc:1 + _fc:2"`, a class
      name), or a function `objective(acts)` returning one value per sample, shape (B,), where
      `acts[name]` is a layer's output for the batch (a module path as `mfv layers` lists it, or
      `"penultimate"` / `"logits"`), e.g. `lambda acts: acts["_blocks.10"][:, 37].mean((1, 2))`.
    - `start`: None (the recipe's random start), an image (a path, PIL image, (H, W, 3) array
      or (3, H, W) tensor in 0..255), a run's facet `(run_dir, target spec or slug, rank)`, or
      a list of these (one picture each). A facet also anchors recipes that keep to one (the
      default, anchored); without a facet they run as the render stage runs random starts: the
      Fourier loop without the pull.
    - `steps`: the recipe's iterations rescaled (None: its own); `seed` each picture's seed
      (`seed + i`). Recipes that need an amplitude spectrum use scikit-image's sample photos'.
    """
    loaded = load_model(model, device=device)
    if size is not None:  # a copy: the caller's model keeps its size
        loaded = replace(loaded, preprocess=loaded.preprocess.resized(size))
    chosen = get(recipe)
    aim = parse_target(target, loaded) if isinstance(target, str) else \
        function_target(loaded, target)
    starts = start if isinstance(start, list) else [start]
    code_layer, jobs = "penultimate", []
    for i, item in enumerate(starts):
        anchor = None
        if isinstance(item, tuple):
            item, anchor, code_layer = _facet(loaded, *item)
        jobs.append(Job(0, None if item is None else _picture(item, loaded.preprocess),
                        seed + i, anchor if chosen.needs_anchor else None))
    spectrum = _photo_spectrum(loaded.preprocess) if chosen.needs_spectrum else None
    options = RenderOptions(steps=steps, code_layer=code_layer, amplitude=spectrum)
    results = render_batches(loaded, [aim], jobs, recipe, options, progress=False)
    return Visualization([r.image for r in results], [r.trace for r in results],
                         [r.activation for r in results], aim.spec, recipe,
                         [r.alpha for r in results])


def _picture(image: Any, preprocess: Preprocess) -> torch.Tensor:
    """A start image as (3, S, S) float32 in 0..255 at the model's input size (resized and
    cropped as the model's own transform does, unless it already has that size)."""
    size = preprocess.input_size
    if isinstance(image, (str, os.PathLike)):
        image = load_rgb(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    if not isinstance(image, np.ndarray):
        raise MfvError(f"start: cannot read {type(image).__name__} as an image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise MfvError(f"a start image must be (H, W, 3) (a tensor (3, H, W)), got {image.shape}")
    pixels = np.clip(image, 0, 255).astype(np.float32)
    if image.shape[:2] != (size, size):
        pixels = np.round(preprocess.to_array(Image.fromarray(pixels.round().astype(np.uint8)))
                          * 255).transpose(1, 2, 0)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _facet(model: LoadedModel, run: str | os.PathLike, target: str, rank: int
           ) -> tuple[np.ndarray, Anchor, str]:
    """A finished run's facet: its mean image, its anchor, and the run's code layer."""
    store = RunDir(run)
    results, settings = store.read_record("results"), store.read_record("settings") or {}
    entries = (results or {}).get("targets", [])
    entry = next((t for t in entries if target in (t.get("spec"), t.get("slug"))), None)
    if entry is None or not 0 <= rank < len(entry.get("facets", [])):
        known = ", ".join(repr(t.get("spec")) for t in entries) or "none"
        raise MfvError(f"{run}: no facet {rank} of target {target!r} (targets: {known})")
    folder = store.root / Path(entry["facets"][rank]["mean_image"]).parent
    doc = json.loads((folder / "facets.json").read_text()) if folder.is_dir() else {}
    stored = store.target(entry["slug"]).load_facets(doc.get("key", ""))
    if stored is None:
        raise MfvError(f"{run}: the facets of {target!r} are missing; run `mfv run` again")
    facet, mean = stored[0].facets[rank], stored[1][rank]
    if mean.shape[0] != model.preprocess.input_size:
        raise MfvError(f"{run} was rendered at {mean.shape[0]} px; pass size={mean.shape[0]}")
    paths = entry["facets"][rank]["representatives"]
    photos = pixels(model, settings.get("mean_resize", "crop"), paths, range(len(paths)))
    anchor = Anchor(facet.code_centre, facet.code_spread, facet.activation_max,
                    photos.transpose(0, 3, 1, 2).astype(np.float32))
    return mean, anchor, settings.get("code_layer", "penultimate")


def _photo_spectrum(preprocess: Preprocess) -> np.ndarray:
    """The amplitude spectrum of scikit-image's sample photos at the model's input size."""
    from skimage import data

    spectrum = AmplitudeSpectrum()
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    spectrum.update(torch.stack([torch.from_numpy(preprocess.to_array(Image.fromarray(p)))
                                 for p in photos]))
    return spectrum.result().numpy()

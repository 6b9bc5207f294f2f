"""The render stage's plan: every visualization a run asks for, each with the key of what
determines it, so a rerun renders exactly what its settings would produce differently.

A run renders, per target and recipe, one picture per facet (started from the facet's mean
image) and, as the pre-MFV baseline, as many pictures from the recipe's random start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mfv.core.keys import digest
from mfv.render.anchor import AnchorSettings
from mfv.render.recipes import get

# Raised whenever the engine's output for the same settings changes, so older pictures are
# redone (2: the recorded activation is the saved 8-bit picture's; 3: Fourier's crop grid is
# computed directly, equal to 2e-7, and the anchored recipe can match large layers on a moving
# grid of positions, `AnchorSettings.match_positions`; 4: that grid is the default, its offset
# the optimization step).
ENGINE = 4


@dataclass(frozen=True)
class Visual:
    """One visualization to have: which target (index), which facet or random start, recipe."""

    target: int
    kind: str
    rank: int
    recipe: str
    seed: int
    key: str
    start: np.ndarray | None = None  # (S, S, 3) float32 in 0..255: the facet's mean image
    view: int | None = None  # patch facets: the side the unit reads the picture at

    @property
    def slot(self) -> tuple[str, int, str]:
        return self.kind, self.rank, self.recipe


@dataclass(frozen=True)
class RenderSettings:
    """What, besides the target and start, decides a picture."""

    recipes: tuple[str, ...]
    baseline: bool
    steps: int | None
    as_written: bool
    seed: int
    size: int  # the model's input size
    model: str  # the model's fingerprint
    code_layer: str = "penultimate"
    anchor: AnchorSettings = AnchorSettings()
    maco_crops: int | None = None  # crops per step of recipes that sample crops
    spectrum: str | None = None  # digest of the scanned images' amplitude spectrum
    batch: int | None = None  # the render batch size: a kernel's sums, so a picture, depend on it


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from the run seed and what is being made."""
    raw = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(raw[:4], "big") & 0x7FFFFFFF


def plan(targets: Sequence[dict], slugs: Sequence[str], means: Sequence[Sequence[np.ndarray]],
         facet_keys: Sequence[str], settings: RenderSettings,
         views: Sequence[int | None] | None = None) -> list[Visual]:
    """Every visualization of every target: `targets[i]` is target i's definition
    (`Target.to_dict()`), `means[i]` its facets' mean images by rank, `facet_keys[i]` the key
    of its clustering (which fixes each facet's anchor: centre, spread, photos), `views[i]` the
    side its unit reads pictures at (patch facets) or None."""
    out = []
    recipes = {name: get(name) for name in settings.recipes}
    views = list(views) if views is not None else [None] * len(targets)
    for t, (definition, slug_name, facet_means, facets_key, view) in enumerate(
            zip(targets, slugs, means, facet_keys, views, strict=True)):
        for name, recipe in recipes.items():
            starts: list[tuple[str, int, np.ndarray | None]] = [
                ("facet", rank, mean) for rank, mean in enumerate(facet_means)]
            if settings.baseline:
                starts += [("random", rank, None) for rank in range(len(facet_means))]
            for kind, rank, start in starts:
                seed = derived_seed(settings.seed, slug_name, kind, rank, name)
                material = {"engine": ENGINE, "recipe": name, "steps": settings.steps,
                            "as_written": settings.as_written, "seed": seed,
                            "size": settings.size, "model": settings.model,
                            "target": definition, "kind": kind, "rank": rank,
                            **recipe.key_material(settings)}
                if recipe.needs_anchor:
                    material["facet"] = facets_key if kind == "facet" else None
                if settings.batch is not None:
                    material["batch"] = settings.batch
                if view is not None:
                    material["view"] = view
                key = digest(material, start if start is not None else "noise")
                out.append(Visual(t, kind, rank, name, seed, key, start, view))
    return out

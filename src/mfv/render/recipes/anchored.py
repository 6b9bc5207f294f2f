"""The anchored recipe: Lucid's Fourier optimizer from the facet's mean image, with the target's
objective anchored to the facet (`mfv.render.anchor`: a pull of the code toward the facet's
centre and sort-matching of intermediate activations to the facet's photos). Samples without a
facet (random starts) maximize the target alone: the Fourier recipe without the pull."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mfv.models.targets import resolve_layer
from mfv.render.anchor import AnchoredObjective, default_match_layers
from mfv.render.objective import Rendered
from mfv.render.recipes import register
from mfv.render.recipes.base import Batch, Recipe
from mfv.render.recipes.fourier import FourierSettings, run_fourier

if TYPE_CHECKING:
    from mfv.render.options import RenderOptions
    from mfv.render.plan import RenderSettings

NAMES = ("anchored",)


class Anchored(Recipe):
    """`RenderOptions.anchor` weighs the anchor's terms at `RenderOptions.code_layer` (the space
    the facets were found in); `FourierSettings` with `RenderOptions.steps` drive the optimizer."""

    name = "anchored"
    needs_anchor = True

    def key_material(self, settings: RenderSettings) -> dict[str, Any]:
        return {"code_layer": settings.code_layer, "anchor": settings.anchor.__dict__}

    def render(self, batch: Batch, options: RenderOptions) -> Rendered:
        model = batch.objective.model
        match = options.anchor.match_layers or default_match_layers(model)
        objective = AnchoredObjective(
            batch.objective, batch.anchors or [None] * len(batch.seeds),
            resolve_layer(model, options.code_layer), options.anchor,
            [resolve_layer(model, path) for path in match])
        return run_fourier(replace(batch, objective=objective),
                           FourierSettings().with_steps(options.steps))


register(Anchored())

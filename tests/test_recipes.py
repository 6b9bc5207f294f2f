"""Recipes as plug-ins: the registry (torch-free names, lazy modules), every registered recipe
raises its objective through the batch driver, what each adds to a picture's key, and a new
recipe defined in this file that runs through `render_batches` and `mfv.visualize` alone."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import mfv
import mfv.render.recipes as recipes
from conftest import TinyNet
from mfv.core.errors import MfvError
from mfv.data.preprocess import Preprocess
from mfv.models.targets import parse_targets
from mfv.render.anchor import Anchor, AnchorSettings
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.objective import Objective, Rendered, measure
from mfv.render.plan import RenderSettings, plan
from mfv.render.recipes.base import Batch, Recipe, optimize

BUILT_IN = ("anchored", "fourier", "maco", "paper-mean", "paper-center")


def test_names_come_without_torch_and_recipes_load_on_first_use():
    code = ("import sys, mfv.render.recipes as r; names = r.names(); "
            "assert 'torch' not in sys.modules; print(','.join(names), r.DEFAULT)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert set(out[0].split(",")) == set(BUILT_IN) and out[1] == "anchored"
    assert recipes.get("paper-center").name == "paper-center"
    with pytest.raises(MfvError, match=r"unknown recipe 'nope'; choose one of .*fourier"):
        recipes.get("nope")


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_raises_its_objective(tiny, name):
    """Two targets in one batch, one from a grey start (with a loose facet, for recipes that
    keep to one) and one from the recipe's random start: both end above where they began."""
    targets = parse_targets(["fc:1", "conv2:3"], tiny, reduction="mean")
    grey = torch.full((3, 32, 32), 120.0)
    jobs = [Job(0, grey, 3, Anchor(np.zeros(16, np.float32), 1e6, 1.0)), Job(1, None, 4)]
    options = RenderOptions(steps=40, amplitude=np.ones((3, 32, 17), np.float32), maco_crops=4)
    results = render_batches(tiny, targets, jobs, name, options, progress=False)
    recipe = recipes.get(name)
    for result in results:
        assert result.image.dtype == np.uint8 and result.image.shape[2] == 3
        assert len(result.trace) >= 40 and result.trace.max() > result.trace[0]  # it climbed
    before = measure(Objective(tiny, targets, [0]), grey[None], whole=recipe.whole_canvas)[0]
    assert results[0].activation > before


def test_key_material_belongs_to_its_recipe():
    """A recipe's own settings change its pictures' keys and no other recipe's; a facet's
    clustering changes only the keys of recipes that keep to it."""
    base = RenderSettings(tuple(BUILT_IN), True, 20, False, 0, 32, "fp")
    means = [[np.zeros((32, 32, 3), np.float32)]]

    def keys(settings, facets_key="f1"):
        return {(v.recipe, v.kind): v.key for v in plan([{"spec": "x"}], ["x"], means,
                                                        [facets_key], settings)}

    reference = keys(base)
    for changed, owner in ((replace(base, maco_crops=4), {"maco"}),
                           (replace(base, spectrum="other"), {"maco"}),
                           (replace(base, anchor=AnchorSettings(code_weight=2.0)), {"anchored"}),
                           (replace(base, code_layer="conv2"), {"anchored"})):
        now = keys(changed)
        assert {r for (r, _), k in now.items() if k != reference[r, _]} == owner
    moved = keys(base, "f2")
    assert {slot for slot, k in moved.items() if k != reference[slot]} == {("anchored", "facet")}
    # the render batch size changes every picture's sums, so every key
    batched = keys(replace(base, batch=4))
    assert all(batched[slot] != reference[slot] for slot in reference)
    assert keys(replace(base, batch=4)) == batched


class PixelAscent(Recipe):
    """A whole recipe in a few lines: signed-gradient ascent on the pixels from the start (or
    seeded uniform noise), 20 steps unless told otherwise."""

    name = "pixel-ascent"

    def render(self, batch: Batch, options: RenderOptions) -> Rendered:
        gens = batch.generators()
        x = torch.stack([s if s is not None else torch.rand(3, batch.size, batch.size,
                                                            generator=g) * 255
                         for s, g in zip(batch.starts, gens, strict=True)]).to(batch.device)

        def step(_: int) -> torch.Tensor:
            pixels = x.clone().requires_grad_(True)
            value = batch.objective(pixels)
            (grad,) = torch.autograd.grad(value.sum(), pixels)
            x.add_(2.0 * grad.sign()).clamp_(0, 255)
            return value

        trace = optimize(batch, options.steps or 20, step)
        return Rendered(x, trace)


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setattr(recipes, "_REGISTRY", dict(recipes._REGISTRY))  # undone after the test
    return recipes.register(PixelAscent())


def test_a_new_recipe_is_one_class_and_runs_everywhere(tiny, registered):
    assert "pixel-ascent" in recipes.names() and recipes.get("pixel-ascent") is registered
    targets = parse_targets(["fc:2"], tiny)
    jobs = [Job(0, None, 1), Job(0, torch.full((3, 32, 32), 90.0), 2)]
    results = render_batches(tiny, targets, jobs, "pixel-ascent", RenderOptions(steps=15),
                             progress=False)
    for r in results:
        assert r.trace.shape == (15,) and r.trace[-1] > r.trace[0]
    again = render_batches(tiny, targets, jobs[:1], "pixel-ascent", RenderOptions(steps=15),
                           progress=False)
    np.testing.assert_array_equal(again[0].image, results[0].image)  # its seed, alone or not
    model = mfv.load_model(TinyNet(), preprocess=Preprocess(32, 36, mean=(0.5,) * 3,
                                                             std=(0.5,) * 3))
    shown = mfv.visualize(model, "fc:2", recipe="pixel-ascent", steps=12, device="cpu")
    assert shown.recipe == "pixel-ascent" and shown.traces[0].shape == (12,)
    assert shown.activations[0] > shown.traces[0][0]

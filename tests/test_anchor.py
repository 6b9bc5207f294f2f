"""The anchored recipe: its objective's terms, and that the anchor keeps a picture near its facet
(on the tiny network, in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfv.models.activations import capture
from mfv.models.targets import parse_targets, resolve_layer
from mfv.render.anchor import (
    Anchor,
    AnchoredObjective,
    AnchorSettings,
    default_match_layers,
    quantile_match,
)
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.objective import Objective


def _code(model, images: torch.Tensor) -> torch.Tensor:
    ref = resolve_layer(model, "penultimate")
    with capture(model, [ref]) as store, torch.no_grad():
        model(images / 255.0)
    return store[ref.key]


def test_the_objective_is_target_over_scale_minus_the_weighted_pull(tiny):
    targets = parse_targets(["fc:1"], tiny)
    x = torch.rand(3, 3, 32, 32) * 255
    code = _code(tiny, x)
    centre = code[0].numpy() + 0.5
    anchors = [Anchor(centre, spread=2.0, scale=4.0), None, Anchor(centre, 2.0, 4.0)]
    base = Objective(tiny, targets, [0, 0, 0])
    objective = AnchoredObjective(base, anchors, resolve_layer(tiny, "penultimate"),
                                  AnchorSettings(code_weight=3.0))
    ascend, target = objective.maximize(x)
    expected_target = base(x)
    torch.testing.assert_close(target, expected_target)
    pull = ((code - torch.as_tensor(centre)) ** 2).sum(1) / 2.0
    expected = expected_target / 4.0 - 3.0 * pull
    torch.testing.assert_close(ascend[[0, 2]], expected[[0, 2]])
    torch.testing.assert_close(ascend[1], expected_target[1])  # no anchor: the target alone


def test_sort_matching_is_zero_for_the_reference_itself(tiny):
    """A picture whose activations are distributed exactly like its facet's photos pays no
    matching term; another picture does."""
    targets = parse_targets(["fc:1"], tiny)
    photo = torch.rand(1, 3, 32, 32) * 255
    code = _code(tiny, photo)[0].numpy()
    anchor = Anchor(code, 1.0, 1.0, references=photo.numpy())
    settings = AnchorSettings(code_weight=0.0, match_weight=1.0)
    match = [resolve_layer(tiny, p) for p in ("conv1", "conv2")]
    objective = AnchoredObjective(Objective(tiny, targets, [0, 0]), [anchor, anchor],
                                  resolve_layer(tiny, "penultimate"), settings, match)
    other = torch.rand(1, 3, 32, 32) * 255
    ascend, target = objective.maximize(torch.cat([photo, other]))
    assert ascend[0].item() == pytest.approx(target[0].item(), abs=1e-4)
    assert ascend[1].item() < target[1].item() - 1e-3


def test_the_anchor_keeps_the_picture_near_its_facet(tiny):
    """From the same start, the anchored recipe ends nearer the facet's centre than the plain
    Fourier recipe, and still raises the target."""
    targets = parse_targets(["fc:2"], tiny)
    start = torch.full((3, 32, 32), 128.0) + torch.randn(3, 32, 32) * 20
    centre = _code(tiny, start[None])[0].numpy()
    anchor = Anchor(centre, spread=0.05, scale=1.0)
    options = RenderOptions(steps=40, anchor=AnchorSettings(code_weight=1.0, match_weight=0.0))
    anchored = render_batches(tiny, targets, [Job(0, start, 3, anchor)], "anchored", options,
                              progress=False)[0]
    plain = render_batches(tiny, targets, [Job(0, start, 3)], "fourier", options,
                           progress=False)[0]

    def distance(result) -> float:
        image = torch.from_numpy(result.image).permute(2, 0, 1).float()[None]
        return float(np.linalg.norm(_code(tiny, image)[0].numpy() - centre))

    assert distance(anchored) < 0.5 * distance(plain)
    before = Objective(tiny, targets, [0])(start[None]).item()
    assert anchored.activation > before


@pytest.mark.slow
def test_match_layers_default_to_three_along_the_depth(lite0):
    assert default_match_layers(lite0) == ("_blocks.2", "_blocks.7", "_blocks.13")


@pytest.mark.parametrize("shape", [(3, 5, 40), (1, 24, 3136), (2, 1, 1)])
def test_quantile_match_equals_differentiating_through_sort(shape):
    """The fused term's value and gradient are autograd's through `torch.sort`. Tied values
    (a ReLU's zeros) may take their ranks in any order, there as here: the value and every
    untied value's gradient agree, and so does each tied group's total gradient."""
    gen = torch.Generator().manual_seed(sum(shape))
    values = torch.randn(shape, generator=gen)
    tied = torch.zeros(shape, dtype=torch.bool)
    tied[..., : shape[-1] // 4] = True
    values[tied] = 0.0
    quantiles = torch.randn(shape, generator=gen).sort(dim=2).values
    var = torch.rand(shape[0], shape[1], 1, generator=gen) + 0.5
    weights = torch.rand(shape[0], generator=gen)
    results = []
    for fn in (quantile_match, _through_sort):
        x = values.clone().requires_grad_(True)
        value = fn(x, quantiles, var)
        (value * weights).sum().backward()
        results.append((value.detach(), x.grad))
    (fused, fused_grad), (plain, plain_grad) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad[~tied], plain_grad[~tied], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((fused_grad * tied).sum(2), (plain_grad * tied).sum(2),
                               rtol=1e-5, atol=1e-6)


def _through_sort(values, quantiles, var):
    return (((values.sort(dim=2).values - quantiles) ** 2) / var).mean(dim=(1, 2))

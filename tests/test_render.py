"""Render: the paper's schedules as data, the engine's step rule, recipes, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfv.core.errors import MfvError
from mfv.models.targets import parse_targets
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.objective import Objective, measure
from mfv.render.recipes import names
from mfv.render.recipes.paper import (
    PAPER_CENTER,
    PAPER_MEAN,
    _normalized_step,
    paper_noise,
    schedule,
)


def canvas_sizes(octaves, size: int) -> list[int]:
    """Canvas size during each octave: 227 → 272 → 326 for CaffeNet."""
    sizes = []
    for octave in octaves:
        if octave.scale is not None:
            size = round(size * octave.scale)
        sizes.append(size)
    return sizes


def _ramp(octave, as_written=False):
    n = octave.iters
    return ([octave.step_size(i, as_written) for i in (0, n - 1)],
            [round(octave.tv(i, as_written), 4) for i in (0, n - 1)])


def test_paper_mean_schedule_matches_spec_table():
    # paper-spec §2.6 A: iters, effective step, effective TV ramp, crop window, margin, size
    assert [o.iters for o in PAPER_MEAN] == [190, 150, 20, 10]
    assert sum(o.iters for o in PAPER_MEAN) == 370
    assert canvas_sizes(PAPER_MEAN, 227) == [227, 272, 272, 272]
    assert [o.window for o in PAPER_MEAN] == [0.3, 0.3, 0.2, 0.3]
    assert [o.margin for o in PAPER_MEAN] == [0, 0, 50, 0]
    expected = [([1, 1], [0.3979, 0.7958]), ([1, 1], [0.0099, 1.9966]),
                ([2, 2], [0.095, 1.995]), ([2, 2], [0.36, 2.16])]
    assert [_ramp(o) for o in PAPER_MEAN] == expected
    # as written, octave 1 ramps 1 → 2 and the TV weight goes from start to end
    assert PAPER_MEAN[0].step_size(189, as_written=True) == pytest.approx(1 + 189 / 190)
    assert PAPER_MEAN[1].tv(0, as_written=True) == pytest.approx(0.01)
    assert PAPER_MEAN[1].tv(150, as_written=True) == pytest.approx(2.0)


def test_paper_center_schedule_matches_spec_table():
    assert [o.iters for o in PAPER_CENTER] == [190, 150, 150, 30, 10]
    assert canvas_sizes(PAPER_CENTER, 227) == [227, 272, 326, 326, 326]
    assert [o.objective for o in PAPER_CENTER] == ["prob", "prob", "target", "target", "target"]
    assert [o.window for o in PAPER_CENTER] == [0.3, 0.3, 0.3, 0.1, 0.3]
    assert [o.margin for o in PAPER_CENTER] == [0, 0, 0, 50, 0]
    steps = [[round(s, 4) for s in _ramp(o)[0]] for o in PAPER_CENTER]
    assert steps == [[11, 11], [6, 6], [1, 1], [3, 3], [6, 3.3]]
    tvs = [_ramp(o)[1] for o in PAPER_CENTER]
    assert tvs == [[0.001, 0.0507], [0.0099, 0.0894], [0.0099, 1.9966], [0.0967, 2.03],
                   [0.009, 1.809]]
    # crop sd in pixels: window × slack
    sizes = canvas_sizes(PAPER_CENTER, 227)
    assert [round(o.window * (s - 227), 1) for o, s in zip(PAPER_CENTER, sizes, strict=True)] \
        == [0.0, 13.5, 29.7, 9.9, 29.7]


def test_schedule_rescaling_and_errors():
    short = schedule("paper-mean", steps=37)
    assert [o.iters for o in short] == [19, 15, 2, 2]
    with pytest.raises(MfvError, match="unknown schedule"):
        schedule("paper-best")
    with pytest.raises(MfvError, match="at least 8 steps"):
        schedule("paper-mean", steps=5)


def test_normalized_step_and_zero_gradient_guard():
    x = torch.zeros(2, 3, 4, 4)
    g = torch.randn(2, 3, 4, 4)
    g[1] = 0
    out = _normalized_step(x, g, 2.0)
    assert out[0].abs().mean().item() == pytest.approx(2.0, rel=1e-5)  # mean |Δx| = step
    assert torch.equal(out[1], x[1])


def test_paper_noise_is_the_authors_start():
    rng = np.random.RandomState(1)
    expected = rng.normal([175.0] * 3, 8, (227, 227, 3)).transpose(2, 0, 1)
    np.testing.assert_array_equal(paper_noise(1, 227), expected)


@pytest.mark.parametrize("recipe", ["paper-mean", "paper-center", "fourier"])
def test_each_recipe_increases_the_objective(tiny, recipe):
    targets = parse_targets(["fc:1", "conv2:3"], tiny, reduction="mean")
    grey = torch.full((3, 32, 32), 120.0)
    jobs = [Job(0, None, seed=3), Job(1, grey, seed=4)]
    results = render_batches(tiny, targets, jobs, recipe, RenderOptions(steps=60), progress=False)
    before = measure(Objective(tiny, targets, [0, 1]),
                     torch.stack([torch.from_numpy(paper_noise(3, 32)).float(), grey]))
    after = np.array([r.activation for r in results])
    assert np.all(after > before), (before, after)
    for r in results:
        assert r.image.dtype == np.uint8 and r.image.shape[2] == 3
        assert len(r.trace) == (60 if recipe == "fourier" else sum(
            o.iters for o in schedule(recipe, 60)))
    expected_side = {"paper-mean": 38, "paper-center": 46, "fourier": 32}[recipe]
    assert results[0].image.shape[:2] == (expected_side, expected_side)


@pytest.mark.parametrize("recipe", names())
def test_batched_equals_one_by_one(tiny, recipe):
    """Every recipe: a sample's randomness is its own seed's, so a batch gives each sample what
    it would get alone (up to float rounding)."""
    targets = parse_targets(["fc:0", "fc:2", "conv2:1"], tiny)
    start = torch.rand(3, 32, 32) * 255
    anchor = Anchor(np.zeros(16, np.float32), 10.0, 1.0, np.full((2, 3, 32, 32), 90, np.float32))
    jobs = [Job(0, start, 1, anchor), Job(1, None, 2), Job(2, start, 3)]
    options = RenderOptions(steps=12, maco_crops=2, amplitude=np.ones((3, 32, 17), np.float32))
    together = render_batches(tiny, targets, jobs, recipe, options, batch_size=3, progress=False)
    alone = [render_batches(tiny, targets, [j], recipe, options, progress=False)[0]
             for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
        np.testing.assert_allclose(a.trace, b.trace, rtol=1e-3, atol=1e-3)


def test_objective_prob_uses_class_probability(tiny):
    targets = parse_targets(["fc:2", "conv2:0"], tiny)
    objective = Objective(tiny, targets, [0, 1])
    x = torch.rand(2, 3, 32, 32) * 255
    prob = objective(x, "prob")
    with torch.no_grad():
        expected = tiny(x / 255).softmax(-1)[0, 2]
    assert prob[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert prob[1].item() == pytest.approx(objective(x)[1].item(), rel=1e-5)  # not a class

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
    _argsort,
    _grid_positions,
    _grid_stride,
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


def test_argsort_is_a_stable_argsort_of_any_floats():
    """The packed-key sort orders negatives, zeros, ties and extremes as a stable argsort."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 257, generator=gen) * 1e3
    values[..., ::5] = 0.0  # ties
    values[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), -1e-38, 3.4e38])
    expected = torch.from_numpy(np.argsort(values.numpy(), axis=-1, kind="stable"))
    assert torch.equal(_argsort(values), expected)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (2, 10, 4)])
def test_the_matching_grid_visits_every_position_once_per_cycle(shape):
    """At the stride that keeps at most `most` positions, the stride² (stride, for tokens)
    offsets each take the same count and together cover every position of the kept block."""
    acts = torch.arange(float(np.prod(shape))).view(shape)
    stride = _grid_stride(acts.shape, 12)
    dims = shape[2:] if len(shape) == 4 else shape[1:2]
    assert stride == (2 if len(shape) == 4 else 1)
    assert _grid_stride(acts.shape, 0) == 1
    cycle = stride ** len(dims)
    seen = [_grid_positions(acts, stride, phase) for phase in range(cycle)]
    assert len({s.shape for s in seen}) == 1 and seen[0].shape[2] <= 12
    assert torch.equal(_grid_positions(acts, stride, cycle), seen[0])  # the cycle repeats
    kept = [d // stride * stride for d in dims]
    total = torch.cat(seen, dim=2).sort(dim=2).values
    if len(shape) == 4:
        block = acts[:, :, :kept[0], :kept[1]].flatten(2).sort(dim=2).values
    else:
        block = acts[:, :kept[0]].transpose(1, 2).sort(dim=2).values
    assert torch.equal(total, block)


def test_fewer_matched_positions_estimate_the_same_term(tiny):
    """Matching a moving grid of positions: its mean over whole cycles of steps is near the
    term over every position (the same distribution, sampled), and a reference picture still
    pays little (a sample's sorted values scatter about the quantiles: a small positive bias,
    ~0.06 here with 64 of 1,024 positions)."""
    torch.manual_seed(0)
    targets = parse_targets(["fc:1"], tiny)
    photo = torch.rand(1, 3, 32, 32) * 255
    other = torch.full((1, 3, 32, 32), 40.0) + torch.rand(1, 3, 32, 32) * 20  # dark, flat
    anchor = Anchor(_code(tiny, photo)[0].numpy(), 1.0, 1.0, references=photo.numpy())
    match = [resolve_layer(tiny, "conv1")]

    def terms(positions: int, calls: int) -> torch.Tensor:
        settings = AnchorSettings(code_weight=0.0, match_positions=positions)
        objective = AnchoredObjective(Objective(tiny, targets, [0, 0]), [anchor, anchor],
                                      resolve_layer(tiny, "penultimate"), settings, match)
        out = []
        for step in range(calls):
            ascend, target = objective.maximize(torch.cat([photo, other]), step=step)
            out.append((target - ascend).detach())
        return torch.stack(out), objective.strides[match[0].key]

    every, stride_all = terms(0, 1)
    sampled, stride = terms(64, 16)
    assert stride_all == 1 and stride > 1
    assert sampled[:, 0].abs().max() < 0.1 * every[0, 1]  # the reference itself: ~0
    assert not torch.allclose(sampled[0, 1], sampled[1, 1])  # the grid moves
    assert sampled[:, 1].mean() == pytest.approx(every[0, 1].item(), rel=0.3)
    # the step number, not how often it was called, sets the grid: a batch split across
    # workers, or a render resumed at step 3, matches the same positions
    objective = AnchoredObjective(Objective(tiny, targets, [0, 0]), [anchor, anchor],
                                  resolve_layer(tiny, "penultimate"),
                                  AnchorSettings(code_weight=0.0, match_positions=64), match)
    images = torch.cat([photo, other])
    for step in (3, 3, 0, 3):
        ascend, target = objective.maximize(images, step=step)
        assert torch.equal((target - ascend).detach(), sampled[step])


def test_matching_every_k_steps_weighs_k_times_on_its_steps_and_skips_the_others(tiny):
    """`match_every=k`: step s matches only when k divides it, at k times the weight and on the
    grid offset of match number s // k; the steps between carry the code's pull alone."""
    targets = parse_targets(["fc:1"], tiny)
    photo = torch.rand(1, 3, 32, 32) * 255
    other = torch.full((1, 3, 32, 32), 40.0) + torch.rand(1, 3, 32, 32) * 20
    anchor = Anchor(_code(tiny, photo)[0].numpy(), 1.0, 1.0, references=photo.numpy())
    match = [resolve_layer(tiny, "conv1")]
    images = torch.cat([photo, other])

    def objective(**settings) -> AnchoredObjective:
        return AnchoredObjective(Objective(tiny, targets, [0, 0]), [anchor, anchor],
                                 resolve_layer(tiny, "penultimate"),
                                 AnchorSettings(code_weight=1.0, match_positions=64, **settings),
                                 match)

    every_step, every_third, unmatched = (objective(), objective(match_every=3),
                                          objective(match_weight=0.0))
    for step in range(7):
        ascend = every_third.maximize(images, step=step)[0]
        pull_only = unmatched.maximize(images, step=step)[0]
        if step % 3:
            torch.testing.assert_close(ascend, pull_only)
        else:
            matched = every_step.maximize(images, step=step // 3)[0]
            torch.testing.assert_close(ascend - pull_only, 3 * (matched - pull_only))
            assert (ascend - pull_only)[1] < 0  # the other picture pays the matching term


@pytest.mark.parametrize("unit_scale", [False, True])
def test_random_starts_in_the_batch_leave_each_sample_as_it_is_alone(tiny, unit_scale):
    """A batch mixing anchored samples and random starts (a render's facet pictures and their
    baselines): each sample's ascended value and gradient are those it gets in a batch of its
    own. Where the target reads a unit's scale in a pass of its own, the anchor's pass sees the
    anchored samples alone."""
    targets = parse_targets(["conv2:1" if unit_scale else "fc:1"], tiny)
    torch.manual_seed(0)
    canvases = torch.rand(3, 3, 32, 32) * 255
    photos = torch.rand(2, 3, 32, 32) * 255
    anchor = Anchor(_code(tiny, photos[:1])[0].numpy() + 0.3, 2.0, 3.0, references=photos.numpy())
    anchors = [None, anchor, None]
    match = [resolve_layer(tiny, "conv1")]

    def ascend_with_gradient(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        views = [16] * len(rows) if unit_scale else None
        objective = AnchoredObjective(
            Objective(tiny, targets, [0] * len(rows), views=views), [anchors[r] for r in rows],
            resolve_layer(tiny, "penultimate"), AnchorSettings(match_positions=64), match)
        images = canvases[rows].clone().requires_grad_(True)
        seen: list[int] = []
        hook = tiny.module.pool.register_forward_hook(lambda m, i, o: seen.append(len(o)))
        try:
            ascend, _ = objective.maximize(images, step=1)
        finally:
            hook.remove()
        ascend.sum().backward()
        return ascend.detach(), images.grad, seen

    ascend, grad, seen = ascend_with_gradient([0, 1, 2])
    for row in range(3):
        alone, alone_grad, _ = ascend_with_gradient([row])
        torch.testing.assert_close(ascend[row:row + 1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad[row:row + 1], alone_grad, rtol=1e-4, atol=1e-6)
    # the batch that reached the pooling before the code layer in the last pass (the anchor's):
    # the whole batch where the target is read in it too, else the anchored sample alone
    assert seen[-1] == (1 if unit_scale else 3) and len(seen) == (2 if unit_scale else 1)

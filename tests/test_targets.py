"""Targets: parsing, linear combinations, reductions, hooks, and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfv.core.errors import MfvError
from mfv.models.activations import capture, reduce_unit, target_value
from mfv.models.targets import parse_target


def _values(model, target, x):
    with capture(model, target.layers) as acts, torch.no_grad():
        logits = model(x)
    return target_value(target, acts), logits, acts


def test_logit_target_equals_model_output(tiny):
    x = torch.rand(3, 3, 32, 32)
    t = parse_target("fc:2", tiny)
    values, logits, _ = _values(tiny, t, x)
    assert torch.allclose(values, logits[:, 2])
    assert t.class_index == 2


def test_combinations_are_weighted_sums(tiny):
    x = torch.rand(4, 3, 32, 32)
    single = {u: _values(tiny, parse_target(f"fc:{u}", tiny), x)[0] for u in range(3)}
    combo = _values(tiny, parse_target("fc:0 + fc:1", tiny), x)[0]
    assert torch.allclose(combo, single[0] + single[1])
    combo = _values(tiny, parse_target("fc:1 - 0.5*fc:2", tiny), x)[0]
    assert torch.allclose(combo, single[1] - 0.5 * single[2])
    combo = _values(tiny, parse_target("-fc:0 + fc:2 * 3", tiny), x)[0]
    assert torch.allclose(combo, -single[0] + 3 * single[2], atol=1e-6)
    assert parse_target("fc:0 + fc:1", tiny).class_index is None


@pytest.mark.slow
def test_class_names_and_aliases(tiny, lite0):
    assert parse_target("green thing", tiny).terms[0].unit == 1
    assert parse_target("grey-ish thing", tiny).terms[0].unit == 3  # hyphen is not a minus
    t = parse_target("bell pepper", lite0)
    assert (t.terms[0].layer.path, t.terms[0].unit, t.class_index) == ("_fc", 945, 945)
    assert parse_target("logits:701", lite0).class_index == 701
    x = torch.rand(2, 3, 32, 32)
    values, _, acts = _values(tiny, parse_target("penultimate:5", tiny), x)
    pooled = tiny.module.flatten(tiny.module.pool(tiny.module.relu2(tiny.module.conv2(
        tiny.module.relu1(tiny.module.conv1(tiny.preprocess.normalize(x)))))))
    assert torch.allclose(values, pooled[:, 5], atol=1e-6)


def test_spatial_reductions_and_post_activation(tiny):
    x = torch.rand(2, 3, 32, 32)
    _, _, acts = _values(tiny, parse_target("conv2:3", tiny), x)
    fmap = acts["conv2"][:, 3]
    for reduction, expected in [("center", fmap[:, 8, 8]), ("max", fmap.flatten(1).amax(1)),
                                ("mean", fmap.flatten(1).mean(1))]:
        t = parse_target("conv2:3", tiny, reduction=reduction)
        assert torch.allclose(_values(tiny, t, x)[0], expected)
    post = parse_target("conv2:3", tiny, reduction="mean", activation="post")
    assert torch.allclose(_values(tiny, post, x)[0], fmap.clamp(min=0).flatten(1).mean(1))
    tokens = torch.arange(24.0).view(1, 4, 6)  # (B, N, C)
    assert reduce_unit(tokens, 1, "center").item() == tokens[0, 2, 1]
    assert reduce_unit(tokens, 1, "cls").item() == tokens[0, 0, 1]
    assert reduce_unit(tokens, 1, "max").item() == tokens[0, 3, 1]


def test_hooks_are_removed_on_success_and_on_error(tiny):
    t = parse_target("conv1:0 + fc:1", tiny)
    modules = dict(tiny.module.named_modules())
    with capture(tiny, t.layers):
        assert modules["conv1"]._forward_hooks
    assert not any(m._forward_hooks for m in modules.values())
    with pytest.raises(RuntimeError, match="boom"), capture(tiny, t.layers):
        tiny(torch.rand(1, 3, 32, 32))
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in modules.values())


@pytest.mark.parametrize("spec, message", [
    ("conv3:1", r"no layer 'conv3'.*closest: conv[12], conv[12]"),
    ("fc:5", r"unit 5 is out of range .* valid units are 0\.\.4"),
    ("conv1:8", r"valid units are 0\.\.7"),
    ("purple thing", r"no class .* called 'purple thing'"),
    ("thing", r"no class"),
    ("", r"empty target"),
])
def test_errors_say_what_to_do(tiny, spec, message):
    with pytest.raises(MfvError, match=message):
        parse_target(spec, tiny)


@pytest.mark.slow
def test_ambiguous_class_name(lite0):
    with pytest.raises(MfvError, match=r"matches several classes: 134 \(crane\), 517"):
        parse_target("crane", lite0)


def test_post_activation_needs_a_following_activation(tiny):
    with pytest.raises(MfvError, match="no activation module directly follows 'fc'"):
        parse_target("fc:0", tiny, activation="post")


def test_target_bank_equals_single_evaluations(tiny):
    from mfv.models.activations import TargetBank
    from mfv.models.targets import parse_targets

    x = torch.rand(3, 3, 32, 32)
    for reduction in ("center", "max", "mean"):
        targets = parse_targets(["fc:*", "conv2:3 - 2*fc:1", "penultimate:2", "conv1:0"], tiny,
                                reduction=reduction)
        assert len(targets) == 5 + 3
        bank = TargetBank(targets)
        with capture(tiny, bank.layers) as acts, torch.no_grad():
            tiny(x)
            values = bank(acts)
            singles = torch.stack([target_value(t, acts) for t in targets], 1)
        assert values.shape == (3, 8)
        assert torch.allclose(values, singles, atol=1e-5)


class TinyViT(torch.nn.Module):
    """Patch embedding + one transformer block: token activations (B, N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 16, 8, stride=8)
        self.block = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True,
                                                      dropout=0.0)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, 16)
        return self.head(self.block(tokens).mean(1))


def test_transformer_token_targets_and_rendering():
    from mfv.models import Preprocess, load_model
    from mfv.render.batch import Job, RenderOptions, render_batches

    torch.manual_seed(0)
    vit = load_model(TinyViT(), preprocess=Preprocess(input_size=32, resize_size=32))
    x = torch.rand(2, 3, 32, 32)
    for reduction in ("center", "cls", "max", "mean"):
        t = parse_target("block:5", vit, reduction=reduction)
        values, _, acts = _values(vit, t, x)
        assert acts["block"].shape == (2, 16, 16)
        assert torch.allclose(values, reduce_unit(acts["block"], 5, reduction))
    targets = [parse_target("block:5", vit, reduction="mean")]
    result = render_batches(vit, targets, [Job(0, None, 1)], "fourier", RenderOptions(steps=15),
                            progress=False)[0]
    assert np.isfinite(result.activation) and result.trace[-1] > result.trace[0]

"""`capture(..., stop=True)`: a pass that ends at the deepest layer read gives what a full pass
gives, computes nothing after it, and never changes what is read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfv.models.activations import capture
from mfv.models.targets import LayerRef


def _calls(module: nn.Module) -> list[int]:
    """A counter of `module`'s calls (a hook left on for the test's lifetime)."""
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_a_stopped_pass_reads_what_a_full_pass_reads_and_runs_nothing_after(tiny):
    conv1, fc = LayerRef("conv1"), tiny.module.fc
    fc_calls = _calls(fc)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    with capture(tiny, [conv1]) as store:
        assert tiny(x) is not None
        full = store["conv1"]
    (full_grad,) = torch.autograd.grad(full[:, 2].amax((1, 2)).sum(), x)
    assert fc_calls[0] == 1
    with capture(tiny, [conv1], stop=True) as store:
        for _ in range(2):
            assert tiny(x) is None  # the pass ended at conv1
            (grad,) = torch.autograd.grad(store["conv1"][:, 2].amax((1, 2)).sum(), x)
            assert torch.equal(store["conv1"], full) and torch.equal(grad, full_grad)
    assert fc_calls[0] == 1  # the head never ran again
    assert "forward" not in tiny.module.__dict__  # the class's forward is back


def test_the_first_pass_of_a_network_runs_to_the_end_to_learn_its_layers_run_once():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    last = _calls(net[2])
    x = torch.rand(1, 3, 9, 9)
    with capture(net, [LayerRef("0")], stop=True) as store:
        assert net(x) is not None and last[0] == 1  # a bare module: counted on this pass
        assert net(x) is None and last[0] == 1 and store["0"].shape == (1, 4, 7, 7)


class _SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.act(self.a(x)) - 1.0))


def test_a_module_called_twice_a_pass_is_read_at_its_last_call_and_never_stopped_at():
    net = _SharedReLU()
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = torch.relu(torch.relu(net.a(x)) - 1.0)
        with capture(net, [LayerRef("act")], stop=True) as store:
            for _ in range(3):
                assert net(x) is not None
                assert torch.equal(store["act"], expected)


def test_a_pass_runs_to_the_end_while_a_capture_without_stop_is_open(tiny):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), capture(tiny, [LayerRef("conv1")], stop=True) as early:
        tiny(x)  # learns that conv1 runs once
        with capture(tiny, [LayerRef("fc")]) as late:
            assert tiny(x) is not None
            assert late["fc"].shape == (2, 5) and early["conv1"].shape == (2, 8, 32, 32)
        assert tiny(x) is None


def test_the_network_is_left_as_it_was_after_an_error_and_keeps_its_own_forward(tiny):
    module = tiny.module
    own = module.forward  # an instance's own forward, set before any capture

    def forward(x: torch.Tensor) -> torch.Tensor:
        return own(x) * 2

    module.forward = forward
    with pytest.raises(RuntimeError, match="boom"), capture(tiny, [LayerRef("conv2")],
                                                            stop=True):
        raise RuntimeError("boom")
    assert module.forward is forward and "_mfv_captures" not in module.__dict__
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(module(x), own(x) * 2)


def test_a_torch_export_program_stops_at_the_layer_read_too(tmp_path, tiny):
    from mfv.models import load_model

    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(tiny.module, (torch.rand(2, 3, 32, 32),), dynamic_shapes=(dims,))
    torch.export.save(program, tmp_path / "tiny.pt2")
    model = load_model(str(tmp_path / "tiny.pt2"), preprocess=tiny.preprocess)
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad(), capture(model, [LayerRef("conv2")], stop=True) as store:
        assert model(x) is not None  # the first pass learns that conv2 runs once
        first = store["conv2"]
        assert model(x) is None and torch.equal(store["conv2"], first)


def test_two_open_captures_that_stop_at_the_same_layer_both_read_it(tiny):
    conv1 = LayerRef("conv1")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), capture(tiny, [conv1]) as full:
        tiny(x)  # a full pass: the layer is known to run once a pass
    with torch.no_grad(), capture(tiny, [conv1], stop=True) as outer:
        with capture(tiny, [conv1], stop=True) as inner:
            assert tiny(x) is None  # the pass still ends at conv1
        assert torch.equal(inner["conv1"], full["conv1"])
        assert torch.equal(outer["conv1"], full["conv1"])

"""Speed settings of the render loops, checked for what they must not change: channels_last and
affine batch norms give the same pictures, a bfloat16 pass still climbs, the batch probe picks
a batch that runs and leaves a given batch size alone, and no loop reads the device per step."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mfv.render.batch as batch_module
import mfv.render.recipes.base as loop_module
import mfv.render.recipes.paper as paper_module
from mfv.core.errors import MfvError
from mfv.models import Preprocess, load_model
from mfv.models.passes import Forward, prepared
from mfv.models.targets import parse_targets
from mfv.render.anchor import Anchor
from mfv.render.batch import (
    Job,
    RenderOptions,
    batch_size_for,
    probe_batch,
    render_batches,
)
from mfv.render.objective import Objective, measure


class NormNet(nn.Module):
    """Conv → BatchNorm → ReLU6 twice, with non-trivial running statistics, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12)
        self.act = nn.ReLU6()
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)
        gen = torch.Generator().manual_seed(0)
        for bn in (self.bn1, self.bn2):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.2)
            bn.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


@pytest.fixture()
def normnet():
    torch.manual_seed(1)
    return load_model(NormNet(), preprocess=Preprocess(input_size=32, resize_size=36,
                                                       mean=(0.5,) * 3, std=(0.5,) * 3))


def _jobs(count: int, size: int = 32) -> list[Job]:
    gen = torch.Generator().manual_seed(5)
    return [Job(b % 2, torch.rand(3, size, size, generator=gen) * 255 if b % 3 else None,
                seed=b) for b in range(count)]


# ------------------------------------------------------------------- the model's own pass
def test_affine_batchnorm_is_the_batch_norm_and_is_undone(normnet):
    x = torch.rand(3, 3, 32, 32) * 255
    seen = {}
    normnet.module.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o))

    def value_and_grad(forward: Forward):
        with prepared(normnet, forward):
            xi = x.clone().requires_grad_(True)
            out = forward(normnet, xi)
            (grad,) = torch.autograd.grad(out[:, 1].sum(), xi)
            return out.detach(), grad, seen["bn2"].detach()

    plain = value_and_grad(Forward())
    for forward in (Forward(affine_batchnorm=True), Forward(channels_last=True),
                    Forward(channels_last=True, affine_batchnorm=True)):
        for a, b in zip(plain, value_and_grad(forward), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with prepared(normnet, Forward(channels_last=True, affine_batchnorm=True)):
        assert "forward" in normnet.module.bn1.__dict__
        assert normnet.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert not normnet.module.conv1.weight.is_contiguous()
    # restored: torch's own batch norm, the standard layout
    assert "forward" not in normnet.module.bn1.__dict__
    assert normnet.module.conv1.weight.is_contiguous()


class FoldNet(NormNet):
    """NormNet declaring its convolution → batch norm pairs, as EfficientNet-Lite does."""

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


def test_declared_batch_norms_fold_into_their_convolutions_unless_hooked():
    torch.manual_seed(1)
    model = load_model(FoldNet(), preprocess=Preprocess(input_size=32, resize_size=36,
                                                        mean=(0.5,) * 3, std=(0.5,) * 3))
    net = model.module
    x = torch.rand(3, 3, 32, 32) * 255

    def run(forward: Forward, hooked: str | None = None):
        seen = {}
        handle = getattr(net, hooked).register_forward_hook(
            lambda m, i, o: seen.__setitem__("out", o.detach())) if hooked else None
        try:
            with prepared(model, forward):
                xi = x.clone().requires_grad_(True)
                out = forward(model, xi)
                (grad,) = torch.autograd.grad(out[:, 1].sum(), xi)
        finally:
            if handle is not None:
                handle.remove()
        return out.detach(), grad, seen.get("out")

    for hooked in (None, "conv1", "bn1", "conv2", "bn2"):
        plain = run(Forward(), hooked)
        for layout in (False, True):
            folded = run(Forward(channels_last=layout, affine_batchnorm=True), hooked)
            for a, b in zip(plain, folded, strict=True):
                if a is not None:
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with prepared(model, Forward(affine_batchnorm=True)):
        probe = torch.randn(2, 8, 4, 4)
        assert net.bn1(probe) is probe  # folded: the norm passes its input on
        handle = net.conv1.register_forward_hook(lambda *_: None)
        try:
            assert net.bn1(probe) is not probe  # a hooked pair runs as it is
            torch.testing.assert_close(net.bn1(probe), nn.BatchNorm2d.forward(net.bn1, probe))
        finally:
            handle.remove()
    assert not any("forward" in m.__dict__ for m in net.modules())  # restored


class ActNet(NormNet):
    """NormNet with an activation per norm, declaring both kinds of pairs (as EfficientNet-Lite
    does): its activations may run in place."""

    def __init__(self) -> None:
        super().__init__()
        self.act1, self.act2 = nn.ReLU6(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))

    def conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]

    def norm_act_pairs(self):
        return [(self.bn1, self.act1), (self.bn2, self.act2)]


def test_declared_activations_run_in_place_unless_a_hook_may_see_it():
    """Same outputs, input gradients and hooked tensors as the plain pass, whichever module is
    hooked (a hook on the norm or its convolution keeps the tensor an in-place activation would
    overwrite; one on the activation may read its input), and in inference too."""
    torch.manual_seed(1)
    model = load_model(ActNet(), preprocess=Preprocess(input_size=32, resize_size=36,
                                                       mean=(0.5,) * 3, std=(0.5,) * 3))
    net = model.module
    x = torch.rand(3, 3, 32, 32) * 255

    def run(forward: Forward, hooked: str | None = None, pre: bool = False):
        seen = {}
        module = getattr(net, hooked) if hooked else None
        handle = None if module is None else (
            module.register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0].clone()))
            if pre else module.register_forward_hook(
                lambda m, i, o: seen.update({"in": i[0], "out": o})))
        try:
            with prepared(model, forward):
                xi = x.clone().requires_grad_(True)
                out = forward(model, xi)
                (grad,) = torch.autograd.grad(out[:, 1].sum(), xi)
                with torch.inference_mode():
                    again = forward(model, x)
        finally:
            if handle is not None:
                handle.remove()
        return out.detach(), grad, again, *(seen.get(k) for k in ("in", "out"))

    for hooked in (None, "conv1", "bn1", "act1", "conv2", "bn2", "act2"):
        for pre in (False, True):
            plain = run(Forward(), hooked, pre)
            fast = run(Forward(channels_last=True, affine_batchnorm=True), hooked, pre)
            for a, b in zip(plain, fast, strict=True):
                if a is not None:
                    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-5)
    with prepared(model, Forward(affine_batchnorm=True)):
        probe = torch.randn(2, 8, 4, 4)
        assert net.act1(probe) is probe and probe.min() >= 0  # in place
        handle = net.bn1.register_forward_hook(lambda *_: None)
        try:
            fresh = torch.randn(2, 8, 4, 4)
            assert net.act1(fresh) is not fresh  # its norm is hooked: a new tensor
        finally:
            handle.remove()
    assert not any("forward" in m.__dict__ for m in net.modules())  # restored


def test_affine_batchnorm_leaves_training_norms_and_subclasses_alone(normnet):
    class NormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: more than a batch norm
        pass

    normnet.module.bn2 = NormAct(12).eval()
    normnet.module.bn1.train()
    with prepared(normnet, Forward(affine_batchnorm=True)):
        assert "forward" not in normnet.module.bn1.__dict__
        assert "forward" not in normnet.module.bn2.__dict__


@pytest.mark.parametrize("recipe", ["fourier", "paper-mean", "anchored"])
def test_channels_last_and_affine_batchnorm_give_the_same_pictures(normnet, recipe):
    targets = parse_targets(["fc:1", "conv2:3"], normnet, reduction="mean")
    jobs = [Job(j.target, j.start, j.seed, Anchor(np.zeros(12, np.float32), 1.0, 2.0,
                                                  np.full((2, 3, 32, 32), 100, np.float32))
                if recipe == "anchored" else None) for j in _jobs(3)]
    runs = [render_batches(normnet, targets, jobs, recipe,
                           RenderOptions(steps=16, channels_last=layout), batch_size=3,
                           progress=False)
            for layout in (False, True)]
    for a, b in zip(*runs, strict=True):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
        np.testing.assert_allclose(a.trace, b.trace, rtol=1e-4, atol=1e-4)
        assert a.activation == pytest.approx(b.activation, rel=1e-4, abs=1e-4)
    assert normnet.module.conv1.weight.is_contiguous()  # the model is left as it was


def test_default_pass_per_device():
    options = RenderOptions()
    assert options.forward(torch.device("cpu")) == Forward("float32", True, True)
    assert options.forward(torch.device("cuda")).channels_last
    assert not options.forward(torch.device("mps")).channels_last
    assert not RenderOptions(channels_last=False).forward(torch.device("cuda")).channels_last
    with pytest.raises(MfvError, match="unknown precision 'float16'"):
        RenderOptions(precision="float16")


def test_bfloat16_pass_runs_in_bfloat16_and_climbs_like_float32(tiny):
    targets = parse_targets(["fc:1", "conv2:3"], tiny, reduction="mean")
    jobs = [Job(0, torch.full((3, 32, 32), 120.0), 3), Job(1, None, 4)]
    dtypes = []
    hook = tiny.module.conv2.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    runs = {p: render_batches(tiny, targets, jobs, "fourier",
                              RenderOptions(steps=40, precision=p), batch_size=2, progress=False)
            for p in ("float32", "bfloat16")}
    hook.remove()
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes  # autocast was on, then off
    start = measure(Objective(tiny, targets, [0, 1]),
                    torch.stack([jobs[0].start, torch.from_numpy(
                        paper_module.paper_noise(4, 32)).float()]))
    for p, results in runs.items():
        after = np.array([r.activation for r in results])
        assert np.all(after > start + 1e-3), (p, start, after)  # both climb
        for r in results:
            assert r.trace.dtype == np.float32 and r.trace[-1] > r.trace[0]
    # the same direction: the bf16 run ends far closer to the float32 one than to the start
    f32 = np.array([r.activation for r in runs["float32"]])
    b16 = np.array([r.activation for r in runs["bfloat16"]])
    assert np.all(np.abs(b16 - f32) < 0.5 * (f32 - start)), (start, f32, b16)


def test_reported_activation_is_a_float32_pass(tiny):
    targets = parse_targets(["fc:2"], tiny)
    x = torch.rand(2, 3, 32, 32) * 255
    half = Objective(tiny, targets, [0, 0], Forward("bfloat16"))
    exact = Objective(tiny, targets, [0, 0])
    np.testing.assert_array_equal(measure(half, x), measure(exact, x))
    assert not np.allclose(half(x).detach().numpy(), exact(x).detach().numpy(), rtol=0,
                           atol=1e-7)  # the bf16 pass itself does differ


# ---------------------------------------------------------------------------- batch sizes
@contextmanager
def device_memory(fits: int) -> Iterator[Counter]:
    """A device that holds batches of at most `fits` jobs: larger ones run out of memory.
    Counts the batch sizes that were run."""
    real = batch_module._run_batch
    runs: Counter = Counter()

    def run(recipe, objective, jobs, options, progress, desc):
        runs[len(jobs)] += 1
        if len(jobs) > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(recipe, objective, jobs, options, progress, desc)

    batch_module._run_batch = run
    try:
        yield runs
    finally:
        batch_module._run_batch = real


def test_probe_finds_the_largest_batch_that_fits_and_remembers_it(tiny):
    targets = parse_targets(["fc:0", "fc:3"], tiny)
    jobs = _jobs(20)
    with device_memory(6) as runs:
        assert probe_batch(tiny, targets, jobs, "fourier") == 4  # 1, 2, 4 fit; 8 does not
        assert sorted(runs) == [1, 2, 4, 8]
        runs.clear()
        assert probe_batch(tiny, targets, jobs, "fourier") == 4  # remembered: no new probe
        assert not runs
        assert batch_size_for(tiny, targets, jobs[:10], "fourier", probe=True) == 4  # 4+4+2
        assert not runs
        # another recipe (or pass) is probed on its own
        assert probe_batch(tiny, targets, jobs, "paper-mean") == 4 and runs
    # what the probe picked runs
    results = render_batches(tiny, targets, jobs[:8], "fourier", RenderOptions(steps=3),
                             batch_size=batch_size_for(tiny, targets, jobs[:8], "fourier",
                                                       probe=True), progress=False)
    assert len(results) == 8 and all(r.trace.shape == (3,) for r in results)


def test_probe_runs_the_real_recipe_up_to_the_jobs(tiny):
    targets = parse_targets(["fc:0", "fc:3"], tiny)
    with device_memory(1000) as runs:
        assert probe_batch(tiny, targets, _jobs(5), "paper-mean") == 5  # 1, 2, 4, then all 5
    assert sorted(runs) == [1, 2, 4, 5]
    assert batch_size_for(tiny, targets, _jobs(12), "fourier", probe=False) == 6  # CPU 10: 6+6
    assert batch_size_for(tiny, targets, _jobs(10), "fourier", probe=False) == 10


def test_a_given_batch_size_is_kept_and_an_out_of_memory_batch_halved(tiny, monkeypatch):
    targets = parse_targets(["fc:0", "fc:3"], tiny)
    jobs = _jobs(7)

    def no_probe(*args, **kwargs):
        raise AssertionError("a given batch size must not be probed")

    monkeypatch.setattr(batch_module, "probe_batch", no_probe)
    sizes = []
    render_batches(tiny, targets, jobs, "fourier", RenderOptions(steps=2), batch_size=3,
                   progress=False, on_batch=lambda rows, results: sizes.append(len(rows)))
    assert sizes == [3, 3, 1]
    sizes.clear()
    with device_memory(2):  # 8 and 4 run out of memory: halved to 2
        results = render_batches(tiny, targets, jobs, "fourier", RenderOptions(steps=2),
                                 batch_size=8, progress=False,
                                 on_batch=lambda rows, results: sizes.append(len(rows)))
    assert sizes == [2, 2, 2, 1] and len(results) == 7
    monkeypatch.undo()
    with device_memory(2) as runs:  # the failure is remembered: the probe stays below it
        assert probe_batch(tiny, targets, jobs, "fourier") == 2
    assert max(runs) <= 2


# ---------------------------------------------------------------------------- host syncs
RENDER = Path(batch_module.__file__).parent
# The step counters of torch's optimizers live on the CPU (not `capturable`): reading them is
# no device sync. The CPU TV backend (tv.py) works on host arrays by design; on CUDA the loops
# use its torch backend.
ALLOWED = (str(Path(torch.optim.Optimizer.__module__.replace(".", "/"))), str(RENDER / "tv"))
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def host_reads_in_loops() -> Iterator[Counter]:
    """Count every Python-level read of a tensor's value (`.item()`, `.cpu()`, `float(t)`,
    `if t:` ...) made while a render loop is between its first and last step, by caller."""
    reads: Counter = Counter()
    state = {"inside": 0}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def watch(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if state["inside"]:
                frame = sys._getframe(1)
                where = frame.f_code.co_filename
                if not any(allowed in where for allowed in ALLOWED):
                    reads[f"{name} at {Path(where).name}:{frame.f_lineno}"] += 1
            return original(self, *args, **kwargs)
        return read

    class Bar:  # stands in for tqdm in the loops: marks the steps
        def __init__(self, iterable=None, **_):
            self.iterable = iterable
            state["inside"] += iterable is None  # the paper loop's bar spans its octaves

        def __iter__(self):
            state["inside"] += 1
            try:
                yield from self.iterable
            finally:
                state["inside"] -= 1

        def update(self, n=1):
            pass

        def close(self):
            state["inside"] -= 1

    modules = (loop_module,)  # the recipes' shared loop owns the progress bar
    saved = [m.tqdm for m in modules]
    for m in modules:
        m.tqdm = Bar
    for name in READS:
        setattr(torch.Tensor, name, watch(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for m, original in zip(modules, saved, strict=True):
            m.tqdm = original


@pytest.mark.parametrize("recipe", ["fourier", "anchored", "paper-mean", "paper-center", "maco"])
def test_no_loop_reads_the_device_per_step(tiny, recipe):
    targets = parse_targets(["fc:1", "conv2:3"], tiny, reduction="mean")
    refs = np.random.default_rng(0).uniform(0, 255, (2, 3, 32, 32)).astype(np.float32)
    jobs = [Job(0, torch.rand(3, 32, 32) * 255, 1, Anchor(np.zeros(16, np.float32), 1.0, 1.0,
                                                          refs)), Job(1, None, 2)]
    options = RenderOptions(steps=12, amplitude=np.ones((3, 32, 17), np.float32),
                            maco_crops=3)
    with host_reads_in_loops() as reads:
        results = render_batches(tiny, targets, jobs, recipe, options, batch_size=2,
                                 progress=False)
        watched = torch.Tensor.item
    assert watched is not torch.Tensor.item  # the watch was on, and is off again
    assert all(len(r.trace) >= 12 for r in results)
    assert not reads, f"host reads inside the {recipe} loop: {dict(reads)}"


def test_the_watch_sees_a_read_in_a_loop(tiny, monkeypatch):
    """The check above can fail: a loop that reads its objective each step is caught."""
    real = Objective.__call__

    def reading(self, images, kind="target"):
        value = real(self, images, kind)
        if value.sum() > 1e9:  # a data-dependent branch: a host sync
            pass
        return value

    monkeypatch.setattr(Objective, "__call__", reading)
    targets = parse_targets(["fc:1"], tiny)
    with host_reads_in_loops() as reads:
        (result,) = render_batches(tiny, targets, [Job(0, None, 1)], "paper-mean",
                                   RenderOptions(steps=8), batch_size=1, progress=False)
    assert sum(reads.values()) == len(result.trace) == 11  # one per step (4 + 3 + 2 + 2)
    assert all("test_speed.py" in k for k in reads)

"""`mfv.models.onnx_engine`: passes without gradients through ONNX Runtime read what torch
reads, leave the network as it was, travel to worker processes, and give way to torch (with a
warning) where a network cannot be exported."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import mfv
from conftest import make_images, make_tiny
from mfv.core.errors import MfvError
from mfv.data.images import load_rgb
from mfv.models import onnx_engine, read
from mfv.models.base import to_tensor
from mfv.models.onnx_engine import engine_name, exported, layer_reader, release_sessions
from mfv.models.targets import LayerRef, resolve_layer


def _read(model, layers, images, engine):
    with layer_reader(model, layers, engine) as read:
        return [t.clone() for t in read(images)]


def test_onnx_runtime_reads_every_kind_of_layer_as_torch_does(tiny):
    assert engine_name(tiny) == "torch"  # every reader's default; the layer study asks for it
    assert engine_name(tiny, "onnxruntime").startswith("onnxruntime-")
    with pytest.raises(MfvError, match="unknown engine 'onnx'"):
        engine_name(tiny, "onnx")
    layers = [LayerRef("conv1"), LayerRef("relu2"), resolve_layer(tiny, "penultimate"),
              LayerRef("fc")]
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    by_torch = _read(tiny, layers, images, "torch")
    by_onnx = _read(tiny, layers, images, "onnxruntime")
    assert exported(tiny, layers, (32, 32)) is not None  # it did go through ONNX Runtime
    for want, got in zip(by_torch, by_onnx, strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the export leaves the network as it was: in eval mode, its weights untouched, no hooks
    assert not any(m.training for m in tiny.module.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny.module.state_dict().items())
    assert not any(m._forward_hooks for m in tiny.module.modules())
    assert _read(tiny, layers[:1], images, "torch")[0].equal(by_torch[0])


def test_any_batch_size_runs_through_one_export(tiny):
    layers = [LayerRef("conv2")]
    for n in (1, 7, 2):
        images = torch.rand(n, 3, 32, 32)
        torch.testing.assert_close(_read(tiny, layers, images, "onnxruntime")[0],
                                   _read(tiny, layers, images, "torch")[0], rtol=1e-4, atol=1e-5)
    assert [k for k in tiny._cache if k[0] == "onnx"] == [("onnx", ("conv2",), (32, 32))]


def test_the_exported_pass_travels_with_the_model_and_a_copy_opens_its_own_session(tiny):
    layers = [LayerRef("fc")]
    images = torch.rand(3, 3, 32, 32)
    first = _read(tiny, layers, images, "onnxruntime")[0]
    copy = pickle.loads(pickle.dumps(tiny))
    graph = copy._cache[("onnx", ("fc",), (32, 32))]
    assert graph is not None and graph._session is None  # the bytes came, not the session
    assert torch.equal(_read(copy, layers, images, "onnxruntime")[0], first)


class _Odd(nn.Module):
    """A network with an op the ONNX exporter has no symbol for (`torch.histc`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(torch.cat([h, torch.histc(h, 4).expand(len(h), 4)], 1))


def test_a_network_that_cannot_be_exported_is_read_by_torch_with_a_warning(caplog):
    from conftest import PRE

    model = mfv.load_model(_Odd(), preprocess=PRE)
    images = torch.rand(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="mfv.models.onnx_engine"):
        got = _read(model, [LayerRef("fc")], images, "onnxruntime")[0]
    assert exported(model, [LayerRef("fc")], (32, 32)) is None
    assert any("read by torch" in r.getMessage() and "export failed" in r.getMessage()
               for r in caplog.records)
    torch.testing.assert_close(got, _read(model, [LayerRef("fc")], images, "torch")[0])


def test_an_export_that_reads_otherwise_than_torch_is_not_used(monkeypatch, caplog):
    tiny = make_tiny()
    monkeypatch.setattr(onnx_engine, "CHECK_TOLERANCE", -1.0)  # no difference passes
    images = torch.rand(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="mfv.models.onnx_engine"):
        got = _read(tiny, [LayerRef("conv1")], images, "onnxruntime")[0]
    assert exported(tiny, [LayerRef("conv1")], (32, 32)) is None
    assert any("differs from torch's" in r.getMessage() for r in caplog.records)
    assert torch.equal(got, _read(tiny, [LayerRef("conv1")], images, "torch")[0])


@pytest.mark.slow
def test_lite0_through_onnx_runtime_reads_its_layers_as_torch_does(lite0):
    layers = [resolve_layer(lite0, "_blocks.3"), resolve_layer(lite0, "penultimate"),
              resolve_layer(lite0, "_fc")]
    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for want, got in zip(_read(lite0, layers, images, "torch"),
                         _read(lite0, layers, images, "onnxruntime"), strict=True):
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_released_sessions_reopen_on_the_next_read(tiny):
    layers = [LayerRef("conv2")]
    images = torch.rand(3, 3, 32, 32)
    first = _read(tiny, layers, images, "onnxruntime")[0]
    graph = exported(tiny, layers, (32, 32))
    assert graph._session is not None  # kept between readers: its arena is warm
    release_sessions(tiny)
    assert graph._session is None
    assert torch.equal(_read(tiny, layers, images, "onnxruntime")[0], first)


def test_photos_read_through_onnx_runtime_match_torch_and_skip_bad_files(tiny, tmp_path):
    paths = [str(p) for p in sorted(make_images(tmp_path, 5).rglob("*.png"))]
    (tmp_path / "bad.jpg").write_bytes(b"not a picture")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    layers = [LayerRef("conv2"), LayerRef("fc")]
    got = read.read_photos(tiny, paths, layers, read.channel_means, batch_size=2,
                           engine="onnxruntime")
    assert exported(tiny, layers, (32, 32)) is not None
    assert got.kept.tolist() == [0, 1, 3, 4, 5] and [i for i, _ in got.bad] == [2]
    with layer_reader(tiny, layers, "torch") as by_torch:
        x = torch.stack([to_tensor(tiny.preprocess, load_rgb(paths[i])) for i in got.kept])
        want = [read.channel_means(a).numpy() for a in by_torch(x)]
    for w, g in zip(want, got.outputs, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

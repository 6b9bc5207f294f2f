"""The built-in pretrained models: correct padding, correct predictions, safe file loading."""

from __future__ import annotations

import pytest
import skimage.data
import torch
from PIL import Image

from mfv.core.errors import MfvError
from mfv.models import load_model, load_state_dict
from mfv.models.base import to_tensor
from mfv.models.classes import imagenet_classes
from mfv.models.efficientnet_lite import SameConv2d, weights_path


def _top(model, array, k=5):
    x = to_tensor(model.preprocess, Image.fromarray(array))[None]
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    return [model.classes.names[i] for i in probs.topk(k).indices.tolist()]


@pytest.mark.slow
def test_lite0_classifies_scikit_image_photos(lite0):
    assert {"tiger cat", "Egyptian cat", "tabby"} <= set(_top(lite0, skimage.data.chelsea()))
    assert _top(lite0, skimage.data.coffee(), 1) == ["espresso"]


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 227, 256])
def test_lite0_same_padding_matches_reference_at_odd_sizes(lite0, size):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights_path("efficientnet_lite0"), image_size=size
    ).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.inference_mode():
        assert torch.allclose(lite0.module(x), reference(x), atol=1e-4)
        laid_out = lite0.module.to(memory_format=torch.channels_last)
        try:
            assert torch.allclose(laid_out(x.contiguous(memory_format=torch.channels_last)),
                                  reference(x), atol=1e-4)
        finally:
            lite0.module.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize(("kernel", "stride", "groups"), [(3, 1, 1), (5, 1, 4), (3, 2, 4),
                                                          (5, 2, 1), (1, 1, 1), (4, 1, 1)])
@pytest.mark.parametrize("size", [(224, 224), (227, 225), (7, 8)])
def test_same_conv_equals_tensorflow_padding_of_a_copy(kernel, stride, groups, size):
    """The convolution's own zero padding where SAME padding is symmetric, a padded copy where
    it is not: the same outputs and input gradients as always padding a copy."""
    conv = SameConv2d(4, 8, kernel, stride, groups=groups, bias=True)
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(kernel * stride))
    pads = []
    for n in reversed(size):
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    outputs = []
    for fn in (conv, lambda t: torch.nn.functional.conv2d(
            torch.nn.functional.pad(t, pads), conv.weight, conv.bias, stride, 0, 1, groups)):
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        (out * out).sum().backward()
        outputs.append((out.detach(), xx.grad))
    assert outputs[0][0].shape == (2, 8, -(-size[0] // stride), -(-size[1] // stride))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_load_and_see_a_cat(name):
    model = load_model(name)
    assert model.preprocess.input_size in (240, 260)
    top = _top(model, skimage.data.chelsea())
    assert {"tiger cat", "Egyptian cat", "tabby"} & set(top[:2])


def test_imagenet_classes_offline():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes.lookup("n07720875") == 945 == classes.resolve("bell pepper")
    assert classes.resolve("Movie Theater") == 498
    assert classes.resolve("grocery store") == 582


@pytest.mark.slow
def test_model_bundle_describes_itself(lite0):
    assert not lite0.module.training
    assert lite0.logits_layer == "_fc"
    info = lite0.describe()
    assert info["name"] == "efficientnet_lite0" and info["preprocess"]["mean"] == [0.5] * 3 or \
        info["preprocess"]["mean"] == (0.5, 0.5, 0.5)
    layers = {i.path: i for i in lite0.layers()}
    assert layers["_fc"].units == 1000 and layers["_blocks.10"].shape == (112, 14, 14)
    assert layers["_conv_head"].shape == (1280, 7, 7)


def test_state_dict_files_load_safely(tmp_path, tiny):
    state = tiny.module.state_dict()
    torch.save(state, tmp_path / "w.pth")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        loaded = load_state_dict(tmp_path / f)
        assert all(torch.equal(loaded[k], state[k]) for k in state)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(MfvError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pth")
    with pytest.raises(MfvError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")


def test_torch_export_file_is_unflattened_so_layers_can_be_hooked(tmp_path, tiny):
    """A `.pt2` program (torch.export, the current convention) loads with its module tree:
    layers are listed, hooks capture inner layers and the penultimate features, gradients
    reach the input, and the outputs equal the original module's."""
    from mfv.models.activations import capture
    from mfv.models.targets import parse_target

    example = torch.rand(2, 3, 32, 32)
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(tiny.module, (example,), dynamic_shapes=(dims,))
    torch.export.save(program, tmp_path / "tiny.pt2")
    model = load_model(str(tmp_path / "tiny.pt2"), preprocess=tiny.preprocess)
    assert model.logits_layer == "fc" and model.source["source"] == "torch.export"
    assert [i.path for i in model.layers()] == [i.path for i in tiny.layers()]
    target = parse_target("fc:2 + conv2:1", model)
    x = torch.rand(3, 3, 40, 40, requires_grad=True)
    with capture(model, [*target.layers, parse_target("penultimate:3", model).terms[0].layer]
                 ) as store:
        logits = model(x)
    assert store["conv2"].shape == (3, 16, 20, 20) and store["fc#in"].shape == (3, 16)
    assert torch.allclose(logits, tiny(x), atol=1e-6)
    logits[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0
    assert model.describe()["parameters"] == tiny.describe()["parameters"]


def test_torchscript_files_are_refused_with_what_to_use_instead(tmp_path, tiny):
    import warnings

    from mfv.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself is deprecated
        scripted = torch.jit.script(tiny.module)
    scripted.save(str(tmp_path / "tiny.pt"))
    with pytest.raises(MfvError, match=r"TorchScript.*torch\.export.*\.pt2"):
        load_model(str(tmp_path / "tiny.pt"))
    with pytest.raises(MfvError, match="TorchScript module"):
        load_model(scripted)
    assert main(["layers", str(tmp_path / "tiny.pt")]) == 2


def test_weights_that_do_not_fit_get_one_line(tmp_path, tiny):
    from safetensors.torch import save_file

    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(MfvError, match="not a readable safetensors file"):
        load_model(type(tiny.module)(), weights=tmp_path / "garbage.safetensors")
    state = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    state["extra.weight"] = state.pop("fc.weight")
    save_file(state, tmp_path / "wrong.safetensors")
    with pytest.raises(MfvError, match=r"missing 1 key\(s\) \(fc\.weight\); unexpected 1 "):
        load_model(type(tiny.module)(), weights=tmp_path / "wrong.safetensors")
    state = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    state["fc.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "shape.safetensors")
    with pytest.raises(MfvError, match=r"fc\.bias is \(7,\), the model expects \(5,\)"):
        load_model(type(tiny.module)(), weights=tmp_path / "shape.safetensors")


def test_unknown_model_and_missing_optional_packages():
    with pytest.raises(MfvError, match="unknown model"):
        load_model("no_such_net")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MfvError, match=r"mfv\[timm\]"):
            load_model("timm:resnet18")


def test_hugging_face_is_switched_offline_while_loading(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE at import: the loader flips its constant too, and
    puts everything back afterwards."""
    import os
    import sys
    import types

    from mfv.models.loading import _offline_hub

    package = types.ModuleType("huggingface_hub")
    constants = types.ModuleType("huggingface_hub.constants")
    constants.HF_HUB_OFFLINE = False
    package.constants = constants
    monkeypatch.setitem(sys.modules, "huggingface_hub", package)
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", constants)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with _offline_hub():
        assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ

"""Load a network for mfv: built-in EfficientNet-Lite, torchvision, timm, files, or any module.

`load_model` returns a `LoadedModel`: the module in eval mode on the chosen device, its
preprocessing, its class names (for classifiers) and the path of its logits layer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from mfv.errors import MfvError
from mfv.models.base import LayerInfo, LoadedModel
from mfv.models.classes import ClassNames, imagenet_classes
from mfv.models.efficientnet_lite import VARIANTS, efficientnet_lite
from mfv.preprocess import Preprocess

BUILTIN = tuple(VARIANTS)
SCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")  # TorchScript files by name
DEFAULT_MODEL = "efficientnet_lite0"


def lite_preprocess(name: str) -> Preprocess:
    """EfficientNet-Lite input: [0,1] scaled by mean 0.5 / std 0.5, bicubic, 0.875 crop."""
    size = VARIANTS[name].resolution
    return Preprocess(input_size=size, resize_size=round(size / 0.875), interpolation="bicubic",
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _last_linear(module: nn.Module) -> str | None:
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def load_model(model: str | nn.Module = DEFAULT_MODEL, device: str | torch.device = "cpu",
               preprocess: Preprocess | None = None, classes: ClassNames | None = None,
               weights: str | os.PathLike | None = None, logits_layer: str | None = None
               ) -> LoadedModel:
    """Load `model` by name (`efficientnet_lite0`, `torchvision:resnet50`, `timm:vit_small...`),
    from a TorchScript file, or wrap an `nn.Module`; `weights` loads a state dict
    (`.safetensors`, or a `.pt/.pth` read with `weights_only=True`) into the architecture."""
    if isinstance(model, nn.Module):
        loaded = LoadedModel(type(model).__name__, model, preprocess or Preprocess(), classes,
                             logits_layer or _last_linear(model), {"source": "module"})
    elif not isinstance(model, str):
        raise MfvError(f"model must be a name, a file or an nn.Module, not {type(model).__name__}")
    elif model in VARIANTS:
        loaded = LoadedModel(model, efficientnet_lite(model), lite_preprocess(model),
                             imagenet_classes(), "_fc", {"source": "builtin"})
    elif Path(model).suffix in SCRIPT_SUFFIXES and Path(model).exists():
        loaded = _torchscript(model, preprocess, classes, logits_layer)
    elif model.startswith(("torchvision:", "tv:")):
        loaded = _torchvision(model.split(":", 1)[1])
    elif model.startswith("timm:"):
        loaded = _timm(model.split(":", 1)[1])
    elif Path(model).suffix in SCRIPT_SUFFIXES or "/" in model:
        raise MfvError(f"model file not found: {model}")
    else:
        known = ", ".join(BUILTIN)
        raise MfvError(f"unknown model {model!r}: use a built-in ({known}), "
                       "'torchvision:NAME', 'timm:NAME', a TorchScript file, or an nn.Module "
                       "from Python")
    if weights is not None:
        loaded.module.load_state_dict(load_state_dict(weights), strict=True)
        loaded.source["weights"] = str(weights)
    if preprocess is not None:
        loaded.preprocess = preprocess
    if classes is not None:
        loaded.classes = classes
    if logits_layer is not None:
        loaded.logits_layer = logits_layer
    loaded.module.eval()
    for parameter in loaded.module.parameters():  # gradients flow to images, never to weights
        parameter.requires_grad_(False)
    return loaded.to(device)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors only: safetensors, or torch.load with weights_only=True (never unpickles)."""
    path = Path(path)
    if not path.exists():
        raise MfvError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MfvError(f"{path} is not a plain state dict that can be read safely "
                       f"(weights_only=True): {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MfvError(f"{path} does not hold a state dict")
    return state


def _torchscript(path: str, preprocess, classes, logits_layer) -> LoadedModel:
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as exc:
        raise MfvError(f"{path} is not a TorchScript archive ({exc}); for a state dict pass "
                       "the architecture as the model and the file as weights") from exc
    return LoadedModel(Path(path).stem, module, preprocess or Preprocess(), classes,
                       logits_layer or _last_linear(module), {"source": "torchscript",
                                                             "file": str(path)})


@contextlib.contextmanager
def _offline_hub():
    """Make Hugging Face fail fast instead of retrying a network that is absent (seen: 30 s of
    retries per file). huggingface_hub reads HF_HUB_OFFLINE once, when it is imported, so its
    constant is switched too while loading."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        from huggingface_hub import constants as hub
    except ImportError:
        hub = None
    hub_offline = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_offline
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torchvision(name: str) -> LoadedModel:
    try:
        import torchvision
    except ImportError as exc:
        raise MfvError("torchvision models need `pip install mfv[torchvision]`") from exc
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as exc:
        raise MfvError(f"torchvision has no model {name!r}") from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        raise MfvError(f"the weights of torchvision:{name} are not in the local cache; fetch "
                       f"{weights.url} into {cached.parent} on a machine with internet access")
    module = torchvision.models.get_model(name, weights=weights)
    t = weights.transforms()
    pre = Preprocess(input_size=t.crop_size[0], resize_size=t.resize_size[0],
                     interpolation=str(t.interpolation.value), mean=tuple(t.mean),
                     std=tuple(t.std))
    cats = weights.meta.get("categories")
    classes = imagenet_classes() if cats and len(cats) == 1000 else (
        ClassNames(tuple(cats)) if cats else None)
    return LoadedModel(f"torchvision:{name}", module, pre, classes, _last_linear(module),
                       {"source": "torchvision", "weights": str(weights)})


def _timm(name: str) -> LoadedModel:
    try:
        import timm
    except ImportError as exc:
        raise MfvError("timm models need `pip install mfv[timm]`") from exc
    try:
        with _offline_hub():
            module = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise MfvError(f"could not load timm:{name} offline ({exc}); download its weights into "
                       "the Hugging Face cache on a machine with internet access") from exc
    cfg = timm.data.resolve_data_config({}, model=module)
    size = cfg["input_size"][-1]
    pre = Preprocess(input_size=size, resize_size=round(size / cfg.get("crop_pct", 0.875)),
                     interpolation=cfg.get("interpolation", "bicubic"), mean=tuple(cfg["mean"]),
                     std=tuple(cfg["std"]))
    classes = imagenet_classes() if getattr(module, "num_classes", 0) == 1000 else None
    return LoadedModel(f"timm:{name}", module, pre, classes, _last_linear(module),
                       {"source": "timm"})


__all__ = ["load_model", "load_state_dict", "LoadedModel", "Preprocess", "LayerInfo",
           "ClassNames", "imagenet_classes", "BUILTIN", "DEFAULT_MODEL"]

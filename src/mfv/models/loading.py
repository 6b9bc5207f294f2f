"""Load a network for mfv: built-in EfficientNet-Lite, torchvision, timm, torch.export files, or
any module.

`load_model` returns a `LoadedModel`: the module in eval mode on the chosen device, its
preprocessing, its class names (for classifiers) and the path of its logits layer. mfv reads inner
layers with forward hooks, so a model must be an `nn.Module` whose submodules are called: a
`torch.export` program (`.pt2`) is unflattened back into its module tree; TorchScript archives
cannot be hooked and are refused with a message saying what to use instead (also when named
`.pt2`: the archive's entries tell). A program must accept any batch size (mfv feeds batches of
one to many images): one exported with a fixed batch dimension is refused before any work, with
how to export it again. Torch's own log output while loading is silenced: a file that cannot be
loaded gives mfv's one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from mfv.core.errors import MfvError
from mfv.data.preprocess import Preprocess
from mfv.models.base import LayerInfo, LoadedModel
from mfv.models.classes import ClassNames, imagenet_classes
from mfv.models.efficientnet_lite import VARIANTS, efficientnet_lite

BUILTIN = tuple(VARIANTS)
SCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")  # TorchScript files by name
EXPORT_SUFFIXES = (".pt2",)  # torch.export.save programs
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_MODEL = "efficientnet_lite0"


def lite_preprocess(name: str) -> Preprocess:
    """EfficientNet-Lite input: [0,1] scaled by mean 0.5 / std 0.5, bicubic, 0.875 crop."""
    size = VARIANTS[name].resolution
    return Preprocess(input_size=size, resize_size=round(size / 0.875), interpolation="bicubic",
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _last_linear(module: nn.Module) -> str | None:
    """The last module with a 2-D weight (a linear layer; in an unflattened torch.export
    program the modules are generic, so the weight's shape tells)."""
    linears = [n for n, m in module.named_modules()
               if isinstance(m, nn.Linear) or (n and _weight_2d(m))]
    return linears[-1] if linears else None


def _weight_2d(module: nn.Module) -> bool:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return weight is not None and weight.dim() == 2


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` → CUDA when available, else Apple's MPS, else the CPU; an explicit device that is
    not there is a clear error."""
    if isinstance(name, torch.device):
        return name
    kind, _, index = str(name).partition(":")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if kind not in DEVICES:
        raise MfvError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else \
                "no CUDA GPU is visible"
            raise MfvError(f"--device {name}: CUDA is not available ({why}); use --device cpu "
                           "or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise MfvError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise MfvError(f"--device {name}: Apple's MPS is not available; use --device cpu or auto")
    return torch.device(str(name))


def load_model(model: str | nn.Module | LoadedModel = DEFAULT_MODEL,
               device: str | torch.device = "cpu", preprocess: Preprocess | None = None,
               classes: ClassNames | None = None, weights: str | os.PathLike | None = None,
               logits_layer: str | None = None) -> LoadedModel:
    """Load `model` by name (`efficientnet_lite0`, `torchvision:resnet50`, `timm:vit_small...`),
    from a `torch.export` file (`.pt2`), or wrap an `nn.Module` (or take a `LoadedModel` as it
    is); `weights` loads a state dict (`.safetensors`, or a `.pt/.pth` read with
    `weights_only=True`) into the architecture. `device` may be `auto`."""
    device = resolve_device(device)
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, torch.jit.ScriptModule):
        raise MfvError(_NO_TORCHSCRIPT.format(what="a TorchScript module"))
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(type(model).__name__, model, preprocess or Preprocess(), classes,
                             logits_layer or _last_linear(model), {"source": "module"})
    elif not isinstance(model, str):
        raise MfvError(f"model must be a name, a file or an nn.Module, not {type(model).__name__}")
    elif model in VARIANTS:
        loaded = LoadedModel(model, efficientnet_lite(model), lite_preprocess(model),
                             imagenet_classes(), "_fc", {"source": "builtin"})
    elif Path(model).suffix in EXPORT_SUFFIXES and Path(model).is_file():
        loaded = _exported(model, preprocess, classes, logits_layer)
    elif Path(model).suffix in SCRIPT_SUFFIXES and Path(model).is_file():
        raise MfvError(_script_message(model))
    elif model.startswith(("torchvision:", "tv:")):
        loaded = _torchvision(model.split(":", 1)[1])
    elif model.startswith("timm:"):
        loaded = _timm(model.split(":", 1)[1])
    elif Path(model).suffix in (*SCRIPT_SUFFIXES, *EXPORT_SUFFIXES) or "/" in model:
        raise MfvError(f"--model: model file not found: {model}")
    else:
        known = ", ".join(BUILTIN)
        raise MfvError(f"--model: unknown model {model!r}; use a built-in ({known}), "
                       "'torchvision:NAME', 'timm:NAME', a torch.export file (.pt2), or an "
                       "nn.Module from Python")
    if weights is not None:
        _load_weights(loaded, weights)
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
        raise MfvError(f"--weights: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise MfvError(f"--weights {path} is not a readable safetensors file: "
                           f"{exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MfvError(f"--weights {path} is not a state dict that can be read safely "
                       f"(torch.load with weights_only=True failed: {type(exc).__name__}); give "
                       "a .safetensors file or one saved with torch.save(model.state_dict(), "
                       "path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MfvError(f"--weights {path} does not hold a state dict")
    return state


_NO_TORCHSCRIPT = ("{what} cannot be used: mfv reads inner layers with forward hooks, which "
                   "TorchScript does not support (and torch deprecates it); save the model with "
                   "torch.export.save(torch.export.export(model, (example,)), 'model.pt2') and "
                   "pass the .pt2 file, or pass the nn.Module itself from Python")


def _script_message(path: str) -> str:
    return _NO_TORCHSCRIPT.format(what=f"--model {path}: this TorchScript file")


def _archive_kind(path: str) -> str | None:
    """What wrote a model file, from its zip entries: "export" (torch.export.save),
    "torchscript" (torch.jit.save), "pickle" (torch.save), "zip" (something else), or None (no
    zip archive: damaged, truncated, or no model at all)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if not infos or min(i.header_offset for i in infos) != 0:  # a zip found inside a cut file
        return None
    names = {info.filename.split("/", 1)[-1] for info in infos}
    if "archive_format" in names:
        return "export"
    if "constants.pkl" in names or any(name.startswith("code/") for name in names):
        return "torchscript"
    return "pickle" if "data.pkl" in names else "zip"


@contextlib.contextmanager
def _quiet_torch():
    """Torch's loggers silenced for the block: a file torch cannot load makes it log its own
    traceback (13-19 lines) before it raises; mfv's message says what matters in one."""
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():  # torch's own loader warns about its internals
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


_DYNAMIC_BATCH = ("export it again with a dynamic batch dimension: torch.export.export(model, "
                  "(torch.rand(2, 3, H, W),), dynamic_shapes=({0: torch.export.Dim('batch')},))")


def _check_batch(program, path: str) -> None:
    """Refuse a program whose inputs do not take batches of any size (mfv feeds one to many
    images at a time): a fixed batch dimension, or a dynamic one that excludes 1 or 2."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in inputs \
            else None
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        batch = value.shape[0]
        if isinstance(batch, int):
            raise MfvError(f"--model {path} was exported with a fixed batch size of {batch} "
                           f"(input {node.name}), but mfv runs batches of images: "
                           + _DYNAMIC_BATCH)
        bounds = program.range_constraints.get(batch.node.expr)  # a lower bound of 2 takes 1 too
        if bounds is not None and bounds.lower > 2:
            raise MfvError(f"--model {path} takes batches of {bounds.lower} to {bounds.upper} "
                           f"images only (input {node.name}), but mfv runs batches of any "
                           f"size: " + _DYNAMIC_BATCH.replace("Dim('batch')",
                                                              "Dim('batch', min=1)"))


def _exported(path: str, preprocess, classes, logits_layer) -> LoadedModel:
    """A `torch.export` program, unflattened into its module tree so layers can be hooked."""
    kind = _archive_kind(path)
    if kind == "torchscript":
        raise MfvError(_script_message(path))
    if kind != "export":
        what = {None: "no complete zip archive (damaged, cut short, or not a model file)",
                "pickle": "a torch.save file", "zip": "a zip archive of something else"}[kind]
        raise MfvError(f"--model {path} is not a torch.export program: it is {what}; save the "
                       "model with torch.export.save(torch.export.export(model, (example,)), "
                       "'model.pt2')")
    try:
        with _quiet_torch():
            program = torch.export.load(path)
            module = torch.export.unflatten(program)
    except Exception as exc:  # a damaged archive, a newer format, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise MfvError(f"--model {path} is not a torch.export program that this torch "
                       f"({torch.__version__}) can load: {type(exc).__name__}: {reason}") \
            from None
    _check_batch(program, path)
    return LoadedModel(Path(path).stem, module, preprocess or Preprocess(), classes,
                       logits_layer or _last_linear(module),
                       {"source": "torch.export", "file": str(path)})


def _load_weights(loaded: LoadedModel, weights: str | os.PathLike) -> None:
    """Load a state dict into the architecture, with a one-line message for wrong keys."""
    state = load_state_dict(weights)
    expected = loaded.module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        parts = [f"missing {len(missing)} key(s) ({few(missing)})" if missing else "",
                 f"unexpected {len(unexpected)} key(s) ({few(unexpected)})" if unexpected else ""]
        raise MfvError(f"--weights {weights} does not fit {loaded.name}: "
                       f"{'; '.join(p for p in parts if p)}")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise MfvError(f"--weights {weights} does not fit {loaded.name}: {len(wrong)} tensor(s) "
                       f"of another shape, e.g. {k} is {tuple(state[k].shape)}, the model "
                       f"expects {tuple(expected[k].shape)}")
    loaded.module.load_state_dict(state, strict=True)
    loaded.source["weights"] = str(weights)


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


__all__ = ["load_model", "load_state_dict", "resolve_device", "LoadedModel", "Preprocess",
           "LayerInfo",
           "ClassNames", "imagenet_classes", "BUILTIN", "DEFAULT_MODEL"]

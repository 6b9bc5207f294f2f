"""A loaded model: the module, its preprocessing, its class names and its addressable layers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from mfv.data.preprocess import Preprocess
from mfv.models.classes import ClassNames

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardsigmoid)


def to_tensor(preprocess: Preprocess, image: Image.Image, policy: str = "crop",
              size: int | None = None) -> torch.Tensor:
    """RGB image → (3, S, S) float tensor in [0, 1], resized as `preprocess` says."""
    return torch.from_numpy(preprocess.to_array(image, policy, size))


@dataclass(frozen=True)
class LayerInfo:
    """One addressable layer: its module path, output shape (without batch) and unit count."""

    path: str
    kind: str
    shape: tuple[int, ...]
    units: int


def units_of(shape: tuple[int, ...]) -> int:
    """Units of an output of shape (C,), (C, H, W) or tokens (N, C)."""
    if len(shape) == 2:
        return shape[1]
    return shape[0] if shape else 1


@dataclass
class LoadedModel:
    """A network ready for mfv: eval mode, on its device, with the preprocessing it expects."""

    name: str
    module: nn.Module
    preprocess: Preprocess
    classes: ClassNames | None = None
    logits_layer: str | None = None
    source: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> LoadedModel:
        self.module.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Forward a [0, 1] RGB batch through the preprocessing and the network."""
        return self.module(self.preprocess.normalize(images))

    def modules(self) -> dict[str, nn.Module]:
        return {name: m for name, m in self.module.named_modules() if name}

    def is_activation(self, path: str) -> bool:
        """Whether the module at `path` is an elementwise activation (ReLU, GELU, ...)."""
        return isinstance(self.module.get_submodule(path), _ACTIVATIONS)

    def next_activation(self, path: str) -> str | None:
        """The activation module registered right after `path` in the same parent, if any."""
        parent_path, _, local = path.rpartition(".")
        parent = self.module.get_submodule(parent_path) if parent_path else self.module
        names = list(parent._modules)
        i = names.index(local)
        if i + 1 < len(names) and isinstance(parent._modules[names[i + 1]], _ACTIVATIONS):
            return f"{parent_path}.{names[i + 1]}" if parent_path else names[i + 1]
        return None

    def input_units(self, path: str) -> int | None:
        """The width of a linear layer's input (the `penultimate` features), else None."""
        layer = self.module.get_submodule(path)
        if isinstance(layer, nn.Linear):
            return layer.in_features
        weight = layer._parameters.get("weight")  # a generic module of a torch.export program
        return int(weight.shape[1]) if weight is not None and weight.dim() == 2 else None

    def fingerprint(self) -> str:
        """A digest of the architecture's parameter names and shapes and of every weight's
        bytes: two models with the same fingerprint compute the same function (for the same
        module code), so stored results can be reused; weights changed in place are noticed."""
        if "fingerprint" not in self._cache:
            h = hashlib.sha256(type(self.module).__name__.encode())
            for name, tensor in self.module.state_dict().items():
                array = tensor.detach().to("cpu").contiguous()
                h.update(f"{name}:{array.dtype}:{tuple(array.shape)};".encode())
                h.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._cache["fingerprint"] = h.hexdigest()
        return self._cache["fingerprint"]

    def layers(self, size: int | None = None) -> list[LayerInfo]:
        """Every named module with the shape of its output for one input of the given size."""
        size = size or self.preprocess.input_size
        if size in self._cache:
            return self._cache[size]
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []

        def record(name: str):
            def hook(_module, _inputs, output):
                if isinstance(output, torch.Tensor) and name not in shapes:
                    shapes[name] = tuple(output.shape[1:])
            return hook

        modules = self.modules()
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(record(name)))
            with torch.inference_mode():
                self(torch.zeros(1, 3, size, size, device=self.device))
        finally:
            for h in handles:
                h.remove()
        infos = [LayerInfo(n, type(modules[n]).__name__, shapes[n], units_of(shapes[n]))
                 for n in modules if n in shapes]
        self._cache[size] = infos
        return infos

    def describe(self) -> dict:
        """What a run records about the model, so it can be reproduced and recognized: name,
        class, parameter count, weights' fingerprint, preprocessing, classifier layer."""
        return {"name": self.name, "class": type(self.module).__name__,
                "parameters": sum(p.numel() for p in self.module.parameters()),
                "fingerprint": self.fingerprint(), "preprocess": self.preprocess.to_dict(),
                "logits_layer": self.logits_layer,
                "num_classes": len(self.classes) if self.classes else None, **self.source}

"""A loaded model: the module, its preprocessing, its class names and its addressable layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torch import nn

from mfv.models.classes import ClassNames

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardsigmoid)
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocess:
    """How a photo becomes the model's input.

    Images travel through mfv as float tensors in [0, 1], RGB, (3, S, S); `normalize` maps them to
    what the network expects (channel order, scale, mean/std) inside the forward pass, so
    activation maximization can work in the image domain and stay differentiable.
    """

    input_size: int = 224
    resize_size: int = 256  # shorter side before the centre crop
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0  # 255.0 for networks fed 0..255 pixels (Caffe style)
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError("channel_order must be 'RGB' or 'BGR'")

    def to_tensor(self, image: Image.Image, policy: str = "crop", size: int | None = None
                  ) -> torch.Tensor:
        """RGB PIL image → (3, S, S) float in [0, 1].

        `crop`: shorter side to `resize_size`, centre crop `input_size` (the evaluation transform);
        `squash`: warp the whole image to S×S (how the paper's 227 px cluster images look).
        """
        size = size or self.input_size
        resample = _RESAMPLE[self.interpolation]
        if policy == "squash":
            image = image.resize((size, size), resample)
        elif policy == "crop":
            short = round(self.resize_size * size / self.input_size)
            w, h = image.size
            scale = short / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), resample)
            left, top = (nw - size) // 2, (nh - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            raise ValueError(f"unknown resize policy {policy!r}: use 'crop' or 'squash'")
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def resized(self, input_size: int) -> Preprocess:
        """The same preprocessing for another input size (the resize keeps its crop ratio)."""
        ratio = self.resize_size / self.input_size
        return replace(self, input_size=input_size, resize_size=round(input_size * ratio))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB batch → the network's input (differentiable, on x's device)."""
        if self.channel_order == "BGR":
            x = x.flip(-3)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        if self.channel_order == "BGR":
            mean, std = mean.flip(0), std.flip(0)
        return (x * self.scale - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)


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
    _layer_cache: dict = field(default_factory=dict, repr=False)

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
        return layer.in_features if isinstance(layer, nn.Linear) else None

    def layers(self, size: int | None = None) -> list[LayerInfo]:
        """Every named module with the shape of its output for one input of the given size."""
        size = size or self.preprocess.input_size
        if size in self._layer_cache:
            return self._layer_cache[size]
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
        self._layer_cache[size] = infos
        return infos

    def describe(self) -> dict:
        """What a run records about the model, so it can be reproduced."""
        return {"name": self.name, "preprocess": self.preprocess.to_dict(),
                "logits_layer": self.logits_layer,
                "num_classes": len(self.classes) if self.classes else None, **self.source}

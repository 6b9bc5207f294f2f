"""The mean amplitude spectrum of the images a run scanned: MACO's fixed Fourier magnitude.

MACO (Fel et al., NeurIPS 2023) fixes a picture's Fourier amplitude to the mean amplitude spectrum
of natural images and optimizes only its phase. Its reference code downloads an ImageNet spectrum;
mfv measures it on the images the scan reads instead: `AmplitudeSpectrum.update` on every batch,
`merge` across shards or chunks, `result` at the end (`state`/`from_state` store it as arrays).

The spectral domain (`spectral_domain`, shared with `mfv.render.maco_param`, which inverts it):

- pixels x in [0, 1] become u = 4 (x - 1/2), the tangent at 0 of the sigmoid that squashes MACO's
  pictures (sigmoid(u) ~ x in the mid-tones), so u is on the scale of the parameterization's
  pre-sigmoid signal and grey (x = 1/2) is u = 0;
- colours are decorrelated with the inverse of Lucid's ImageNet colour matrix (normalized by its
  largest column norm, as `mfv.render.param` does): MACO draws one phase per decorrelated channel
  and recorrelates afterwards, so the amplitude must be measured in that basis (on photos the
  three decorrelated channels have similar energies);
- `torch.fft.rfft2(u, norm="ortho")`: orthonormal, so by Parseval the energy of the spectrum equals
  the energy of the pixels, and one bin's amplitude is per-pixel contrast, independent of the
  image size once resampled in cycles per pixel (`resize_amplitude`): a canvas larger than the
  model's input keeps the per-pixel contrast of the scanned S x S images.

`result()` is MACO's mean amplitude E|X|. A mean amplitude carries less energy than the images
(E|X| <= sqrt(E|X|^2)): on ImageNet photos at 224 px its AC energy is 0.58 of theirs (per-pixel
std 1.16 against 1.53 within a channel). `result("rms")`, sqrt(E|X|^2), has exactly the images'
mean energy (Parseval), so MACO pictures made from it have the natural contrast at the model's
input size (and reproduce start images slightly better: `mfv.render.maco_param`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mfv.core.errors import MfvError
from mfv.data.colour import color_matrix, mix_channels

SIGMOID_SLOPE = 4.0  # 1 / sigmoid'(0): u = 4 (x - 1/2) is the sigmoid's tangent at 0, inverted


def spectral_domain(images: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> the decorrelated, grey-centred signal whose spectrum MACO
    fixes: C^-1 (4 (x - 1/2)), in the images' dtype (float32 at least) and device."""
    dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    gain = color_matrix(dtype, images.device, inverse=True) * SIGMOID_SLOPE
    offset = gain.sum(1) * 0.5  # C^-1 4 (x - 1/2) = (4 C^-1) x - 2 C^-1 1
    return mix_channels(gain, images.to(dtype)) - offset.view(3, 1, 1)


class AmplitudeSpectrum:
    """Streaming mean of |rfft2| (and of its square) of square image batches in the spectral
    domain (module doc).

    State: float64 sums of |X| and |X|^2, each (3, S, S // 2 + 1), on the first batch's device,
    and a count, whatever the number of images; `merge` adds another accumulator's. The FFT runs
    in the batch's precision (float32, or float64 for float64 batches).
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None  # sum of |X|
        self.total_sq: Tensor | None = None  # sum of |X|^2
        self.count = 0

    @property
    def size(self) -> int | None:
        """Side S of the images accumulated so far (None before the first batch)."""
        return None if self.total is None else int(self.total.shape[-2])

    def update(self, batch: Tensor) -> None:
        """Add a (B, 3, S, S) batch of RGB images in [0, 1] (any device and float dtype)."""
        if not isinstance(batch, Tensor) or not batch.is_floating_point() or batch.ndim != 4 \
                or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise MfvError(f"the amplitude spectrum needs float (B, 3, S, S) images in [0, 1], "
                           f"got {shape}")
        if self.size is not None and batch.shape[-1] != self.size:
            raise MfvError(f"the amplitude spectrum accumulates {self.size} px images; got a "
                           f"{batch.shape[-1]} px batch (resize every image to one size)")
        if len(batch) == 0:
            return
        # the FFT in the batch's precision (float32: 4x cheaper than float64, ~4 ms a 224 px
        # image on 2 CPU cores), the sums in float64
        amplitude = torch.fft.rfft2(spectral_domain(batch), norm="ortho").abs()
        self._add(amplitude.sum(0, dtype=torch.float64),
                  (amplitude * amplitude).sum(0, dtype=torch.float64), len(batch))

    def _add(self, total: Tensor, total_sq: Tensor, count: int) -> None:
        if self.total is None or self.total_sq is None:
            self.total, self.total_sq = total.clone(), total_sq.clone()
        else:
            self.total = self.total + total.to(self.total.device)
            self.total_sq = self.total_sq + total_sq.to(self.total_sq.device)
        self.count += count

    def merge(self, other: AmplitudeSpectrum) -> AmplitudeSpectrum:
        """Add `other`'s images to this accumulator (in place; returns self)."""
        if other.total is None or other.total_sq is None:
            return self
        if self.size is not None and other.size != self.size:
            raise MfvError(f"cannot merge amplitude spectra of {other.size} px and {self.size} px "
                           "images")
        self._add(other.total, other.total_sq, other.count)
        return self

    def result(self, kind: str = "mean") -> Tensor:
        """The amplitude spectrum, (3, S, S // 2 + 1) float32 on the CPU: "mean" E|X| (MACO's)
        or "rms" sqrt(E|X|^2) (the images' energy, module doc)."""
        if self.total is None or self.total_sq is None or self.count == 0:
            raise MfvError("no image was accumulated: the amplitude spectrum needs at least one")
        if kind == "mean":
            return (self.total / self.count).float().cpu()
        if kind == "rms":
            return (self.total_sq / self.count).sqrt().float().cpu()
        raise MfvError(f"unknown amplitude kind {kind!r}: use 'mean' or 'rms'")

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to store (e.g. one `.npz` per scan chunk): the float64 sums and the count."""
        if self.total is None or self.total_sq is None:
            raise MfvError("no image was accumulated: nothing to store")
        return {"sum": self.total.cpu().numpy(), "sum_sq": self.total_sq.cpu().numpy(),
                "count": np.asarray(self.count, np.int64)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> AmplitudeSpectrum:
        """The accumulator `state()` was taken from."""
        spectrum = cls()
        total = torch.as_tensor(np.asarray(state["sum"]), dtype=torch.float64)
        total_sq = torch.as_tensor(np.asarray(state["sum_sq"]), dtype=torch.float64)
        if total.ndim != 3 or total.shape[0] != 3 or total.shape[2] != total.shape[1] // 2 + 1 \
                or total_sq.shape != total.shape:
            raise MfvError(f"not an amplitude spectrum state: sums of shape {tuple(total.shape)}"
                           f" and {tuple(total_sq.shape)}")
        spectrum.total, spectrum.total_sq, spectrum.count = total, total_sq, int(state["count"])
        return spectrum


def check_amplitude(amplitude: Tensor) -> None:
    """Raise unless `amplitude` is a (3, N, N // 2 + 1) rfft2 amplitude of square images."""
    if not isinstance(amplitude, Tensor) or amplitude.ndim != 3 or amplitude.shape[0] != 3 \
            or amplitude.shape[2] != amplitude.shape[1] // 2 + 1:
        shape = tuple(amplitude.shape) if isinstance(amplitude, Tensor) else type(amplitude)
        raise MfvError(f"the amplitude must be a (3, S, S // 2 + 1) spectrum (AmplitudeSpectrum."
                       f"result()), got {shape}")


def resize_amplitude(amplitude: Tensor, size: int) -> Tensor:
    """Resample a (3, N, N // 2 + 1) amplitude to a size x size canvas, (3, size, size // 2 + 1).

    Bilinear in cycles per pixel (what MACO's reference code does by resizing its template), the
    rows periodic as the DFT's are (the layout's wrap-around and +-1/2 handled); with the
    orthonormal FFT this keeps the per-pixel contrast (module doc). The same size returns the
    amplitude unchanged.
    """
    check_amplitude(amplitude)
    n = amplitude.shape[-2]
    if size == n:
        return amplitude
    dtype = amplitude.dtype if amplitude.dtype == torch.float64 else torch.float32
    device = amplitude.device
    shifted = torch.fft.fftshift(amplitude.to(dtype), dim=-2)  # row r <-> (r - n // 2) / n
    periodic = torch.cat([shifted, shifted[:, :1]], dim=-2)  # row n: row 0 again, one period on
    fy = torch.fft.fftfreq(size, dtype=torch.float64, device=device)
    fx = torch.fft.rfftfreq(size, dtype=torch.float64, device=device)
    rows = torch.remainder(fy * n + n // 2, n)  # fractional source row, wrapped into [0, n)
    cols = (fx * n).clamp(0, n // 2)
    gy = (2 * rows / n - 1).view(-1, 1).expand(size, len(fx))
    gx = (2 * cols / max(n // 2, 1) - 1).view(1, -1).expand(size, len(fx))
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).to(dtype)
    out = F.grid_sample(periodic.unsqueeze(0), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[0].to(amplitude.dtype)

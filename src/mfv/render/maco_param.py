"""MACO's phase-only image parameterization (Fel et al. 2023): the amplitude is fixed, only the
phase of the (colour-decorrelated) spectrum is a parameter; output (B, 3, M, M) in 0..255.

forward, per sample b:

    phase = mu_b + sigma_b * standardize(p_b)       (standardize: zero mean, unit std over p_b)
    z     = irfft2(A * exp(i phase), norm="ortho")  (A: `mfv.data.spectrum`'s amplitude at M px)
    image = 255 * sigmoid(C z)                      (C: Lucid's colour matrix, `color_matrix`)

With (mu, sigma) = (0, 1) and p ~ N(0, 1) this is the reference code's parameterization and
random start. Two deliberate differences: the reference standardizes z to unit variance because
its downloaded template has an arbitrary scale, while mfv's amplitude has a known one (orthonormal
FFT of the natural images' signal, `mfv.data.spectrum`), so z keeps the natural contrast (per-pixel
std ~1.2 on ImageNet photos, close to the reference's 1) and the amplitude of z *is* A -- exactly so
on every bin except those of the first and (even M) last rfft column, where irfft2 keeps only the
Hermitian part (amplitude <= A). And (mu, sigma) lets a sample start from an image:
`set_image` takes the phase of the image's spectrum (in `mfv.data.spectrum.spectral_domain`) and
sets mu, sigma to its mean and std with p = that phase, so the start phase is reproduced exactly
and a step on p moves the phase as much as for a random start. The amplitude stays the natural one,
so the start image is reproduced only approximately. Measured on 20 ImageNet photos at 224 px with
the mean amplitude of 400 others (pixel correlation over the three channels, PSNR in grey levels;
mean, worst): on a 224 px canvas 0.85, 0.69 and 16.3, 13.7 dB; on MACO's 512 px canvas (start
upsampled bicubically, picture downsampled back) 0.83, 0.52 and 15.4, 11.8 dB; with the "rms"
amplitude 16.7 and 15.6 dB at the same correlations. A random phase correlates ~0 with the photo.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mfv.core.errors import MfvError
from mfv.data.colour import color_matrix, mix_channels
from mfv.data.spectrum import check_amplitude, spectral_domain

STANDARDIZE_EPS = 1e-5  # added to the phase's std, as in the reference code


class MacoImage(nn.Module):
    """Phase-only image: `phase` (B, 3, M, M // 2 + 1) is the raw parameter p (MACO's random
    start is N(0, 1)), `amplitude` (3, M, M // 2 + 1) the fixed magnitude; float32 or float64 as
    the amplitude, on the amplitude's device."""

    def __init__(self, amplitude: Tensor, phase: Tensor) -> None:
        super().__init__()
        check_amplitude(amplitude)
        if not amplitude.is_floating_point():
            raise MfvError("the amplitude must be a floating-point tensor")
        if phase.ndim != 4 or tuple(phase.shape[1:]) != tuple(amplitude.shape):
            raise MfvError(f"phase must be (B, {', '.join(map(str, amplitude.shape))}), got "
                           f"{tuple(phase.shape)}")
        dtype = amplitude.dtype if amplitude.dtype == torch.float64 else torch.float32
        device = amplitude.device
        self.size = int(amplitude.shape[-2])
        self.phase = nn.Parameter(phase.detach().to(device, dtype).clone())
        self.register_buffer("amplitude", amplitude.to(dtype), persistent=False)
        self.register_buffer("mu", torch.zeros(len(phase), dtype=dtype, device=device))
        self.register_buffer("sigma", torch.ones(len(phase), dtype=dtype, device=device))
        self.register_buffer("color", color_matrix(dtype, device), persistent=False)

    def spectral_phase(self) -> Tensor:
        """The phase of the spectrum, mu + sigma * standardize(p), (B, 3, M, M // 2 + 1)."""
        p = self.phase
        mean = p.mean(dim=(1, 2, 3), keepdim=True)
        std = p.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        unit = (p - mean) / (std + STANDARDIZE_EPS)
        return self.mu.view(-1, 1, 1, 1) + self.sigma.view(-1, 1, 1, 1) * unit

    def decorrelated(self) -> Tensor:
        """z = irfft2(A exp(i phase)): the decorrelated signal before colour and sigmoid."""
        phase = self.spectral_phase()
        amplitude = self.amplitude
        spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        return torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")

    def forward(self) -> Tensor:
        z = mix_channels(self.color, self.decorrelated())
        return torch.sigmoid(z) * 255.0

    @torch.no_grad()
    def set_phase(self, phase: Tensor, rows: Sequence[int] | None = None) -> None:
        """Make `spectral_phase()` equal `phase` ((len(rows), 3, M, M // 2 + 1)) for `rows`."""
        index = torch.arange(len(self.phase)) if rows is None else torch.as_tensor(list(rows))
        if tuple(phase.shape) != (len(index), *self.phase.shape[1:]):
            expected = (len(index), *self.phase.shape[1:])
            raise MfvError(f"phase must be {expected}, got {tuple(phase.shape)}")
        index = index.to(self.phase.device)
        phase = phase.to(self.phase.device, self.phase.dtype)
        self.phase[index] = phase
        self.mu[index] = phase.mean(dim=(1, 2, 3))
        self.sigma[index] = phase.std(dim=(1, 2, 3), unbiased=False) + STANDARDIZE_EPS

    def set_image(self, images: Tensor, rows: Sequence[int] | None = None) -> None:
        """Start `rows` from `images` ((len(rows), 3, M, M) in 0..255): their spectrum's phase."""
        count = len(self.phase) if rows is None else len(rows)
        if not isinstance(images, Tensor) or not images.is_floating_point() or \
                tuple(images.shape) != (count, 3, self.size, self.size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise MfvError(f"start images must be float ({count}, 3, {self.size}, {self.size}) "
                           f"in 0..255, got {shape}")
        signal = spectral_domain(images.to(self.phase.device, self.phase.dtype) / 255.0)
        self.set_phase(torch.angle(torch.fft.rfft2(signal, norm="ortho")), rows)

"""Split-Bregman total-variation denoising (isotropic by default), batched: the paper's
``skimage.restoration.denoise_tv_bregman(img_hwc, weight=w, max_num_iter=100, eps=1e-3,
channel_axis=None)`` call on (H, W, 3) 0..255 crops, made fast. Every channel is denoised
independently, but the stopping test ``sqrt(sum(du**2) / (H*W*C)) <= eps`` pools the channels
of an image, as that call does.

Both backends (``backend=``) run skimage's raster-order Gauss-Seidel sweep and stopping test,
so the iterates are skimage's up to rounding, and a sample's result never depends on the batch:

- ``"numba"`` (`kernels`): skimage's kernel compiled, on CPU tensors, one thread per sample (per
  channel for small batches), ``torch.get_num_threads()`` of them;
- ``"torch"`` (`sweep`): the sweep as a causal recursion solved by one FFT pair, on any device
  (on CUDA, the iterations between two stopping tests are replayed as one CUDA graph);
- ``"auto"`` (default): numba on the CPU, torch elsewhere (CUDA, MPS).

What each costs, and the variants measured and not kept (skimage itself, a red-black sweep), is
in docs/benchmarks.md ("TV-Bregman"). Boundaries follow skimage: the virtual row above the image
is image row 1 and the column left of it image column 1 (reflect), the row below / column right
repeat the input's last row / column (edge), all fixed while iterating. Values are in 0..255
because TV denoising is not scale invariant and the paper's weights (0.001 .. 2) were tuned
there; as in skimage, a SMALLER weight smooths MORE (``weight = lambda / 2`` multiplies the
data-fidelity term).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mfv.core.errors import MfvError
from mfv.render.tv.kernels import numba_tv
from mfv.render.tv.sweep import torch_tv

BACKENDS = ("auto", "numba", "torch")

# On the CPU the torch backend takes the batch in chunks of at most this many values per buffer
# (1 MiB in float32): its ~15 buffers then stay in cache; whole batches of 227x227x3 images run
# ~2x slower per image. Chunking changes nothing else, since every sample stops on its own.
_CPU_CHUNK_VALUES = 1 << 18


@torch.no_grad()
def tv_bregman(
    images: Tensor,
    weight: float | Tensor,
    max_iter: int = 100,
    eps: float = 1e-3,
    isotropic: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Denoise a batch of images with split-Bregman TV, like skimage's ``denoise_tv_bregman``.

    Args:
        images: (B, C, H, W) floats in 0..255, any device. H and W must be at least 2.
        weight: data-fidelity weight, a positive scalar or a per-sample tensor of shape (B,).
            Smaller weight = more smoothing.
        max_iter: maximum number of split-Bregman iterations.
        eps: per-sample stopping tolerance on the root-mean-square update, pooled over the
            sample's channels. A sample that has stopped is frozen while the others go on.
        isotropic: isotropic (default, as in the paper) or anisotropic TV.
        backend: ``"auto"``, ``"numba"`` (CPU tensors only) or ``"torch"``; see the module
            docstring.

    Returns:
        The denoised images, same shape, dtype and device as ``images``. Computed in float64
        for float64 input, otherwise in float32. Not differentiable
        (it is a projection step applied between gradient steps, as in the paper), so it runs
        without autograd. Each sample's result does not depend on the rest of the batch.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise MfvError("tv_bregman expects a floating-point tensor of shape (B, C, H, W).")
    b, _, h, w = images.shape
    if h < 2 or w < 2:
        raise MfvError(f"tv_bregman needs images of at least 2x2 pixels, got {h}x{w}.")
    if max_iter < 0:
        raise MfvError(f"max_iter must be >= 0, got {max_iter}.")
    if backend not in BACKENDS:
        raise MfvError(f"unknown TV backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    device = images.device
    if backend == "auto":
        backend = "torch" if device.type != "cpu" else "numba"
    if backend == "numba" and device.type != "cpu":
        raise MfvError(f"the numba TV backend needs CPU tensors, got {device.type}; "
                       "use backend='torch' (or 'auto') on accelerators.")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    wt = _per_sample_weight(weight, b, dtype, device)
    if b == 0 or max_iter == 0:
        return images.clone()
    if backend == "numba":
        out = numba_tv(images.to(dtype), wt.flatten().tolist(), max_iter, eps, isotropic)
    else:
        chunk = max(1, _CPU_CHUNK_VALUES // images[0].numel()) if device.type == "cpu" else b
        out = torch.cat([
            torch_tv(images[s:s + chunk].to(dtype), wt[s:s + chunk], max_iter, eps, isotropic)
            for s in range(0, b, chunk)
        ])
    return out.to(images.dtype)


def _per_sample_weight(weight: float | Tensor | np.ndarray, batch: int, dtype: torch.dtype,
                       device) -> Tensor:
    """Return the weight as a (B, 1, 1, 1) tensor, checking it is positive and finite (a plain
    number is checked before it goes to the device: no device round trip per call)."""
    bad = "TV weight must be positive and finite (smaller weight = more smoothing)."
    if isinstance(weight, (int, float, np.integer, np.floating)):
        if not (math.isfinite(weight) and weight > 0):
            raise MfvError(bad)
        return torch.full((batch, 1, 1, 1), float(weight), dtype=dtype, device=device)
    if not isinstance(weight, Tensor):  # an array or a list: keep its float64 values
        weight = torch.as_tensor(weight, dtype=torch.float64)
    wt = weight.to(dtype=dtype, device=device)
    if wt.ndim == 0:
        wt = wt.expand(batch)
    if wt.shape != (batch,):
        raise MfvError(f"weight must be a scalar or have shape ({batch},), got {tuple(wt.shape)}.")
    if not bool(torch.isfinite(wt).all()) or bool((wt <= 0).any()):
        raise MfvError(bad)
    return wt.reshape(batch, 1, 1, 1)

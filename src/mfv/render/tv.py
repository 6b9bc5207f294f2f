"""Split-Bregman total-variation denoising in torch (isotropic by default), batched.

A faithful port of ``skimage.restoration.denoise_tv_bregman`` as the MFV paper calls it: the
old API on an (H, W, 3) array, which in skimage >= 0.19 is
``denoise_tv_bregman(img_hwc, weight=w, max_num_iter=100, eps=1e-3, channel_axis=None)`` -- one
kernel call in which every channel is denoised independently (2-D TV within a channel) but the
stopping test ``sqrt(sum(du**2) / (H*W*C)) <= eps`` pools all channels of the image. (With
``channel_axis=-1`` skimage stops each channel separately, which differs by up to ~0.3 levels.)

The skimage kernel does one Gauss-Seidel sweep per iteration, in raster order, updating the image
and the split variables ``d``/``b`` pixel by pixel. Unrolled, that sweep is:

1. the ``d``/``b`` update at a pixel reads only values of ``u`` that the sweep has not yet
   overwritten, so it is an elementwise (Jacobi-style) update from the previous ``u``;
2. the new ``u`` then satisfies the causal recursion
   ``u[r, c] = a * (u[r-1, c] + u[r, c-1]) + g[r, c]`` with ``a = lam / (weight + 4 lam) = 2/9``
   and ``g`` built from the previous iterate only. Its solution is the causal convolution of ``g``
   with ``K[i, j] = a**(i+j) * binom(i+j, i)`` whose mass decays like ``(4/9)**(i+j)``; we apply it
   with one zero-padded FFT, truncating the kernel where it is below the working precision.

So every iteration is ~25 whole-tensor ops plus one FFT pair, with the exact same iterates as
skimage up to rounding (float64: ~1e-12 grey levels; float32: ~5e-4). On a CPU this is slower than
skimage's fused Cython loop for a single image (memory-bound elementwise ops); its use is batching
many images on the device where the model runs.

Boundaries follow skimage: the virtual row above the image is image row 1 and the column left of
it is image column 1 (reflect), the row below / column right repeat the last row / column
of the *input* image (edge), and all of them stay fixed while iterating.

Values are in the 0..255 domain because TV denoising is not scale invariant and the paper's weights
(0.001 .. 2) were tuned on 0..255 images. As in skimage, a SMALLER weight smooths MORE
(``weight = lambda / 2`` multiplies the data-fidelity term).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mfv.errors import MfvError

# Kernel of the Gauss-Seidel sweep: u = a * (u_up + u_left) + g, with a = lam / (w + 4 lam).
_GS_COUPLING = 2.0 / 9.0


@torch.no_grad()
def tv_bregman(
    images: Tensor,
    weight: float | Tensor,
    max_iter: int = 100,
    eps: float = 1e-3,
    isotropic: bool = True,
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

    Returns:
        The denoised images, same shape, dtype and device as ``images``. Computed in float64 for
        float64 input, otherwise in float32. Not differentiable (it is a projection step applied
        between gradient steps, as in the paper), so it runs without autograd.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise MfvError("tv_bregman expects a floating-point tensor of shape (B, C, H, W).")
    b, _, h, w = images.shape
    if h < 2 or w < 2:
        raise MfvError(f"tv_bregman needs images of at least 2x2 pixels, got {h}x{w}.")
    if max_iter < 0:
        raise MfvError(f"max_iter must be >= 0, got {max_iter}.")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    wt = _per_sample_weight(weight, b, dtype, images.device)
    if b == 0 or max_iter == 0:
        return images.clone()

    f = images.to(dtype)
    lam = 2.0 * wt
    norm = wt + 4.0 * lam
    coupling = lam / norm

    # Fixed virtual neighbours below / right of the image (skimage: last input row / column).
    padded = torch.empty(f.shape[:2] + (h + 1, w + 1), dtype=dtype, device=f.device)
    padded[..., :h, w] = f[..., :, w - 1]
    padded[..., h, :w] = f[..., h - 1, :]
    padded[..., h, w] = 0.0
    padded[..., :h, :w] = f
    u = padded[..., :h, :w]
    u_down = padded[..., 1:, :w]
    u_right = padded[..., :h, 1:]

    # Constant part of g: data term plus the fixed virtual neighbours above / left of the image.
    const = wt * f
    const[..., 0, :] += lam[..., 0, :] * f[..., 1, :]
    const[..., :, 0] += lam[..., 0, :] * f[..., :, 1]
    const = const / norm

    solver = _CausalSolver(f.shape, dtype, f.device)
    bx = torch.zeros_like(f)
    by = torch.zeros_like(f)
    p = torch.zeros_like(f)  # p = dx - bx
    q = torch.zeros_like(f)  # q = dy - by
    active = torch.ones(b, dtype=torch.bool, device=f.device)
    inv_lam = 1.0 / lam
    for _ in range(max_iter):
        tx = torch.sub(u_right, u).add_(bx)  # forward differences plus Bregman variable
        ty = torch.sub(u_down, u).add_(by)
        if isotropic:
            # d = t * s*lam / (s*lam + 1) with s = |(tx, ty)|, so b_new = t - d = t / (1 + s*lam).
            shrink = torch.addcmul(tx * tx, ty, ty).sqrt_().mul_(lam).add_(1.0).reciprocal_()
            bx = tx * shrink
            by = ty * shrink
        else:
            # d = soft-threshold(t, 1/lam), so b_new = t - d = clamp(t, -1/lam, 1/lam).
            bx = torch.clamp(tx, -inv_lam, inv_lam)
            by = torch.clamp(ty, -inv_lam, inv_lam)
        p_new = tx.add_(bx, alpha=-2.0)  # dx - bx = (t - b) - b
        q_new = ty.add_(by, alpha=-2.0)

        # Gauss-Seidel right-hand side: old u below/right, new d - b left/above, old d - b here.
        acc = u_down + u_right
        acc.sub_(p).sub_(q)
        acc[..., :, 1:] += p_new[..., :, :-1]
        acc[..., 1:, :] += q_new[..., :-1, :]
        p, q = p_new, q_new
        torch.addcmul(const, acc, coupling, out=solver.rhs)
        u_new = solver.solve()

        diff = u_new - u
        rmse = torch.linalg.vector_norm(diff, dim=(1, 2, 3)) / math.sqrt(diff[0].numel())
        if bool(active.all()):
            u.copy_(u_new)
        else:  # samples that already met the stopping test stay frozen
            u.copy_(torch.where(active.view(b, 1, 1, 1), u_new, u))
        active &= rmse > eps
        if not bool(active.any()):
            break
    return u.to(images.dtype).contiguous()


def _per_sample_weight(weight: float | Tensor, batch: int, dtype: torch.dtype, device) -> Tensor:
    """Return the weight as a (B, 1, 1, 1) tensor, checking it is positive and finite."""
    wt = torch.as_tensor(weight, dtype=dtype, device=device)
    if wt.ndim == 0:
        wt = wt.expand(batch)
    if wt.shape != (batch,):
        raise MfvError(f"weight must be a scalar or have shape ({batch},), got {tuple(wt.shape)}.")
    if not bool(torch.isfinite(wt).all()) or bool((wt <= 0).any()):
        raise MfvError("TV weight must be positive and finite (smaller weight = more smoothing).")
    return wt.view(batch, 1, 1, 1)


class _CausalSolver:
    """Solve u[r, c] = a * (u[r-1, c] + u[r, c-1]) + g[r, c] (zero outside) with one FFT.

    The solution is g convolved with K[i, j] = a**(i+j) * binom(i+j, i). Summed over a row
    i, K has mass (a / (1 - a))**i / (1 - a) = (2/7)**i * 9/7, so truncating K to
    i, j <= pad leaves a relative error of about (2/7)**(pad+1): pad = 13 for float32 (1e-8),
    32 for float64 (1e-18). Zero padding by at least `pad` makes the circular FFT convolution
    exact for the truncated kernel. Write g into `rhs` (a view of the zero-padded buffer), then
    call `solve()`.
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        h, w = shape[-2:]
        pad = 32 if dtype == torch.float64 else 13
        fh, fw = _fast_len(h + pad), _fast_len(w + pad)
        self.buffer = torch.zeros(shape[:-2] + (fh, fw), dtype=dtype, device=device)
        self.rhs = self.buffer[..., :h, :w]
        i = torch.arange(fh - h + 1, dtype=torch.float64, device=device).view(-1, 1)
        j = torch.arange(fw - w + 1, dtype=torch.float64, device=device).view(1, -1)
        log_k = (
            (i + j) * math.log(_GS_COUPLING)
            + torch.lgamma(i + j + 1)
            - torch.lgamma(i + 1)
            - torch.lgamma(j + 1)
        )
        kernel = torch.zeros(fh, fw, dtype=torch.float64, device=device)
        kernel[: fh - h + 1, : fw - w + 1] = torch.exp(log_k)
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.kernel_f = torch.fft.rfft2(kernel).to(complex_dtype)

    def solve(self) -> Tensor:
        h, w = self.rhs.shape[-2:]
        spec = torch.fft.rfft2(self.buffer).mul_(self.kernel_f)
        return torch.fft.irfft2(spec, s=self.buffer.shape[-2:])[..., :h, :w]


def _fast_len(n: int) -> int:
    """Smallest 2^k * m >= n with m in {1, 3, 5, 9, 15}: sizes pocketfft and cuFFT do fast."""
    best = None
    for m in (1, 3, 5, 9, 15):
        size = m
        while size < n:
            size *= 2
        best = size if best is None else min(best, size)
    return best

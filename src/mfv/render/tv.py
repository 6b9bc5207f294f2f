"""Split-Bregman total-variation denoising (isotropic by default), batched, three ways.

The MFV paper denoises every crop with ``skimage.restoration.denoise_tv_bregman`` on an (H, W, 3)
0..255 float64 array, i.e. in skimage >= 0.19
``denoise_tv_bregman(img_hwc, weight=w, max_num_iter=100, eps=1e-3, channel_axis=None)``: one
kernel call in which every channel is denoised independently (2-D TV within a channel) but the
stopping test ``sqrt(sum(du**2) / (H*W*C)) <= eps`` pools all channels of the image. (With
``channel_axis=-1`` skimage stops each channel separately, which differs by up to ~0.3 levels.)

Backends (``backend=``):

- ``"skimage"``: that very call, per sample, on CPU tensors; samples run in a thread pool of
  ``torch.get_num_threads()`` workers (skimage's kernel releases the GIL).
- ``"torch"``: a torch implementation on the tensor's device, whole batch at once (on the CPU in
  chunks of about one 227x227x3 image, which keeps the working set in cache: ~2x faster per image
  than the whole batch). Its ``method`` chooses the image update of each iteration:

  * ``"exact"``: skimage's own raster-order Gauss-Seidel sweep, so the iterates are skimage's up to
    rounding (float64: ~1e-12 grey levels; float32: ~5e-4). The sweep updates ``d``/``b`` from the
    previous image (elementwise), then the image by the causal recursion
    ``u[r, c] = a * (u[r-1, c] + u[r, c-1]) + g[r, c]`` with ``a = lam / (weight + 4 lam) = 2/9``,
    whose solution is ``g`` convolved with ``K[i, j] = a**(i+j) * binom(i+j, i)``: one FFT pair.
  * ``"fast"``: the same split-Bregman iteration with a red-black (checkerboard) Gauss-Seidel
    sweep: ~30 elementwise ops and no FFT per iteration, and it meets the stopping test in fewer
    iterations than skimage's sweep (e.g. 47-68 instead of 69-100 on a noisy photo). It converges
    to the same image; after the iteration cap it is within 0.02 grey levels (mean absolute
    difference) of skimage on 0..255 photos for every weight 0.001..2 when isotropic. Anisotropic
    TV at weights <= 0.01 often reaches the cap unconverged, where the two sweeps differ by up
    to ~2.6 levels (0.1 at weight 0.3).
- ``"auto"`` (default): ``"skimage"`` on the CPU, ``"torch"`` elsewhere (CUDA, MPS).

Why (``benchmarks/render.py``, 2-core AVX-512 Xeon shared with other jobs, load 4-7; 227x227x3,
10 noisy photos, weights 0.01..2, ms per image, one torch thread): skimage 133, torch ``"fast"``
124 (B=1) / 107 (B=10), torch ``"exact"`` 193 / 196; per iteration skimage ~1.1-1.5 ms, ``"fast"``
~1.3-1.8, ``"exact"`` ~2.0-2.4. So on a CPU torch at best ties skimage's fused loop (each
iteration is ~30 memory-bound passes), and with two torch threads on a busy CPU every op waits at
an OpenMP barrier and torch becomes 2-50x slower (``"exact"`` 0.4-7 s per image), while
skimage's per-sample work degrades gracefully. ``"auto"`` therefore keeps the paper's own kernel
on the CPU, which also makes every sample independent of its batch. On accelerators the torch
port is the only option. On an H200 (same benchmark, B=10) ``"exact"`` takes 2.8 ms per image
(24x skimage) and ``"fast"`` 2.0 ms (34x) at up to 0.016 grey levels from skimage: ``"exact"``
stays the default, faithful to the paper, for a 1.4x difference.
(A plain Jacobi sweep is not offered: with the new ``d - b`` it diverges at weights <= 0.05; with
skimage's mix of old and new values it is stable but needs 44-100 iterations.)

Boundaries follow skimage: the virtual row above the image is image row 1 and the column left of
it is image column 1 (reflect), the row below / column right repeat the last row / column
of the *input* image (edge), and all of them stay fixed while iterating.

Values are in the 0..255 domain because TV denoising is not scale invariant and the paper's weights
(0.001 .. 2) were tuned on 0..255 images. As in skimage, a SMALLER weight smooths MORE
(``weight = lambda / 2`` multiplies the data-fidelity term).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from skimage.restoration import denoise_tv_bregman
from torch import Tensor

from mfv.errors import MfvError

METHODS = ("exact", "fast")
BACKENDS = ("auto", "torch", "skimage")

# On the CPU the torch backend takes the batch in chunks of at most this many values per buffer
# (1 MiB in float32): its ~15 buffers then stay in cache; whole batches of 227x227x3 images run
# ~2x slower per image. Chunking changes nothing else, since every sample stops on its own.
_CPU_CHUNK_VALUES = 1 << 18

# On accelerators the stopping test is read back every this many iterations (see _torch_tv).
_ACCELERATOR_CHECK_EVERY = 8

# Kernel of the Gauss-Seidel sweep: u = a * (u_up + u_left) + g, with a = lam / (w + 4 lam).
_GS_COUPLING = 2.0 / 9.0


@torch.no_grad()
def tv_bregman(
    images: Tensor,
    weight: float | Tensor,
    max_iter: int = 100,
    eps: float = 1e-3,
    isotropic: bool = True,
    method: str = "exact",
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
        method: the torch backend's image update, ``"exact"`` (skimage's sweep) or ``"fast"``
            (red-black sweep); see the module docstring. The skimage backend is always exact.
        backend: ``"auto"``, ``"torch"`` or ``"skimage"`` (CPU tensors only); see the module
            docstring for what each costs.

    Returns:
        The denoised images, same shape, dtype and device as ``images``. Computed in float64 by
        skimage and for float64 input, otherwise in float32. Not differentiable (it is a
        projection step applied between gradient steps, as in the paper), so it runs without
        autograd. Each sample's result does not depend on the rest of the batch.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise MfvError("tv_bregman expects a floating-point tensor of shape (B, C, H, W).")
    b, _, h, w = images.shape
    if h < 2 or w < 2:
        raise MfvError(f"tv_bregman needs images of at least 2x2 pixels, got {h}x{w}.")
    if max_iter < 0:
        raise MfvError(f"max_iter must be >= 0, got {max_iter}.")
    if method not in METHODS:
        raise MfvError(f"unknown TV method {method!r}; choose one of {', '.join(METHODS)}.")
    if backend not in BACKENDS:
        raise MfvError(f"unknown TV backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    device = images.device
    if backend == "auto":
        backend = "skimage" if device.type == "cpu" else "torch"
    if backend == "skimage" and device.type != "cpu":
        raise MfvError(f"the skimage TV backend needs CPU tensors, got {device.type}; "
                       "use backend='torch' (or 'auto') on accelerators.")
    dtype = torch.float64 if images.dtype == torch.float64 or backend == "skimage" \
        else torch.float32
    wt = _per_sample_weight(weight, b, dtype, device)
    if b == 0 or max_iter == 0:
        return images.clone()
    if backend == "skimage":
        out = _skimage_tv(images.to(dtype), wt.flatten().tolist(), max_iter, eps, isotropic)
    else:
        chunk = max(1, _CPU_CHUNK_VALUES // images[0].numel()) if device.type == "cpu" else b
        out = torch.cat([
            _torch_tv(images[s:s + chunk].to(dtype), wt[s:s + chunk], max_iter, eps, isotropic,
                      method)
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


def _skimage_tv(images: Tensor, weights: list[float], max_iter: int, eps: float,
                isotropic: bool) -> Tensor:
    """The paper's call on every sample of a CPU float64 batch, in a thread pool."""
    b, c, h, w = images.shape
    arrays = images.detach().permute(0, 2, 3, 1).numpy()

    def one(k: int) -> np.ndarray:
        out = denoise_tv_bregman(arrays[k], weight=weights[k], max_num_iter=max_iter, eps=eps,
                                 isotropic=isotropic, channel_axis=None)
        return out.reshape(h, w, c)  # skimage squeezes a single channel away

    workers = min(b, torch.get_num_threads())
    if workers <= 1:
        outs = [one(k) for k in range(b)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            outs = list(pool.map(one, range(b)))
    return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).contiguous()


def _torch_tv(f: Tensor, wt: Tensor, max_iter: int, eps: float, isotropic: bool,
              method: str, check_every: int | None = None) -> Tensor:
    """Split-Bregman iterations on a (B, C, H, W) batch of float32/float64 images.

    Asking the device whether every sample has stopped waits for it, so on accelerators that
    is asked every `check_every` iterations (samples that stopped are frozen meanwhile: the
    result does not depend on it)."""
    b, c, h, w = f.shape
    lam = 2.0 * wt
    norm = wt + 4.0 * lam
    grid = _padded(f)
    u, _, down, _, right = _neighbours(grid)
    sweep = _ExactSweep(f, wt, lam, norm, down, right) if method == "exact" \
        else _RedBlackSweep(f, wt, lam, norm, grid)

    bx = torch.zeros_like(f)
    by = torch.zeros_like(f)
    # d - b along x / y, with a zero column left / row above the image (skimage keeps d and b
    # zero outside the image), so the left / upper neighbour's value is a plain shifted view.
    p_pad = torch.zeros(b, c, h, w + 1, dtype=f.dtype, device=f.device)
    q_pad = torch.zeros(b, c, h + 1, w, dtype=f.dtype, device=f.device)
    p, q = p_pad[..., 1:], q_pad[..., 1:, :]
    tx, ty, s = torch.empty_like(f), torch.empty_like(f), torch.empty_like(f)
    inv_lam = 1.0 / lam
    active = torch.ones(b, dtype=torch.bool, device=f.device)
    if check_every is None:
        check_every = 1 if f.device.type == "cpu" else _ACCELERATOR_CHECK_EVERY
    for iteration in range(max_iter):
        # d/b update from the previous image: t = forward difference + b, then
        # d = shrink(t), b_new = t - d, and p = d - b_new = t - 2 b_new.
        torch.sub(right, u, out=tx).add_(bx)
        torch.sub(down, u, out=ty).add_(by)
        if isotropic:
            # d = t * s*lam / (s*lam + 1) with s = |(tx, ty)|, so b_new = t / (1 + s*lam).
            torch.mul(tx, tx, out=s).addcmul_(ty, ty).sqrt_().mul_(lam).add_(1.0)
            torch.div(tx, s, out=bx)
            torch.div(ty, s, out=by)
        else:  # d = soft-threshold(t, 1/lam), so b_new = clamp(t, -1/lam, 1/lam).
            torch.clamp(tx, -inv_lam, inv_lam, out=bx)
            torch.clamp(ty, -inv_lam, inv_lam, out=by)
        torch.add(tx, bx, alpha=-2.0, out=p)
        torch.add(ty, by, alpha=-2.0, out=q)

        u_new = sweep(p_pad, q_pad)
        diff = torch.sub(u_new, u, out=s)
        rmse = torch.linalg.vector_norm(diff, dim=(1, 2, 3)) / math.sqrt(c * h * w)
        if iteration == 0:
            u.copy_(u_new)
        else:  # samples that already met the stopping test stay frozen
            u.copy_(torch.where(active.view(b, 1, 1, 1), u_new, u))
        active &= rmse > eps
        if (iteration + 1) % check_every == 0 and not bool(active.any()):
            break
    return u.contiguous()


def _padded(f: Tensor) -> Tensor:
    """(B, C, H+2, W+2) copy of f with skimage's fixed virtual border (corners unused)."""
    h, w = f.shape[-2:]
    grid = torch.zeros(f.shape[:2] + (h + 2, w + 2), dtype=f.dtype, device=f.device)
    grid[..., 1:-1, 1:-1] = f
    grid[..., 0, 1:-1] = f[..., 1, :]  # above: reflect
    grid[..., 1:-1, 0] = f[..., :, 1]  # left: reflect
    grid[..., -1, 1:-1] = f[..., -1, :]  # below: edge
    grid[..., 1:-1, -1] = f[..., :, -1]  # right: edge
    return grid


def _neighbours(grid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Views of a padded grid: the image and its up, down, left, right neighbours."""
    return (grid[..., 1:-1, 1:-1], grid[..., :-2, 1:-1], grid[..., 2:, 1:-1],
            grid[..., 1:-1, :-2], grid[..., 1:-1, 2:])


class _ExactSweep:
    """skimage's raster-order Gauss-Seidel sweep, solved as a causal recursion with one FFT.

    Right-hand side at a pixel: the old image below / right, the new ``d - b`` left / above, the
    old ``d - b`` here (skimage updates them at the pixel right after its image value).
    """

    def __init__(self, f: Tensor, wt: Tensor, lam: Tensor, norm: Tensor, down: Tensor,
                 right: Tensor) -> None:
        self.down, self.right = down, right
        self.coupling = lam / norm
        # Data term plus the fixed virtual neighbours above / left of the image.
        const = wt * f
        const[..., 0, :] += lam[..., 0, :] * f[..., 1, :]
        const[..., :, 0] += lam[..., 0, :] * f[..., :, 1]
        self.const = const / norm
        self.pq_old = torch.zeros_like(f)
        self.acc = torch.empty_like(f)
        self.solver = _CausalSolver(f.shape, f.dtype, f.device)

    def __call__(self, p_pad: Tensor, q_pad: Tensor) -> Tensor:
        acc = torch.add(self.down, self.right, out=self.acc)
        acc.add_(p_pad[..., :-1]).add_(q_pad[..., :-1, :]).sub_(self.pq_old)
        torch.add(p_pad[..., 1:], q_pad[..., 1:, :], out=self.pq_old)
        torch.addcmul(self.const, acc, self.coupling, out=self.solver.rhs)
        return self.solver.solve()


class _RedBlackSweep:
    """One red-black Gauss-Seidel sweep: red pixels ((row + col) even) from the old image, then
    black ones from the new red ones, each a Jacobi update restricted to its colour. The
    right-hand side uses the new ``d - b`` everywhere (with skimage's mix of old and new values
    the checkerboard ordering diverges at small weights)."""

    def __init__(self, f: Tensor, wt: Tensor, lam: Tensor, norm: Tensor, grid: Tensor) -> None:
        h, w = f.shape[-2:]
        self.grid = grid
        self.half = grid.clone()  # same fixed border; its interior gets the red-updated image
        self.coupling = lam / norm
        self.data = wt * f / norm
        rows = torch.arange(h, device=f.device).view(-1, 1)
        cols = torch.arange(w, device=f.device).view(1, -1)
        red = (rows + cols) % 2 == 0
        self.red, self.black = red.to(f.dtype), (~red).to(f.dtype)  # lerp weights: exact 0 / 1
        self.base, self.acc, self.new = (torch.empty_like(f) for _ in range(3))

    def _relax(self, grid: Tensor) -> Tensor:
        """Jacobi update of every pixel from the image in `grid` (into self.new)."""
        _, up, down, left, right = _neighbours(grid)
        torch.add(up, down, out=self.acc).add_(left).add_(right)
        return torch.addcmul(self.base, self.acc, self.coupling, out=self.new)

    def __call__(self, p_pad: Tensor, q_pad: Tensor) -> Tensor:
        div = torch.sub(p_pad[..., :-1], p_pad[..., 1:], out=self.acc)
        div.add_(q_pad[..., :-1, :]).sub_(q_pad[..., 1:, :])
        torch.addcmul(self.data, div, self.coupling, out=self.base)
        half = self.half[..., 1:-1, 1:-1]
        torch.lerp(self.grid[..., 1:-1, 1:-1], self._relax(self.grid), self.red, out=half)
        return half.lerp_(self._relax(self.half), self.black)


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

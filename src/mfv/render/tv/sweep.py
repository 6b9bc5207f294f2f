"""The torch backend of `tv_bregman`: skimage's raster-order sweep as a causal recursion solved
with one FFT pair, on any device, whole batches at once."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

# On accelerators the stopping test is read back every this many iterations (see torch_tv).
_ACCELERATOR_CHECK_EVERY = 8

# On CUDA those iterations run as one captured CUDA graph (see _Graphed); the benchmarks turn
# it off to time the plain loop beside it.
_GRAPHS_ON_CUDA = True

# Kernel of the Gauss-Seidel sweep: u = a * (u_up + u_left) + g, with a = lam / (w + 4 lam).
_GS_COUPLING = 2.0 / 9.0


def torch_tv(f: Tensor, wt: Tensor, max_iter: int, eps: float, isotropic: bool,
              check_every: int | None = None, sweep: type | None = None,
              graphs: bool | None = None) -> Tensor:
    """Split-Bregman iterations on a (B, C, H, W) batch of float32/float64 images, the image
    updated by `sweep(f, wt, lam, norm, grid)` (default `_ExactSweep`, skimage's; the benchmarks
    try others).

    Asking the device whether every sample has stopped waits for it, so on accelerators that
    is asked every `check_every` iterations (samples that stopped are frozen meanwhile: the
    result does not depend on it). With `graphs` (default: on CUDA) those `check_every`
    iterations, ~20 small kernels each, are launched as one CUDA graph: the same kernels on the
    same buffers, without the launch gaps that dominate at the render loop's batch sizes."""
    b, c, h, w = f.shape
    lam = 2.0 * wt
    norm = wt + 4.0 * lam
    grid = _padded(f)
    u, _, down, _, right = _neighbours(grid)
    update = (sweep or _ExactSweep)(f, wt, lam, norm, grid)

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

    def iterate() -> None:
        """One iteration, in place on the buffers above (so a CUDA graph can replay it)."""
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

        u_new = update(p_pad, q_pad)
        diff = torch.sub(u_new, u, out=s)
        rmse = torch.linalg.vector_norm(diff, dim=(1, 2, 3)) / math.sqrt(c * h * w)
        # samples that already met the stopping test stay frozen (all are active at first)
        u.copy_(torch.where(active.view(b, 1, 1, 1), u_new, u))
        active.logical_and_(rmse > eps)

    if check_every is None:
        check_every = 1 if f.device.type == "cpu" else _ACCELERATOR_CHECK_EVERY
    if graphs is None:
        graphs = f.device.type == "cuda" and _GRAPHS_ON_CUDA
    chunk = (_Graphed(iterate, check_every, f.device) if graphs
             else _Repeated(iterate, check_every))
    done = 0
    while done + check_every <= max_iter:
        chunk()
        done += check_every
        if not bool(active.any()):
            return u.contiguous()
    for _ in range(max_iter - done):
        iterate()
    return u.contiguous()


class _Repeated:
    """`n` calls of `fn`."""

    def __init__(self, fn: Callable[[], None], n: int) -> None:
        self.fn, self.n = fn, n

    def __call__(self) -> None:
        for _ in range(self.n):
            self.fn()


class _Graphed(_Repeated):
    """`n` calls of `fn`, replayed as one CUDA graph after the first call. The first call runs
    them for real on a side stream (capture needs a warm-up: cuFFT plans, the allocator) and
    then captures them there; capture records without running, so every call advances `n`
    iterations. `capture_begin` is called directly: `torch.cuda.graph` would also synchronize
    and empty the allocator's cache, costs paid again at every solve. If capture fails (an op
    CUDA graphs cannot hold), the iterations run plainly instead."""

    def __init__(self, fn: Callable[[], None], n: int, device: torch.device) -> None:
        super().__init__(fn, n)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.plain = False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.plain:
            super().__call__()
        else:
            self._warm_up_and_capture()

    def _warm_up_and_capture(self) -> None:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                super().__call__()
                try:
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        super().__call__()
                    finally:
                        graph.capture_end()
                except RuntimeError as error:
                    warnings.warn("TV-Bregman runs without CUDA graphs: capture failed "
                                  f"({error})", RuntimeWarning, stacklevel=3)
                    self.plain = True
                    super().__call__()  # the capture ran nothing
                else:
                    self.graph = graph
            torch.cuda.current_stream().wait_stream(side)


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

    def __init__(self, f: Tensor, wt: Tensor, lam: Tensor, norm: Tensor, grid: Tensor) -> None:
        _, _, self.down, _, self.right = _neighbours(grid)
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

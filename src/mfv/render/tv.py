"""Split-Bregman total-variation denoising (isotropic by default), batched, four ways.

The MFV paper denoises every crop with ``skimage.restoration.denoise_tv_bregman`` on an (H, W, 3)
0..255 float64 array, i.e. in skimage >= 0.19
``denoise_tv_bregman(img_hwc, weight=w, max_num_iter=100, eps=1e-3, channel_axis=None)``: one
kernel call in which every channel is denoised independently (2-D TV within a channel) but the
stopping test ``sqrt(sum(du**2) / (H*W*C)) <= eps`` pools all channels of the image. (With
``channel_axis=-1`` skimage stops each channel separately, which differs by up to ~0.3 levels.)

Backends (``backend=``):

- ``"numba"``: skimage's kernel (its raster-order Gauss-Seidel sweep and stopping test),
  compiled by numba, on CPU tensors: float64 iterates equal skimage's to rounding (~1e-12 grey
  levels), float32 ones within 2e-5 (mean) / 2e-4 (max) levels. Samples run in a thread pool of
  ``torch.get_num_threads()`` workers; a batch smaller than that runs every channel as its own
  chain of sweeps (the pooled stopping test couples them only near convergence; see
  ``_ChannelRun``), so even one image keeps two cores busy. The result never depends on the
  batch or the thread count, bit for bit. Threads rather than numba's ``parallel=True``: numba's
  OpenMP layer kills a forked child that uses it, and its workqueue layer aborts when two
  threads call in at once. The kernels compile on the first call (a few seconds per dtype) into
  numba's on-disk cache (next to this file, or numba's user cache directory), which later
  processes load in under a second; without a writable cache directory every process compiles.
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
- ``"auto"`` (default): ``"numba"`` on the CPU (``"skimage"`` where numba is not installed),
  ``"torch"`` elsewhere (CUDA, MPS).

Why (``benchmarks/tv.py``, 2-core AMD EPYC (Zen 3, AVX2) shared with other jobs, load 3-5, so
run-to-run noise is up to +-40%; 227x227x3, 10 noisy photos, weights 0.01..2, ms per image, three
runs): skimage's loop takes 90-190 (~1.3-1.6 ms per iteration). numba float32: 17-33 with one
thread (~0.3 ms per iteration; 4-8x skimage), with two threads 11-21 at B=10 (6-10x) and 13-27
at B=1 (5-8x; channel chains); float64: 24-54 with one thread, 18-50 with two (2.6-6x). Each row
of the numba sweep is one vectorised loop (the d/b update and all of the new image but the left
neighbour: ~10 loads, 6 stores per pixel) and a recursion of 2 dependent operations per pixel,
where skimage's scalar loop chains ~11 from the left neighbour; float32 halves the memory traffic
and makes the square root and division cheap. The kernels compile on a process's first call
when numba's cache is empty (2-4 s for the first dtype, 1-3 s for the second) and load from it
in 0.4-0.9 s (first dtype; second 0.05 s). On the CPU torch at best ties skimage (``"exact"``
130-230, ``"fast"`` 54-111: each iteration is ~30 memory-bound passes), and with two torch
threads on a busy CPU every op waits at an OpenMP barrier and torch becomes up to ~10x slower
(``"exact"`` 0.12-1.6 s per image), while per-sample threads degrade gracefully. ``"auto"``
therefore takes numba on the CPU. On accelerators the torch port is the only option. On an H200
(``benchmarks/render.py``, B=10) ``"exact"`` takes 2.8 ms per image (24x skimage) and
``"fast"`` 2.0 ms (34x) at up to 0.016 grey levels from skimage: ``"exact"`` stays the default,
faithful to the paper, for a 1.4x difference.
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
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from skimage.restoration import denoise_tv_bregman
from torch import Tensor

from mfv.core.errors import MfvError

try:
    import numba
except ImportError:  # optional: without it "auto" uses skimage on the CPU
    numba = None

METHODS = ("exact", "fast")
BACKENDS = ("auto", "numba", "torch", "skimage")

# On the CPU the torch backend takes the batch in chunks of at most this many values per buffer
# (1 MiB in float32): its ~15 buffers then stay in cache; whole batches of 227x227x3 images run
# ~2x slower per image. Chunking changes nothing else, since every sample stops on its own.
_CPU_CHUNK_VALUES = 1 << 18

# On accelerators the stopping test is read back every this many iterations (see _torch_tv).
_ACCELERATOR_CHECK_EVERY = 8

# Kernel of the Gauss-Seidel sweep: u = a * (u_up + u_left) + g, with a = lam / (w + 4 lam).
_GS_COUPLING = 2.0 / 9.0


def _jit(**options):
    """numba.njit (nogil, no division checks) for the kernels below; None without numba.

    Compiled code is cached on disk (next to this file, or in numba's user cache directory);
    where no cache directory is writable, each process compiles on its first call instead."""
    def wrap(fn):
        if numba is None:
            return None
        options.update(nogil=True, error_model="numpy")
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # numba found no writable cache location
            return numba.njit(**options)(fn)
    return wrap


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
            (red-black sweep); see the module docstring. The numba and skimage backends are
            always exact.
        backend: ``"auto"``, ``"numba"`` or ``"skimage"`` (CPU tensors only), or ``"torch"``;
            see the module docstring for what each costs.

    Returns:
        The denoised images, same shape, dtype and device as ``images``. Computed in float64 by
        skimage and for float64 input, otherwise in float32 (numba, torch). Not differentiable
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
    if method not in METHODS:
        raise MfvError(f"unknown TV method {method!r}; choose one of {', '.join(METHODS)}.")
    if backend not in BACKENDS:
        raise MfvError(f"unknown TV backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    device = images.device
    if backend == "auto":
        backend = "torch" if device.type != "cpu" else "numba" if numba else "skimage"
    if backend in ("skimage", "numba") and device.type != "cpu":
        raise MfvError(f"the {backend} TV backend needs CPU tensors, got {device.type}; "
                       "use backend='torch' (or 'auto') on accelerators.")
    if backend == "numba" and numba is None:
        raise MfvError("the numba TV backend needs the numba package (pip install numba); "
                       "backend='auto' uses skimage without it.")
    dtype = torch.float64 if images.dtype == torch.float64 or backend == "skimage" \
        else torch.float32
    wt = _per_sample_weight(weight, b, dtype, device)
    if b == 0 or max_iter == 0:
        return images.clone()
    if backend == "skimage":
        out = _skimage_tv(images.to(dtype), wt.flatten().tolist(), max_iter, eps, isotropic)
    elif backend == "numba":
        out = _numba_tv(images.to(dtype), wt.flatten().tolist(), max_iter, eps, isotropic)
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

    outs = _in_threads(one, range(b), min(b, torch.get_num_threads()))
    return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).contiguous()


def _numba_tv(images: Tensor, weights: list[float], max_iter: int, eps: float,
              isotropic: bool) -> Tensor:
    """The numba backend on a CPU float32/float64 batch: one thread per sample, or, when the
    batch is smaller than the thread budget, one per channel. A sample's state exists only
    while its thread works on it (3 MB / 6 MB for a float32 / float64 227x227x3 image)."""
    x = images.detach().contiguous().numpy()
    b, c, h, w = x.shape
    out = np.empty_like(x)
    count = float(c * h * w)
    threads = max(1, torch.get_num_threads())
    if b < threads and c > 1:
        states = [_nb_state(x[k], weights[k]) for k in range(b)]
        _ChannelRun(states, max_iter, eps, isotropic, count).run(min(b * c, threads))
        for k, (state, _) in enumerate(states):
            out[k] = state[:, 0, 1:-1, 1:-1]
    else:
        def one(k: int) -> None:
            state, constants = _nb_state(x[k], weights[k])
            _nb_sample(state, *constants, isotropic, max_iter, eps, count)
            out[k] = state[:, 0, 1:-1, 1:-1]

        _in_threads(one, range(b), min(b, threads))
    return torch.from_numpy(out)


def _nb_state(f: np.ndarray, weight: float) -> tuple[np.ndarray, tuple]:
    """A sample's (C, 5, H+2, W+2) state (see the kernels below) and its constants
    (a = lam / norm, lam, 1 / lam) in the sample's dtype."""
    c, h, w = f.shape
    dtype = f.dtype.type
    lam = 2.0 * weight
    norm = weight + 4.0 * lam
    state = np.zeros((c, _FIELDS, h + 2, w + 2), f.dtype)
    u = state[:, 0]
    u[:, 1:-1, 1:-1] = f
    u[:, 0, 1:-1] = f[:, 1, :]  # above: reflect
    u[:, 1:-1, 0] = f[:, :, 1]  # left: reflect
    u[:, -1, 1:-1] = f[:, -1, :]  # below: edge
    u[:, 1:-1, -1] = f[:, :, -1]  # right: edge
    np.multiply(f, dtype(weight / norm), out=state[:, 1, 1:-1, 1:-1])
    return state, (dtype(lam / norm), dtype(lam), dtype(1.0 / lam))


def _in_threads(fn, items, workers: int) -> list:
    """fn over items, in a thread pool of `workers` (inline for one)."""
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


class _ChannelRun:
    """Small batches: every channel of every sample is a chain of sweeps, and the workers take
    whichever chain is free, so 3 channels keep 2 cores busy. The sample's pooled stopping test
    couples its channels only near the end: its sum of squared updates is at least each
    channel's own (in floating point too), so a channel whose own rmse exceeds eps goes on
    without waiting, and one whose own rmse meets it waits for the sample's other channels to
    finish the same iteration. If the pooled test then passes, every channel is waiting there;
    otherwise they go on. The stopping iteration, and so the result, is the per-sample
    kernel's, bit for bit."""

    def __init__(self, states: list[tuple[np.ndarray, tuple]], max_iter: int, eps: float,
                 isotropic: bool, count: float) -> None:
        self.states, self.isotropic = states, isotropic
        self.max_iter, self.eps, self.count = max_iter, eps, count
        b, c = len(states), states[0][0].shape[0]
        self.ssq = np.zeros((b, c, max_iter))  # squared update of each channel's iterations
        self.done = np.zeros((b, c), dtype=np.int64)  # iterations each channel has run
        self.ready = deque((k, ch) for k in range(b) for ch in range(c))
        self.waiting: dict[tuple[int, int], list[int]] = {}  # (sample, iteration): channels
        self.left = b * c  # chains not finished
        self.cond = threading.Condition()

    def run(self, workers: int) -> None:
        _in_threads(lambda _: self._work(), range(workers), workers)

    def _work(self) -> None:
        sample = self.states[0][0]
        buffers = np.empty((_ROW_BUFFERS, sample.shape[-1] - 1), sample.dtype)
        while True:
            with self.cond:
                while not self.ready and self.left > 0:
                    self.cond.wait()
                if not self.ready:
                    return
                k, ch = self.ready.popleft()
            try:
                state, constants = self.states[k]
                ssq = _nb_sweep(state[ch], *constants, self.isotropic, buffers)
            except BaseException:
                with self.cond:  # let the other workers stop rather than wait forever
                    self.left = 0
                    self.ready.clear()
                    self.cond.notify_all()
                raise
            with self.cond:
                self._record(k, ch, ssq)
                self.cond.notify_all()

    def _record(self, k: int, ch: int, ssq: float) -> None:
        """Book channel ch of sample k's sweep (under the lock) and decide what comes next."""
        i = int(self.done[k, ch])
        self.ssq[k, ch, i] = ssq
        self.done[k, ch] = i + 1
        if i + 1 == self.max_iter:
            self.left -= 1
        elif math.sqrt(ssq / self.count) > self.eps:
            self.ready.append((k, ch))
        else:
            self.waiting.setdefault((k, i), []).append(ch)
        waiters = self.waiting.get((k, i))
        if waiters and bool((self.done[k] > i).all()):  # the sample's iteration i is complete
            del self.waiting[k, i]
            total = float(self.ssq[k, 0, i])  # summed in channel order, as in _nb_sample
            for other in range(1, self.ssq.shape[1]):
                total += float(self.ssq[k, other, i])
            if math.sqrt(total / self.count) <= self.eps:
                self.left -= len(waiters)
            else:
                self.ready.extend((k, other) for other in waiters)


# ---------------------------------------------------------------------------------------------
# The numba backend: skimage's sweep, compiled, one thread per sample (or per channel).
#
# Every channel of every sample has a state block (5, H+2, W+2): the image u with skimage's
# fixed virtual border, and, inside the border, the data term cf = weight / norm * f, the
# Bregman variables bx, by, and s = px + py, the sum of the old ``d - b`` along x and along y
# (a pixel's update needs only that sum of its own old values, and the new values of its left
# and upper neighbours, which the sweep keeps in row buffers). Rows are swept top to bottom as
# in skimage; within a row, the d/b update and every term of the new image but the left
# neighbour are one vectorised loop, then the causal recursion u[c] = a u[c-1] + h[c] runs as
# four interleaved chains, u[c] = a^4 u[c-4] + H[c]. Indices are unsigned so that numba emits
# no negative-index wraparound (which would keep LLVM from vectorising the loops).

_FIELDS = 5  # u, cf, bx, by, s
_ROW_BUFFERS = 5  # new px (shifted by one), new py of the row above / of this row, h, scratch


@_jit(inline="always")
def _nb_pixel(x, j, o, row, bx0, by0, s0, cf0, npx, above, here, h, a, lam, inv,
              isotropic):  # pragma: no cover - compiled
    """Pixel j of the row at flat offset o: the d/b update from the previous image, then
    h[j] = every term of the pixel's new value except a * (left neighbour + its new px)."""
    one = x.dtype.type(1.0)
    two = x.dtype.type(2.0)
    u1 = np.uint64(1)
    centre = x[o + j]
    t1 = x[o + u1 + j] - centre + x[bx0 + o + j]
    t2 = x[o + row + j] - centre + x[by0 + o + j]
    if isotropic:  # d = t s lam / (s lam + 1) with s = |t|, so b_new = t - d = t / (1 + s lam)
        g = one / (np.sqrt(t1 * t1 + t2 * t2) * lam + one)
        b1 = t1 * g
        b2 = t2 * g
    else:  # d = soft-threshold(t, 1 / lam), so b_new = clamp(t, -1 / lam, 1 / lam)
        b1 = t1 if t1 < inv else inv  # (not min / max: those keep LLVM from vectorising)
        b1 = b1 if b1 > -inv else -inv
        b2 = t2 if t2 < inv else inv
        b2 = b2 if b2 > -inv else -inv
    x[bx0 + o + j] = b1
    x[by0 + o + j] = b2
    p1 = t1 - two * b1  # the new d - b = (t - b_new) - b_new
    p2 = t2 - two * b2
    npx[j + u1] = p1
    here[j] = p2
    h[j] = a * (x[o + row + j] + x[o - row + j] + x[o + u1 + j] + above[j] - x[s0 + o + j]) \
        + x[cf0 + o + j]
    x[s0 + o + j] = p1 + p2


@_jit()
def _nb_sweep(block, a, lam, inv, isotropic, buffers):  # pragma: no cover - compiled
    """One split-Bregman iteration of one channel, in place; returns sum((u_new - u_old)**2).

    block: (5, H+2, W+2) C-contiguous state; buffers: (5, W+1) scratch of the same dtype."""
    height = block.shape[1] - 2
    width = np.uint64(block.shape[2] - 2)
    x = block.ravel()
    u0, u1, u2, u3, u4 = (np.uint64(0), np.uint64(1), np.uint64(2), np.uint64(3),
                          np.uint64(4))
    row = width + u2
    plane = row * np.uint64(height + 2)
    cf0, bx0, by0, s0 = plane, u2 * plane, u3 * plane, u4 * plane
    npx, above, here, h, scratch = buffers[0], buffers[1], buffers[2], buffers[3], buffers[4]
    a2 = a * a
    a4 = a2 * a2
    zero = x.dtype.type(0.0)
    npx[0] = zero  # d - b is zero left of the image and above it
    for j in range(width):
        above[j] = zero
    ssq = 0.0
    for r in range(height):
        o = (np.uint64(r) + u1) * row + u1  # pixel (r, 0) inside the border
        if isotropic:
            for j in range(width):
                _nb_pixel(x, j, o, row, bx0, by0, s0, cf0, npx, above, here, h, a, lam, inv,
                          True)
        else:
            for j in range(width):
                _nb_pixel(x, j, o, row, bx0, by0, s0, cf0, npx, above, here, h, a, lam, inv,
                          False)
        # h[c] += a * (new px of the left neighbour), and a * the fixed left border at c = 0;
        # then H[c] = h[c] + a h[c-1] + a^2 h[c-2] + a^3 h[c-3] in two doubling steps.
        for j in range(width):
            h[j] += a * npx[j]
        h[0] += a * x[o - u1]
        scratch[0] = h[0]
        for j in range(u1, width):
            scratch[j] = h[j] + a * h[j - u1]
        h[1] = scratch[1]
        for j in range(u2, width):
            h[j] = scratch[j] + a2 * scratch[j - u2]
        h[0] = scratch[0]
        v0 = v1 = v2 = v3 = zero  # u[c - 4] of the four chains (zero before the row)
        q0 = q1 = q2 = q3 = 0.0  # their squared updates
        c = u0
        while c + u3 < width:
            v0 = a4 * v0 + h[c]
            v1 = a4 * v1 + h[c + u1]
            v2 = a4 * v2 + h[c + u2]
            v3 = a4 * v3 + h[c + u3]
            d0 = v0 - x[o + c]
            d1 = v1 - x[o + c + u1]
            d2 = v2 - x[o + c + u2]
            d3 = v3 - x[o + c + u3]
            x[o + c] = v0
            x[o + c + u1] = v1
            x[o + c + u2] = v2
            x[o + c + u3] = v3
            q0 += d0 * d0
            q1 += d1 * d1
            q2 += d2 * d2
            q3 += d3 * d3
            c += u4
        if c < width:
            v0 = a4 * v0 + h[c]
            d0 = v0 - x[o + c]
            x[o + c] = v0
            q0 += d0 * d0
        if c + u1 < width:
            v1 = a4 * v1 + h[c + u1]
            d1 = v1 - x[o + c + u1]
            x[o + c + u1] = v1
            q1 += d1 * d1
        if c + u2 < width:
            v2 = a4 * v2 + h[c + u2]
            d2 = v2 - x[o + c + u2]
            x[o + c + u2] = v2
            q2 += d2 * d2
        ssq += (q0 + q1) + (q2 + q3)
        above, here = here, above
    return ssq


@_jit()
def _nb_sample(blocks, a, lam, inv, isotropic, max_iter, eps, count):  # pragma: no cover
    """skimage's loop on one sample, (C, 5, H+2, W+2) in place: sweep every channel, stop once
    sqrt(sum of the channels' squared updates / count) <= eps. Returns the iterations run."""
    buffers = np.empty((_ROW_BUFFERS, blocks.shape[3] - 1), blocks.dtype)
    done = 0
    while done < max_iter:
        total = _nb_sweep(blocks[0], a, lam, inv, isotropic, buffers)
        for k in range(1, blocks.shape[0]):
            total += _nb_sweep(blocks[k], a, lam, inv, isotropic, buffers)
        done += 1
        if np.sqrt(total / count) <= eps:
            break
    return done


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

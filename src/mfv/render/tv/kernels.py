"""The numba backend of `tv_bregman`: skimage's sweep and stopping test, compiled, one thread
per sample (or, for small batches, per channel: `_ChannelRun`). Threads rather than numba's
``parallel=True``: numba's OpenMP layer kills a forked child that uses it, and its workqueue
layer aborts when two threads call in at once. The kernels compile on a process's first call
into numba's on-disk cache (next to this file, or its user cache directory), which later
processes load; without a writable cache directory every process compiles."""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from mfv.core.jit import jit


def numba_tv(images: Tensor, weights: list[float], max_iter: int, eps: float,
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


@jit(inline="always")
def _nb_pixel(x, j, o, offsets, rows, constants, isotropic):  # pragma: no cover - compiled
    """Pixel j of the row at flat offset o: the d/b update from the previous image, then
    h[j] = every term of the pixel's new value except a * (left neighbour + its new px).
    `offsets`: (row, cf0, bx0, by0, s0); `rows`: (npx, above, here, h); `constants`: (a, lam,
    inv) (tuples: inlined, they cost nothing)."""
    row, cf0, bx0, by0, s0 = offsets
    npx, above, here, h = rows
    a, lam, inv = constants
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


@jit()
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
    offsets = (row, plane, u2 * plane, u3 * plane, u4 * plane)  # row, cf0, bx0, by0, s0
    constants = (a, lam, inv)
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
                _nb_pixel(x, j, o, offsets, (npx, above, here, h), constants, True)
        else:
            for j in range(width):
                _nb_pixel(x, j, o, offsets, (npx, above, here, h), constants, False)
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


@jit()
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

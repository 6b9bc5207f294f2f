"""Top-N merging: every unit's N most activating images, in memory units x N, not images x units
(the scan keeps a top-N per chunk, then merges the chunks' tops with `merge_top`).

Order: highest value first, ties to the lower image index (exact, at float32 precision). An entry
with value NaN (an undecodable image) or -inf is never kept; unused slots hold (-inf, -1).

How: each (value, image index) pair is packed into one int64 key whose integer order is that
order: the high 32 bits are the float32 bits mapped to an order-preserving signed integer (-0.0
counted as +0.0), the low 32 bits are `2**31 - 1 - index`, so of two equal values the lower index
has the larger key. Keys of real entries are distinct, so `torch.topk` on the keys of the kept
top plus a new batch is exact with no sort stability to rely on.
"""

from __future__ import annotations

import numpy as np
import torch

from mfv.core.errors import MfvError

INDEX_LIMIT = 2**31  # image indices must lie in 0 .. INDEX_LIMIT - 1 (the key's low 32 bits)
_LOW_MASK = 0xFFFFFFFF
_FLIP = 0x7FFFFFFF


def _key(value: float, index: int) -> int:
    """The key of one (value, index) pair, as a Python int (same packing as `_encode`)."""
    bits = int(np.array(value, np.float32).view(np.int32))
    ordered = bits if bits >= 0 else bits ^ _FLIP
    return (ordered << 32) | (INDEX_LIMIT - 1 - index)


EMPTY_KEY = _key(-np.inf, -1)  # an unused slot, (-inf, -1): below every real entry's key


def _encode(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (value desc, index asc) for float values and int64 indices."""
    v = values.to(torch.float32)
    empty = torch.isnan(v) | (v == -torch.inf) | (indices < 0)
    v = torch.where(empty | (v == 0), torch.zeros_like(v), v)  # -0.0 -> +0.0; empties set below
    bits = v.contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ _FLIP).to(torch.int64)
    keys = (ordered << 32) | (INDEX_LIMIT - 1 - indices.to(torch.int64))
    return keys.masked_fill(empty, EMPTY_KEY)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, indices int64) of keys; an unused slot decodes to (-inf, -1)."""
    indices = INDEX_LIMIT - 1 - (keys & _LOW_MASK)
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ _FLIP)
    return bits.view(torch.float32), indices


def _top_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest keys per row, largest first (padded with empty keys when a row holds
    fewer)."""
    if keys.shape[1] < n:
        pad = torch.full((keys.shape[0], n - keys.shape[1]), EMPTY_KEY, dtype=torch.int64)
        keys = torch.cat([keys, pad], dim=1)
    return torch.topk(keys, n, dim=1, largest=True, sorted=True).values


def merge_top(values: np.ndarray, indices: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row keep the n largest values (ties to the lower image index), best first.

    `values` and `indices` are (T, M); an index of -1 or a value of NaN / -inf marks an empty
    entry, never kept. Rows with fewer than n entries are padded with (-inf, -1). Returns
    (T, n) float32 values and int64 indices. Ties are decided on the float32 values.
    """
    if n < 1:
        raise MfvError(f"n (images kept per unit) must be at least 1, got {n}")
    v = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32))
    i = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64))
    if v.ndim != 2 or v.shape != i.shape:
        raise MfvError(f"values {tuple(v.shape)} and indices {tuple(i.shape)} must be the same "
                       "2-D shape (units x entries)")
    if i.numel() and int(i.max()) >= INDEX_LIMIT:
        raise MfvError(f"image indices must be below {INDEX_LIMIT}, got {int(i.max())}")
    top_v, top_i = _decode(_top_keys(_encode(v, i), n))
    return top_v.numpy().copy(), top_i.numpy().copy()


def peaks_of_top(indices: np.ndarray, candidates: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """(T, n, 2) the peaks (row, column) of the kept image `indices` (T, n), looked up among
    the `candidates` (T, M) whose peaks are `peaks` (T, M, 2); (-1, -1) for an empty slot or
    an image that is no candidate. A top-N scan's peaks follow its values through `merge_top`
    this way."""
    rows = np.arange(candidates.shape[0], dtype=np.int64)[:, None] * (INDEX_LIMIT + 1)
    keys = (candidates.astype(np.int64) + 1 + rows).ravel()
    order = np.argsort(keys, kind="stable")
    want = (indices.astype(np.int64) + 1 + rows).ravel()
    at = order[np.searchsorted(keys[order], want).clip(max=max(len(keys) - 1, 0))]
    if not len(keys):
        return np.full((*indices.shape, 2), -1, peaks.dtype)
    out = peaks.reshape(-1, 2)[at].reshape(*indices.shape, 2).copy()
    out[(indices < 0) | (keys[at] != want).reshape(indices.shape)] = -1  # not a candidate
    return out

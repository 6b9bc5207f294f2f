"""Streaming top-N: every unit's N most activating images, in memory units x N, not images x units.

Order: highest value first, ties to the lower image index (exact, at float32 precision). An entry
with value NaN (an undecodable image) or -inf is never kept; unused slots hold (-inf, -1).

How: each (value, image index) pair is packed into one int64 key whose integer order is that
order: the high 32 bits are the float32 bits mapped to an order-preserving signed integer (-0.0
counted as +0.0), the low 32 bits are `2**31 - 1 - index`, so of two equal values the lower index
has the larger key. Keys of real entries are distinct, so `torch.topk` on the keys of the kept
top plus a new batch is exact with no sort stability to rely on, and the state is the (U, N) key
tensor alone (decoded once, at the end). It stays on the device of the values (CPU or CUDA).
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


def _empty(rows: int, cols: int, device: torch.device | str) -> torch.Tensor:
    return torch.full((rows, cols), EMPTY_KEY, dtype=torch.int64, device=device)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, indices int64) of keys; an unused slot decodes to (-inf, -1)."""
    indices = INDEX_LIMIT - 1 - (keys & _LOW_MASK)
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ _FLIP)
    return bits.view(torch.float32), indices


def _top_keys(keys: torch.Tensor, n: int, sort: bool) -> torch.Tensor:
    """The n largest keys per row (padded with empty keys when a row holds fewer)."""
    if keys.shape[1] < n:
        keys = torch.cat([keys, _empty(keys.shape[0], n - keys.shape[1], keys.device)], dim=1)
    return torch.topk(keys, n, dim=1, largest=True, sorted=sort).values


def _check_indices(indices: torch.Tensor) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= INDEX_LIMIT):
        raise MfvError(f"image indices must lie in 0..{INDEX_LIMIT - 1}, got "
                       f"{int(indices.min())}..{int(indices.max())}")


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
    top_v, top_i = _decode(_top_keys(_encode(v, i), n, sort=True))
    return top_v.numpy().copy(), top_i.numpy().copy()


class StreamingTopN:
    """Keep each unit's top-n images by activation over a stream of batches.

    `update(values (B, U), indices (B,))` adds a batch: row b holds the U units' activations on
    image `indices[b]` (a global image index); NaN rows (undecodable images) are ignored. The
    state is a (U, n) int64 key tensor plus a (U,) running minimum, on `device` or else on the
    device of the first batch; an update needs U x (n + B) keys of scratch. Shards built over
    disjoint images combine with `merge`, in any order, to the single-stream result.
    """

    def __init__(self, units: int, n: int, device: torch.device | str | None = None) -> None:
        if units < 1 or n < 1:
            raise MfvError(f"StreamingTopN needs units >= 1 and n >= 1, got {units} and {n}")
        self.units = int(units)
        self.n = int(n)
        self._keys: torch.Tensor | None = None
        self._min: torch.Tensor | None = None
        if device is not None:
            self._init_state(torch.device(device))

    def _init_state(self, device: torch.device) -> None:
        self._keys = _empty(self.units, self.n, device)
        self._min = torch.full((self.units,), torch.inf, dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device | None:
        return None if self._keys is None else self._keys.device

    @property
    def nbytes(self) -> int:
        """Bytes held between updates (constant: it never grows with the number of images)."""
        if self._keys is None:
            return 0
        return self._keys.element_size() * self._keys.numel() + 4 * self.units

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Add one batch: `values` (B, U) activations, `indices` (B,) global image indices."""
        if values.ndim != 2 or values.shape[1] != self.units:
            raise MfvError(f"values must be (batch, {self.units}), got {tuple(values.shape)}")
        indices = torch.as_tensor(indices)
        if indices.shape != (values.shape[0],):
            raise MfvError(f"indices must be ({values.shape[0]},), got {tuple(indices.shape)}")
        if values.shape[0] == 0:
            return
        _check_indices(indices)
        if self._keys is None:
            self._init_state(values.device)
        values = values.detach().to(self.device, torch.float32)
        indices = indices.to(self.device, torch.int64)
        keys = _encode(values, indices[:, None].expand_as(values)).T
        self._keys = _top_keys(torch.cat([self._keys, keys], dim=1), self.n, sort=False)
        finite = torch.where(torch.isnan(values) | (values == -torch.inf), torch.inf, values)
        self._min = torch.minimum(self._min, finite.amin(dim=0))

    def merge(self, other: StreamingTopN) -> None:
        """Fold in a shard's state (built over other images) in place."""
        if (other.units, other.n) != (self.units, self.n):
            raise MfvError(f"cannot merge a top-{other.n} of {other.units} units into a "
                           f"top-{self.n} of {self.units} units")
        if other._keys is None:
            return
        if self._keys is None:
            self._init_state(other.device)
        self._keys = _top_keys(torch.cat([self._keys, other._keys.to(self.device)], dim=1),
                               self.n, sort=False)
        self._min = torch.minimum(self._min, other._min.to(self.device))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(values (U, n) float32, indices (U, n) int64), best first, padded with (-inf, -1)."""
        keys = self._keys if self._keys is not None else _empty(self.units, self.n, "cpu")
        values, indices = _decode(torch.sort(keys, dim=1, descending=True).values)
        return values.cpu().numpy().copy(), indices.cpu().numpy().copy()

    def minimum(self) -> np.ndarray:
        """(U,) float32 smallest value seen per unit (+inf before any), ignoring NaN and -inf.

        The floor of MonoScore's min-max activation scaling (`mono_score(act_min=...)`).
        """
        if self._min is None:
            return np.full(self.units, np.inf, np.float32)
        return self._min.cpu().numpy().copy()

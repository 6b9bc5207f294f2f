"""`merge_top` equals a brute-force top-N over all images, merged at once or chunk by chunk."""

from __future__ import annotations

import numpy as np
import pytest

from mfv.core.errors import MfvError
from mfv.scan.topn import merge_top


def _data(n_images: int, units: int, seed: int) -> np.ndarray:
    """(images, units) activations with many exact ties, NaN rows and a few NaN cells, +-0."""
    rng = np.random.default_rng(seed)
    acts = rng.integers(-4, 6, (n_images, units)).astype(np.float32) / 2  # 10 levels: many ties
    acts[rng.random(acts.shape) < 0.05] = np.nan
    acts[rng.choice(n_images, n_images // 10, replace=False)] = np.nan  # undecodable images
    acts[acts == 0] = np.where(rng.random(int((acts == 0).sum())) < 0.5, -0.0, 0.0)
    acts[0, 0] = np.inf
    return acts


def _brute(acts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: argsort over all finite values, highest first, ties to the lower image index."""
    units = acts.shape[1]
    values = np.full((units, n), -np.inf, np.float32)
    indices = np.full((units, n), -1, np.int64)
    for u in range(units):
        col = acts[:, u]
        keep = np.flatnonzero(~np.isnan(col))
        order = keep[np.lexsort((keep, -col[keep]))][:n]
        values[u, : order.size] = col[order]
        indices[u, : order.size] = order
    return values, indices


def _assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_merge_top_equals_brute_force_and_chunked_merges():
    acts = _data(250, 11, seed=5)
    rows = np.arange(250)
    want = _brute(acts, 30)
    _assert_same(merge_top(acts.T, np.broadcast_to(rows, acts.T.shape), 30), want)
    # scan's two-level use: a top per chunk (padded with -inf/-1), then a top over the chunks
    chunks = [merge_top(acts[c].T, np.broadcast_to(c, (11, c.size)), 30)
              for c in np.array_split(rows, 9)]
    merged = merge_top(np.concatenate([v for v, _ in chunks], 1),
                       np.concatenate([i for _, i in chunks], 1), 30)
    _assert_same(merged, want)


def test_too_few_images_pads_and_nan_is_never_kept():
    acts = np.array([[1.0, np.nan], [np.nan, np.nan], [1.0, 2.0]], np.float32)
    values, indices = merge_top(acts.T, np.broadcast_to([10, 11, 5], (2, 3)), 4)
    inf = np.inf
    np.testing.assert_array_equal(values, [[1, 1, -inf, -inf], [2, -inf, -inf, -inf]])
    np.testing.assert_array_equal(indices, [[5, 10, -1, -1], [5, -1, -1, -1]])


def test_signed_zeros_are_one_value_tied_by_index():
    acts = np.zeros((60, 4), np.float32)
    acts[np.random.default_rng(0).random(acts.shape) < 0.5] = -0.0
    assert np.signbit(acts[:10]).any() and not np.signbit(acts[:10]).all()
    rows = np.random.default_rng(1).permutation(60)
    _, indices = merge_top(acts[rows].T, np.broadcast_to(rows, (4, 60)), 10)
    np.testing.assert_array_equal(indices, np.tile(np.arange(10), (4, 1)))
    _, indices = merge_top(acts.T, np.broadcast_to(np.arange(60), (4, 60)), 10)
    np.testing.assert_array_equal(indices, np.tile(np.arange(10), (4, 1)))


def test_bad_input_is_a_clear_error():
    with pytest.raises(MfvError, match="at least 1"):
        merge_top(np.ones((2, 3)), np.zeros((2, 3)), 0)
    with pytest.raises(MfvError, match="same 2-D shape"):
        merge_top(np.ones((2, 3)), np.zeros((2, 4)), 2)
    with pytest.raises(MfvError, match="below"):
        merge_top(np.ones((1, 1)), np.full((1, 1), 2**31), 1)

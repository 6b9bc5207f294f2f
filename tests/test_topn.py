"""Streaming top-N equals a brute-force top-N over all images, in any batch order or shard split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfv.core.errors import MfvError
from mfv.scan.topn import StreamingTopN, merge_top


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


def _stream(acts: np.ndarray, n: int, order: np.ndarray, batch: int) -> StreamingTopN:
    top = StreamingTopN(acts.shape[1], n)
    for s in range(0, order.size, batch):
        rows = order[s : s + batch]
        top.update(torch.from_numpy(acts[rows]), torch.from_numpy(rows))
    return top


def _assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("n", [1, 7, 40])
def test_stream_equals_brute_force_for_batch_orders(n):
    acts = _data(300, 23, seed=n)
    want = _brute(acts, n)
    rng = np.random.default_rng(1)
    orders = [np.arange(300), np.arange(300)[::-1].copy(), rng.permutation(300)]
    for order in orders:
        for batch in (1, 32, 97, 300):
            _assert_same(_stream(acts, n, order, batch).result(), want)


def test_shards_merge_to_the_single_stream_result():
    acts = _data(400, 17, seed=3)
    want = _brute(acts, 25)
    rng = np.random.default_rng(2)
    for n_shards in (2, 3, 5):
        perm = rng.permutation(400)
        shards = [_stream(acts, 25, part, 16) for part in np.array_split(perm, n_shards)]
        for merge_order in (range(n_shards), reversed(range(n_shards))):
            total = StreamingTopN(17, 25)
            for s in merge_order:
                total.merge(shards[s])
            _assert_same(total.result(), want)
            assert total.minimum().tolist() == np.nanmin(acts, axis=0).tolist()


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
    _assert_same(merged, _stream(acts, 30, rows, 50).result())


def test_too_few_images_pads_and_nan_is_never_kept():
    acts = np.array([[1.0, np.nan], [np.nan, np.nan], [1.0, 2.0]], np.float32)
    top = StreamingTopN(2, 4)
    top.update(torch.from_numpy(acts), torch.tensor([10, 11, 5]))
    values, indices = top.result()
    inf = np.inf
    np.testing.assert_array_equal(values, [[1, 1, -inf, -inf], [2, -inf, -inf, -inf]])
    np.testing.assert_array_equal(indices, [[5, 10, -1, -1], [5, -1, -1, -1]])
    v, i = merge_top(acts.T, np.broadcast_to([10, 11, 5], (2, 3)), 4)
    np.testing.assert_array_equal(v, values)
    np.testing.assert_array_equal(i, indices)


def test_signed_zeros_are_one_value_tied_by_index():
    acts = np.zeros((60, 4), np.float32)
    acts[np.random.default_rng(0).random(acts.shape) < 0.5] = -0.0
    assert np.signbit(acts[:10]).any() and not np.signbit(acts[:10]).all()
    rows = np.random.default_rng(1).permutation(60)
    _, indices = _stream(acts, 10, rows, 7).result()
    np.testing.assert_array_equal(indices, np.tile(np.arange(10), (4, 1)))
    _, indices = merge_top(acts.T, np.broadcast_to(np.arange(60), (4, 60)), 10)
    np.testing.assert_array_equal(indices, np.tile(np.arange(10), (4, 1)))


def test_state_never_grows_with_the_number_of_images():
    top = StreamingTopN(50, 8)
    sizes = []
    rng = torch.Generator().manual_seed(0)
    for b in range(40):
        top.update(torch.randn(64, 50, generator=rng), torch.arange(b * 64, (b + 1) * 64))
        sizes.append(top.nbytes)
        assert tuple(top._keys.shape) == (50, 8)
    assert set(sizes) == {50 * 8 * 8 + 50 * 4}
    values, _ = top.result()
    assert np.all(np.diff(values, axis=1) <= 0)  # best first


def test_state_stays_on_the_input_device_and_dtype_is_float32():
    top = StreamingTopN(3, 2)
    top.update(torch.ones(4, 3, dtype=torch.float16), torch.arange(4))
    assert top.device == torch.device("cpu")
    values, indices = top.result()
    np.testing.assert_array_equal(indices, [[0, 1]] * 3)
    assert values.dtype == np.float32


def test_bad_input_is_a_clear_error():
    top = StreamingTopN(3, 2)
    with pytest.raises(MfvError, match="batch, 3"):
        top.update(torch.ones(4, 5), torch.arange(4))
    with pytest.raises(MfvError, match="indices must be"):
        top.update(torch.ones(4, 3), torch.arange(3))
    with pytest.raises(MfvError, match="image indices"):
        top.update(torch.ones(2, 3), torch.tensor([-1, 0]))
    with pytest.raises(MfvError, match="cannot merge"):
        top.merge(StreamingTopN(3, 5))

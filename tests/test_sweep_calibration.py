"""The layer study's calibration and its shared items, without a network: constructed
two-kind units are exactly the top-N of max(a, b), pairs never share many top images, the
calibration finds power where two kinds differ in the embedding and none where they do not,
every distinct crop is listed (and so coded) once, and the sets to measure are built one at a
time."""

from __future__ import annotations

import numpy as np
import pytest

from mfv.runtime.settings import make_settings
from mfv.study.calibration import (
    CALIBRATION_UNITS,
    Unit,
    calibrate,
    calibration_pairs,
    two_kind_unit,
)
from mfv.study.layers import _Tasks
from mfv.study.measures import measure_set
from mfv.study.seen import WHOLE, table, whole_boxes

N = 30


def _unit(unit: int, rows, values) -> Unit:
    return Unit("layer", unit, unit, np.asarray(rows, np.int64), np.asarray(values, float))


def test_a_two_kind_unit_is_the_top_n_of_the_scaled_maximum():
    a = _unit(0, [5, 3, 9, 1], [8.0, 6.0, 4.0, 2.0])  # mean 5
    b = _unit(1, [7, 3, 2, 4], [2.0, 1.5, 0.4, 0.1])  # mean 1
    index = {("layer", 0): np.array([50, 30, 90, 10]), ("layer", 1): np.array([70, 31, 20, 40])}
    chosen, values, kind = two_kind_unit(a, b, index, 4)
    scaled = {50: 1.6, 30: 1.2, 90: 0.8, 10: 0.4, 70: 2.0, 31: 1.5, 20: 0.4, 40: 0.1}
    best = sorted(scaled, key=lambda k: -scaled[k])[:4]
    assert chosen.tolist() == best and np.allclose(values, [scaled[k] for k in best])
    assert kind.tolist() == [1, 0, 1, 0]
    same = {("layer", 0): np.array([1, 2]), ("layer", 1): np.array([2, 3])}  # item 2 twice
    chosen, values, _ = two_kind_unit(_unit(0, [1, 2], [2.0, 1.0]), _unit(1, [2, 3], [3.0, 1.0]),
                                  same, 4)
    assert chosen.tolist() == [2, 1, 3] and np.allclose(values, [1.5, 4 / 3, 0.5])


def test_pairs_share_few_top_images_and_are_seeded():
    rows = [range(0, 10), range(0, 10), range(20, 30), range(40, 50), range(1, 11)]
    units = [_unit(i, list(r), np.linspace(2, 1, 10)) for i, r in enumerate(rows)]
    pairs = calibration_pairs(units, 10, seed=3)
    assert pairs == calibration_pairs(units, 10, seed=3)
    # every pair but those sharing most of their tops (0-1, 0-4, 1-4), each once
    assert sorted((a.unit, b.unit) for a, b in pairs) == [(0, 2), (0, 3), (1, 2), (1, 3),
                                                          (2, 3), (2, 4), (3, 4)]
    many = [_unit(i, [i], [1.0]) for i in range(3 * CALIBRATION_UNITS)]
    drawn = {u.unit for pair in calibration_pairs(many, 1, seed=0) for u in pair}
    assert len(drawn) == CALIBRATION_UNITS and len(calibration_pairs(many, 1, seed=0)) == \
        CALIBRATION_UNITS * (CALIBRATION_UNITS - 1) // 2
    assert drawn != {u.unit for pair in calibration_pairs(many, 1, seed=1) for u in pair}


def _measured(codes, other, chosen, values, seed=0):
    return measure_set((codes[chosen], other[chosen], values, seed, 5, "pca", "x"))


def _layer(separate: bool, seed: int = 0):
    """Six units, each the top of one blob of items (in both the clustering's codes and the
    independent embedding): with `separate`, blobs far apart (two kinds differ), else one blob
    shared by all."""
    rng = np.random.default_rng(seed)
    units, index, docs = [], {}, {}
    codes = rng.normal(size=(6 * N, 20))
    other = rng.normal(size=(6 * N, 16)) * 0.2 + 1.0
    for u in range(6):
        rows = np.arange(u * N, (u + 1) * N)
        if separate:
            other[rows] += rng.normal(size=16) * 3
            codes[rows] += rng.normal(size=20) * 5
        index["layer", u] = rows
        units.append(_unit(u, rows, np.linspace(3, 1, N)))
    for u in units:
        docs[u.unit] = _measured(codes, other, index["layer", u.unit], u.values)
    pairs = calibration_pairs(units, N, seed)
    two = [two_kind_unit(a, b, index, N) for a, b in pairs]
    measured = [_measured(codes, other, c, v) for c, v, _ in two]
    return calibrate(pairs, docs, measured, [k for _, _, k in two], seed)


def test_the_calibration_has_power_only_where_two_kinds_differ():
    seen = _layer(separate=True)
    assert len(seen["pairs"]) == 15 and all(sum(t["split"]) == N for t in seen["two_kind"])
    power = seen["measures"]["polysemanticity"]
    assert power["power"] and power["low"] > 0 and power["two"] > power["one"]
    assert seen["measures"]["separation"]["power"]
    assert all(t["kind_ari"] > 0.9 for t in seen["two_kind"])  # facets split the kinds
    blind = _layer(separate=False)
    assert blind["measures"]["polysemanticity"]["power"] is False
    assert abs(blind["measures"]["polysemanticity"]["difference"]) < 0.05


def test_items_are_listed_once_whoever_sees_them():
    boxes = np.array([[0, 0, 8, 8], [4, 4, 8, 8], [0, 0, 8, 8]])
    items, index = table([np.array([3, 1, 3]), np.array([1, 3]), np.array([2, 2])],
                         [boxes, boxes[[1, 0]], whole_boxes(2)])
    assert len(items) == 3  # (1, b), (2, whole), (3, a): each listed once, however often seen
    assert items.rows.tolist() == [1, 2, 3]
    for rows, box, idx in ((np.array([3, 1, 3]), boxes, index[0]),
                           (np.array([1, 3]), boxes[[1, 0]], index[1])):
        assert items.rows[idx].tolist() == rows.tolist()
        assert items.boxes[idx].tolist() == box.tolist()
    assert index[0][0] == index[0][2] and items.whole[index[2]].all()
    assert (items.boxes[index[2]] == WHOLE).all()


def test_the_sets_to_measure_are_built_when_asked_for_with_their_own_rows():
    codes = np.arange(60, dtype=np.float32).reshape(20, 3)
    embedding = -codes
    missing = [(("unit", "L", 1), "key1", np.array([0, 5, 7]), np.array([3.0, 2.0, 1.0])),
               (("chance", "L", 0), "key2", np.array([1, 2]), None)]
    tasks = _Tasks(codes, embedding, missing, make_settings(seed=3, mean_of=4))
    assert len(tasks) == 2
    first, second = list(tasks)  # iteration stops at its length
    np.testing.assert_array_equal(first[0], codes[[0, 5, 7]])
    np.testing.assert_array_equal(first[1], embedding[[0, 5, 7]])
    assert first[2].tolist() == [3.0, 2.0, 1.0] and first[3:6] == (3, 4, "tsne")
    assert first[-1] == "L:1"
    np.testing.assert_array_equal(second[0], codes[[1, 2]])
    assert second[2] is None and second[-1] == "L: chance set 0"
    with pytest.raises(IndexError):
        tasks[2]

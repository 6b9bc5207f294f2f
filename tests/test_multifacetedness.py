"""Multifacetedness measures: known answers on synthetic facets, chance level, bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest

from mfv.core.errors import MfvError
from mfv.study.calibration import CALIBRATION_UNITS
from mfv.study.measures import (
    bootstrap_ci,
    mono_score,
    pair_bootstrap_ci,
    separation_ratio,
    silhouette,
    unit_measures,
)


def _blobs(sizes: list[int], dim: int, sep: float, seed: int, offset: float = 0.0):
    """Isotropic unit-variance blobs centred at sep * e_c (+ offset on every axis)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = np.zeros((len(sizes), dim))
    centres[np.arange(len(sizes)), np.arange(len(sizes))] = sep
    return centres[labels] + offset + rng.normal(size=(labels.size, dim)), labels


def _unit(sizes: list[int], seed: int, embedding: str = "pca"):
    """A unit whose top images form `sizes` facets, in its codes and in another network's."""
    codes, labels = _blobs(sizes, 64, 12.0, seed)
    other, _ = _blobs(sizes, 32, 10.0, seed + 100)
    acts = np.random.default_rng(seed).uniform(1.0, 2.0, labels.size)
    return unit_measures(codes, other, acts, seed=0, embedding=embedding), labels


# --------------------------------------------------------------------------- definitions


def test_mono_score_is_the_weighted_pairwise_cosine_definition():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 5))
    acts = rng.uniform(-1.0, 3.0, 12)
    for act_min in (None, -2.0):
        lo = acts.min() if act_min is None else act_min
        w = (acts - lo) / (acts.max() - lo)
        num = den = 0.0
        for i in range(12):
            for j in range(12):
                if i != j:
                    cos = emb[i] @ emb[j] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[j])
                    num += w[i] * w[j] * cos
                    den += w[i] * w[j]
        assert mono_score(emb, acts, act_min=act_min) == pytest.approx(num / den, abs=1e-12)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    plain = (sims.sum() - np.trace(sims)) / (12 * 11)
    assert mono_score(emb, None) == pytest.approx(plain, abs=1e-12)


def test_mono_score_known_answers():
    same = np.array([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    assert mono_score(same, np.array([1.0, 2.0, 3.0]), act_min=0.0) == pytest.approx(1.0)
    orthogonal = np.eye(3)
    assert mono_score(orthogonal, None) == pytest.approx(0.0)
    # the least activating image gets weight 0 when scaled over the given images only
    mixed = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    acts = np.array([3.0, 2.0, 1.0])
    assert mono_score(mixed, acts) == pytest.approx(1.0)
    w = acts / 3.0  # act_min 0: weights 1, 2/3, 1/3; only pair (0, 1) is similar
    want = w[0] * w[1] / (w[0] * w[1] + w[0] * w[2] + w[1] * w[2])
    assert mono_score(mixed, acts, act_min=0.0) == pytest.approx(want)
    assert np.isnan(mono_score(mixed, np.ones(3)))  # all equal: min-max scaling undefined
    assert np.isnan(mono_score(mixed[:1], None))  # no pair


def test_separation_ratio_known_answers():
    line = np.array([[0.0], [1.0], [10.0], [11.0]])
    assert separation_ratio(line, [0, 0, 1, 1]) == pytest.approx(10.0)  # (10+11+9+10)/4 over 1
    assert separation_ratio(line, [0, 0, 0, 0]) == 1.0  # one facet: no between pairs
    assert separation_ratio(line, [0, 1, 2, 3]) == 1.0  # singletons: no within pairs
    assert separation_ratio(np.array([[0.0], [0.0], [3.0]]), [0, 0, 1]) == np.inf
    with pytest.raises(MfvError, match="one entry per row"):
        separation_ratio(line, [0, 1])


def test_silhouette_is_nan_unless_two_to_n_minus_one_clusters():
    pts = np.array([[0.0], [0.1], [10.0], [10.1]])
    assert silhouette(pts, [0, 0, 1, 1]) > 0.95
    assert np.isnan(silhouette(pts, [0, 0, 0, 0]))
    assert np.isnan(silhouette(pts, [0, 1, 2, 3]))


# --------------------------------------------------------------------------- units


def test_one_isotropic_blob_is_one_facet_with_low_scores():
    single, _ = _unit([80], seed=1)
    double, _ = _unit([40, 40], seed=1)
    assert single.k == 1 and single.sizes == [80]
    assert np.isnan(single.silhouette)
    assert single.separation == 1.0
    assert single.polysemanticity < 0.35
    assert single.polysemanticity < double.polysemanticity - 0.2


@pytest.mark.parametrize("sizes", [[40, 40], [30, 30, 30], [30, 20, 20, 10]])
def test_separated_blobs_give_the_true_facets_and_high_scores(sizes):
    r, labels = _unit(sizes, seed=len(sizes))
    assert r.k == len(sizes)
    assert r.sizes == sorted(sizes, reverse=True)
    for members in r.members:  # every facet is exactly one true blob
        assert np.unique(labels[members]).size == 1
    assert sorted(np.concatenate(r.members).tolist()) == list(range(labels.size))
    assert r.separation > 1.5
    assert r.silhouette > 0.25
    assert r.polysemanticity > 0.5


def test_tsne_clustering_finds_three_facets_with_a_high_silhouette():
    r, labels = _unit([30, 30, 30], seed=7, embedding="tsne")
    assert r.k == 3
    assert all(np.unique(labels[m]).size == 1 for m in r.members)
    assert r.silhouette > 0.8


def test_seeded_unit_measures_are_identical():
    a, _ = _unit([30, 30], seed=3, embedding="tsne")
    b, _ = _unit([30, 30], seed=3, embedding="tsne")
    assert a.to_dict() == b.to_dict()


def test_unit_measures_rejects_mismatched_rows():
    codes, _ = _blobs([20], 8, 0.0, 0)
    with pytest.raises(MfvError, match="same images"):
        unit_measures(codes, codes[:10], np.ones(20), seed=0, embedding="pca")


# --------------------------------------------------------------------------- chance, CIs


def _draws(pool: int, size: int, repeats: int, seed: int) -> list[np.ndarray]:
    """Random image sets of a unit's size, as the layer study draws its chance sets."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(pool, size, replace=False)) for _ in range(repeats)]


def test_chance_level_of_a_structureless_pool_is_below_a_multifaceted_unit():
    pool_codes, _ = _blobs([300], 64, 0.0, seed=11)
    pool_other, _ = _blobs([300], 32, 0.0, seed=12, offset=2.0)
    acts = np.random.default_rng(0).uniform(1.0, 2.0, 300)
    level = [unit_measures(pool_codes[r], pool_other[r], acts[r], seed=0,
                           embedding="pca").separation for r in _draws(300, 80, 4, seed=0)]
    multifaceted, _ = _unit([40, 40], seed=2)
    assert np.mean(level) < 1.1 and np.std(level) < 0.1
    assert multifaceted.separation > np.mean(level) + 0.5


def test_chance_polysemanticity_of_a_diverse_pool_is_above_a_monofaceted_unit():
    pool, _ = _blobs([100, 100, 100, 100], 32, 10.0, seed=5)
    level = np.mean([1 - mono_score(pool[r]) for r in _draws(400, 80, 10, seed=1)])
    single, _ = _unit([80], seed=4)
    assert level > single.polysemanticity + 0.3


def test_bootstrap_ci_contains_the_mean_narrows_and_is_seeded():
    rng = np.random.default_rng(0)
    few = rng.normal(1.0, 1.0, 20)
    many = rng.normal(1.0, 1.0, 2000)
    m_few, lo_few, hi_few = bootstrap_ci(few)
    m_many, lo_many, hi_many = bootstrap_ci(many)
    assert lo_few < m_few < hi_few and lo_many < m_many < hi_many
    assert m_few == pytest.approx(few.mean())
    assert (hi_many - lo_many) < (hi_few - lo_few) / 5
    assert lo_many < 1.0 < hi_many
    assert bootstrap_ci(few, seed=3) == bootstrap_ci(few, seed=3)
    with_nan = np.concatenate([few, [np.nan, np.nan]])
    assert bootstrap_ci(with_nan)[0] == pytest.approx(few.mean())
    assert all(np.isnan(bootstrap_ci([np.nan, np.nan])))
    wide = bootstrap_ci(few, level=0.99)
    assert wide[1] < lo_few and wide[2] > hi_few
    assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)  # one unit: no spread to resample
    with pytest.raises(MfvError, match="level"):
        bootstrap_ci(few, level=1.0)


def test_the_pair_bootstrap_covers_the_mean_where_pairs_share_units():
    """Values on every pair of the calibration's units that carry the units' own effects
    (d_ab = e_a + e_b + noise): the pairs are not independent, so the plain bootstrap over pairs
    is far too narrow (it holds the true mean, 0, in 45-46 % of draws), while the vertex
    bootstrap's 95 % interval holds it in most (85-89 % with 10 units: still somewhat narrow,
    as docs/sweep.md says)."""
    n = CALIBRATION_UNITS
    ends = np.array([(a, b) for a in range(n) for b in range(a + 1, n)])
    covered = {"vertex": 0, "pairs": 0}
    rng = np.random.default_rng(0)
    for trial in range(200):
        effect = rng.normal(size=n)
        d = effect[ends[:, 0]] + effect[ends[:, 1]] + 0.3 * rng.normal(size=len(ends))
        _, low, high = pair_bootstrap_ci(ends, d, n_boot=400, seed=trial)
        covered["vertex"] += low < 0 < high
        _, low, high = bootstrap_ci(d, n_boot=400, seed=trial)
        covered["pairs"] += low < 0 < high
    assert covered["vertex"] >= 0.8 * 200 and covered["pairs"] <= 0.6 * 200
    mean, low, high = pair_bootstrap_ci(ends + 10, np.where(ends[:, 0] == 0, np.nan, 1.0))
    assert (mean, low, high) == (1.0, 1.0, 1.0)  # NaN pairs left out; any unit labels
    assert pair_bootstrap_ci(ends, d, seed=2) == pair_bootstrap_ci(ends, d, seed=2)
    assert all(np.isnan(pair_bootstrap_ci(ends[:1], [np.nan])))
    with pytest.raises(MfvError, match="pairs"):
        pair_bootstrap_ci(ends, d[:3])

"""The MIS task's pure functions on synthetic embeddings (mfv.evaluate.mis)."""

from __future__ import annotations

import numpy as np
import pytest

from mfv.core.errors import MfvError
from mfv.evaluate import mis


def test_trial_ranks_are_the_published_ones() -> None:
    queries, refs = mis.trial_ranks()
    assert queries.tolist() == list(range(20))
    assert refs.shape == (20, 9)
    assert refs[0].tolist() == [20, 40, 60, 80, 100, 120, 140, 160, 180]
    assert refs[7].tolist() == [27 + 20 * k for k in range(9)]
    # every rank 0..199 is used exactly once: queries and references never share an image
    assert sorted([*queries, *refs.ravel()]) == list(range(200))


def test_natural_trials_take_top_and_bottom_of_the_ranking() -> None:
    acts = np.arange(500, dtype=float)[::-1].copy()  # image i has rank i
    acts[3] = np.nan  # an unreadable image is no rank
    order = mis.ranked(acts)
    assert 3 not in order and order[0] == 0 and order[-1] == 499
    trials = mis.natural_trials(order)
    assert trials.query_pos.tolist() == [0, 1, 2, *range(4, 21)]
    assert trials.query_neg[0] == 499 and trials.query_neg[19] == 480
    assert trials.refs_neg[0, 0] == 479  # 20 ranks from the bottom
    assert not set(trials.refs_pos.ravel()) & set(trials.refs_neg.ravel())
    with pytest.raises(MfvError, match="needs 400"):
        mis.natural_trials(order[:399])
    assert mis.fitting_references(499) == 9 and mis.fitting_references(120) == 2
    assert mis.fitting_references(30) == 0 and "at least 80" in mis.too_few(30)


def test_delta_sign_follows_which_side_the_query_resembles() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    right = mis.Trials(np.array([2]), np.array([3]), np.array([[0]]), np.array([[1]]))
    swapped = mis.Trials(np.array([3]), np.array([2]), np.array([[0]]), np.array([[1]]))
    assert mis.deltas(emb, right)[0] > 0 > mis.deltas(emb, swapped)[0]
    assert mis.deltas(emb, right)[0] == pytest.approx(-mis.deltas(emb, swapped)[0])
    assert mis.score(np.array([0.5, 0.0, -1.0, 2.0])) == 0.5  # a tie is not right
    assert mis.soft_score(np.zeros(3)) == 0.5
    assert mis.soft_score(np.array([10.0]), alpha=1.0) > 0.99


def _planted(n: int, rng: np.random.Generator, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose first coordinate grows with the activation (signal) plus noise."""
    acts = rng.normal(size=n)
    emb = rng.normal(size=(n, 16))
    emb[:, 0] += signal * acts
    return acts, emb


def test_planted_structure_scores_near_one_and_noise_near_chance() -> None:
    rng = np.random.default_rng(0)
    acts, emb = _planted(2000, rng, signal=4.0)
    assert mis.evaluate(emb, mis.natural_trials(mis.ranked(acts)))["mis"] >= 0.95
    scores = []
    for _ in range(20):
        acts, emb = _planted(600, rng, signal=0.0)
        scores.append(mis.evaluate(emb, mis.natural_trials(mis.ranked(acts)))["mis"])
    assert 0.4 < np.mean(scores) < 0.6


def test_synthetic_references_are_shown_in_every_trial() -> None:
    rng = np.random.default_rng(1)
    acts, emb = _planted(500, rng, signal=4.0)
    trials = mis.natural_trials(mis.ranked(acts))
    good = np.vstack([emb, [[5.0, *np.zeros(15)]], [[-5.0, *np.zeros(15)]]])
    synthetic = mis.with_references(trials, np.array([500]), np.array([501]))
    assert synthetic.refs_pos.shape == (20, 1) and (synthetic.refs_pos == 500).all()
    assert (synthetic.query_pos == trials.query_pos).all()
    assert mis.evaluate(good, synthetic)["mis"] >= 0.95
    inverted = mis.with_references(trials, np.array([501]), np.array([500]))
    assert mis.evaluate(good, inverted)["mis"] <= 0.05
    half = mis.with_references(trials, np.array([500]), None)  # natural negative references
    assert (half.refs_neg == trials.refs_neg).all()
    with pytest.raises(MfvError):
        mis.with_references(trials, np.array([], dtype=int), None)


def test_verdict_says_whether_the_pictures_teach_as_much_as_the_photos() -> None:
    assert "teach as much" in mis.verdict(0.9, 0.95, 0.6, "anchored")
    assert "nearly as much" in mis.verdict(0.9, 0.82)
    assert "less than the photos" in mis.verdict(0.9, 0.7, 0.8)
    assert "below random starts" in mis.verdict(0.9, 0.7, 0.8)
    assert "barely teach" in mis.verdict(0.55, 0.5)
    assert mis.verdict(None, 0.5).startswith("no MIS")


def test_negation_spelling_parses_back_and_pairs(tiny) -> None:
    from mfv.models.targets import negated_spec, negation_pairs, parse_target

    for spec in ("conv2:3", "fc:1 - 0.5*fc:2", "penultimate:4"):
        target = parse_target(spec, tiny)
        negation = parse_target(negated_spec(target, tiny.logits_layer), tiny)
        assert [(-t.weight, t.layer, t.unit) for t in target.terms] == \
            [(t.weight, t.layer, t.unit) for t in negation.terms]
        assert negation.class_index is None
    targets = [parse_target(s, tiny) for s in ("conv2:3", "fc:0", "-1*conv2:3")]
    assert negation_pairs(targets, tiny.logits_layer) == {0: 2}

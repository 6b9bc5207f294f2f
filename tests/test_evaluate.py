"""Evaluate: every quality metric on cases whose answer is known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mfv.data.images import load_rgb
from mfv.evaluate.evaluation import (
    Network,
    _centre_and_corners,
    _references,
    _shared_photos,
)
from mfv.evaluate.metrics import (
    activation_ratio,
    centre_dominance,
    class_rank,
    diversity,
    fidelity,
    recovery,
)
from mfv.evaluate.observer import Observer
from mfv.models.activations import capture
from mfv.models.base import to_tensor
from mfv.models.read import channel_means, read_photos
from mfv.models.targets import parse_targets, resolve_layer


# ----------------------------------------------------------------------------- activation ratio
def test_activation_ratio_is_value_over_real_maximum():
    assert activation_ratio(3.0, 4.0) == pytest.approx(0.75)
    assert activation_ratio(8.0, 4.0) == pytest.approx(2.0)  # beyond every real image
    assert activation_ratio(-2.0, 4.0) == pytest.approx(-0.5)
    assert math.isnan(activation_ratio(1.0, 0.0))  # undefined, not infinite
    assert math.isnan(activation_ratio(1.0, float("nan")))


# ----------------------------------------------------------------------------- fidelity
def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three tight clusters of 20 codes in 16-D; returns codes, labels and the true centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 10
    labels = np.repeat(np.arange(3), 20)
    codes = centres[labels] + rng.normal(size=(60, 16)) * 0.5
    return codes, labels, np.stack([codes[labels == c].mean(0) for c in range(3)])


def test_visualization_equal_to_a_facet_member_is_faithful():
    codes, labels, centres = _clusters()
    members = np.stack([codes[np.flatnonzero(labels == c)[5]] for c in range(3)])
    ok, margin = fidelity(members, centres)
    assert ok.dtype == bool and ok.all()
    assert (margin > 0.5).all()  # far nearer its own centre than the others


def test_visualization_equal_to_its_centre_has_margin_one():
    _, _, centres = _clusters()
    ok, margin = fidelity(centres, centres)
    assert ok.all()
    # distance 0 to its own centre, nearest other centre at exactly the separation scale
    np.testing.assert_allclose(margin, 1.0)


def test_visualizations_of_swapped_facets_are_unfaithful():
    _, _, centres = _clusters()
    ok, margin = fidelity(centres[[1, 0, 2]], centres)
    assert ok.tolist() == [False, False, True]
    assert margin[0] < 0 and margin[1] < 0 and margin[2] > 0


def test_fidelity_with_one_facet_is_trivially_true_without_margin():
    ok, margin = fidelity(np.ones((1, 4)), np.zeros((1, 4)))
    assert ok.tolist() == [True] and np.isnan(margin).all()


# ----------------------------------------------------------------------------- diversity
def test_identical_images_have_diversity_zero():
    assert diversity(np.tile(np.arange(1.0, 9.0), (4, 1))) == pytest.approx(0.0, abs=1e-12)


def test_identical_zero_codes_have_diversity_zero():
    assert diversity(np.zeros((3, 5))) == 0.0
    assert diversity(np.array([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(1.0)


def test_diversity_is_mean_pairwise_cosine_distance():
    assert diversity(np.eye(3)) == pytest.approx(1.0)  # orthogonal codes
    assert diversity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)  # opposite
    # pairs (a,b)=1, (a,c)=0, (b,c)=1 -> mean 2/3; and scale does not matter
    codes = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    assert diversity(codes) == pytest.approx(2 / 3)
    assert math.isnan(diversity(np.ones((1, 3))))


def test_identical_images_through_a_network_have_diversity_zero(tiny):
    """The same picture four times gives four equal codes, hence diversity 0; distinct
    pictures do not."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(size=(3, 32, 32))).float()
    targets = parse_targets(["fc:1"], tiny)
    net = Network(tiny, resolve_layer(tiny, "penultimate"))
    read = net.read(image.expand(4, -1, -1, -1), targets)
    codes, values = read["code"], read["values"]
    assert codes.shape == (4, 16) and values.shape == (4, 1)
    assert diversity(codes) == pytest.approx(0.0, abs=1e-6)
    others = torch.from_numpy(rng.uniform(size=(4, 3, 32, 32))).float()
    other_codes = net.read(others, targets)["code"]
    assert diversity(other_codes) > 1e-4


def _photo_files(folder, n: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"p{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(paths[-1])
    return paths


def test_photos_through_a_network_skip_unreadable_files_with_their_reason(tiny, tmp_path):
    paths = _photo_files(tmp_path / "photos", 4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths[1:1] = [str(tmp_path / "broken.png")]
    paths.append(str(tmp_path / "missing.png"))
    code, conv = resolve_layer(tiny, "penultimate"), resolve_layer(tiny, "conv2")
    read = read_photos(tiny, paths, [code, conv], batch_size=2)
    assert read.kept.tolist() == [0, 2, 3, 4]
    assert [i for i, _ in read.bad] == [1, 5] and all(reason for _, reason in read.bad)
    assert read.outputs[0].shape == (4, 16) and read.outputs[1].shape == (4, 16 * 16 * 16)
    photos = torch.stack([to_tensor(tiny.preprocess, load_rgb(paths[i])) for i in read.kept])
    with capture(tiny, [code]) as store:  # one plain pass over the same photos
        tiny(photos)
    np.testing.assert_allclose(read.outputs[0], store[code.key].numpy(), rtol=1e-5, atol=1e-6)
    means = read_photos(tiny, paths, [conv], channel_means).outputs[0]
    np.testing.assert_allclose(means, read.outputs[1].reshape(4, 16, -1).mean(2), atol=1e-6)


def test_photos_decoded_in_threads_read_the_same_as_decoded_in_turn(tiny, tmp_path):
    """Decoding threads (the default on accelerators) change when photos are decoded, not what
    is read: same values, same kept and skipped photos, in order, with odd batch ends."""
    paths = _photo_files(tmp_path / "photos", 7)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths[3:3] = [str(tmp_path / "broken.png")]
    layers = [resolve_layer(tiny, "penultimate"), resolve_layer(tiny, "conv2")]
    plain = read_photos(tiny, paths, layers, batch_size=3, decoders=0)
    threaded = read_photos(tiny, paths, layers, batch_size=3, decoders=2)
    assert threaded.kept.tolist() == plain.kept.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert [i for i, _ in threaded.bad] == [i for i, _ in plain.bad] == [3]
    for a, b in zip(threaded.outputs, plain.outputs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_facet_references_are_the_means_of_each_facets_readable_members(tiny, tmp_path):
    """Each facet's sample read in one pass and split back per facet; a facet none of whose
    photos can be read gets no reference."""
    paths = _photo_files(tmp_path / "photos", 5)
    conv = resolve_layer(tiny, "conv2")
    own = Network(tiny, resolve_layer(tiny, "penultimate"), (conv,))
    members = [paths[:3], [str(tmp_path / "gone.png")], paths[3:]]
    refs = _references(own, [], members, seed=0)
    assert "path" not in refs[1] and all("judge_codes" not in r for r in refs)
    for ref, group in ((refs[0], paths[:3]), (refs[2], paths[3:])):
        want = read_photos(tiny, group, [conv], channel_means).outputs[0].mean(0)
        np.testing.assert_allclose(ref["path"][0], want, rtol=1e-5, atol=1e-6)


def test_judge_codes_from_an_observer_of_the_same_network_are_read_once(tiny, tmp_path):
    """When the observer is the last judge's network and code layer (the default), the judge's
    codes of the facets' photos come from the observer's embeddings — the same values as a
    reading of their own, skipping unreadable photos alike — and the observer keeps them for
    the MIS; another observer layer reads them apart."""
    paths = _photo_files(tmp_path / "photos", 5)
    code = resolve_layer(tiny, "penultimate")
    own, judge = Network(tiny, code), Network(tiny, code)
    members = [paths[:3], [str(tmp_path / "gone.png")], paths[3:]]
    observer = Observer(tiny, code, "tiny penultimate")
    shared = _shared_photos([judge], observer)
    assert shared is not None
    alone = _references(own, [judge], members, seed=0)
    via = _references(own, [judge], members, seed=0, judge_photos=shared)
    assert "judge_codes" not in via[1] and "judge_codes" not in alone[1]
    for a, b in ((alone[0], via[0]), (alone[2], via[2])):
        np.testing.assert_allclose(b["judge_codes"], a["judge_codes"], rtol=1e-5, atol=1e-6)
    assert set(observer._photos) == set(paths) | {str(tmp_path / "gone.png")}
    assert _shared_photos([judge], Observer(tiny, resolve_layer(tiny, "conv2"), "x")) is None
    assert _shared_photos([], observer) is None and _shared_photos([judge], None) is None


# ----------------------------------------------------------------------------- centre dominance
def test_centre_dominance_signs():
    assert centre_dominance(5.0, [0.0, 0.0, 0.0, 0.0]) == pytest.approx(1.0)  # centre only
    assert centre_dominance(0.0, [2.0, 2.0, 2.0, 2.0]) == pytest.approx(-1.0)  # borders only
    assert centre_dominance(3.0, [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.0)  # alike
    assert centre_dominance(0.0, [0.0, 0.0]) == 0.0
    assert 0 < centre_dominance(4.0, [1.0, 2.0, 1.0, 0.0]) < 1  # mean border 1 -> 3/5
    assert centre_dominance(4.0, [1.0, 2.0, 1.0, 0.0]) == pytest.approx(0.6)
    assert -1 < centre_dominance(1.0, [3.0, 3.0, 3.0, 3.0]) < 0


def test_centre_and_corner_crops_cover_the_right_regions():
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 10:30] = 200  # a bright square, exactly the central half
    image[:8, :8, 0] = 100  # a reddish patch in the top-left corner
    crops = _centre_and_corners(image, 16)
    assert len(crops) == 5 and all(c.shape == (16, 16, 3) for c in crops)
    centre, top_left, top_right, bottom_left, bottom_right = crops
    assert centre.mean() == pytest.approx(200, abs=1)
    assert top_left[:4, :4, 0].mean() == pytest.approx(100, abs=2)
    # each corner crop reaches the bright square with its inner quarter only
    for crop, inner, outer in [(top_left, np.s_[-4:, -4:], np.s_[:4, -4:]),
                               (top_right, np.s_[-4:, :4], np.s_[:4, -4:]),
                               (bottom_left, np.s_[:4, -4:], np.s_[-4:, :4]),
                               (bottom_right, np.s_[:4, :4], np.s_[-4:, -4:])]:
        assert crop[inner].mean() == pytest.approx(200, abs=2)
        assert crop[outer].mean() == pytest.approx(0, abs=2)


# ----------------------------------------------------------------------------- facet recovery
def test_a_perfect_clustering_scores_one_whatever_its_label_names():
    truth = np.array([0, 0, 0, 701, 701, 701, 5, 5])
    assignment = np.array([2, 2, 2, 0, 0, 0, 1, 1])  # same partition, other names
    scores = recovery(assignment, truth)
    assert scores == pytest.approx({"ari": 1.0, "nmi": 1.0, "purity": 1.0})


def test_recovery_of_uninformative_and_overfine_clusterings():
    truth = np.array([0] * 6 + [1] * 2)
    one = recovery(np.zeros(8, int), truth)  # everything in one facet
    assert one["ari"] == pytest.approx(0.0) and one["nmi"] == pytest.approx(0.0)
    assert one["purity"] == pytest.approx(0.75)  # the majority class's share
    singletons = recovery(np.arange(8), truth)  # every image its own facet: pure, not recovered
    assert singletons["purity"] == pytest.approx(1.0) and singletons["ari"] < 0.01
    half = recovery(np.array([0, 0, 0, 1, 1, 1, 1, 1]), truth)  # facet 1 mixes 3 and 2
    assert half["purity"] == pytest.approx((3 + 3) / 8)  # majority of each facet
    # by hand: sum C(n_ij,2)=7, clusters 13, classes 16, pairs 28 -> (7-13*16/28)/(14.5-13*16/28)
    assert half["ari"] == pytest.approx((7 - 208 / 28) / (14.5 - 208 / 28))


# ----------------------------------------------------------------------------- class rank
def test_class_rank_is_one_based_per_row():
    logits = np.array([[0.1, 3.0, 2.0, -1.0],
                       [5.0, 1.0, 2.0, 3.0],
                       [1.0, 1.0, 0.0, 0.0]])
    assert class_rank(logits, 2).tolist() == [2, 3, 3]
    assert class_rank(logits, 1).tolist() == [1, 4, 1]  # a tie counts in the class's favour
    assert class_rank(logits, 3).tolist() == [4, 2, 3]

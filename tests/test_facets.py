"""Facets stage core: selection, PCA + t-SNE + k-means clustering, options, storage."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mfv.core.errors import MfvError
from mfv.facets.cluster import distinct_rows
from mfv.facets.find import FacetResult, facet_means, find_facets, mean_image, select_images
from mfv.facets.kmeans import kmeans, silhouette
from mfv.facets.options import FacetOptions
from mfv.facets.tsne import exact_gradient, optimize
from mfv.runtime.rundir import RunDir


def blobs(n: int, k: int, dim: int = 1280, sep: float = 15.0, seed: int = 0):
    """n unit-variance Gaussian codes around k near-orthogonal centres about `sep` apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres *= sep / np.sqrt(2) / np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.arange(n) % k
    rng.shuffle(truth)
    codes = rng.normal(size=(n, dim)) + centres[truth]
    acts = rng.uniform(0.5, 2.0, size=n)
    return codes.astype(np.float32), acts, truth


def facet_labels(result: FacetResult, n_rows: int) -> np.ndarray:
    """Facet rank of every original row (-1 for rows not selected), built from the members."""
    labels = np.full(n_rows, -1)
    for f in result.facets:
        labels[f.members] = f.rank
    return labels


# ----------------------------------------------------------------------------- selection


def test_select_class_top_and_auto():
    acts = np.array([0.5, 3.0, -1.0, 2.0, 0.0, 3.0])
    labels = np.array([1, 2, 1, 2, 2, 0])
    assert select_images(acts, labels, 2, "class").tolist() == [1, 3, 4]
    # top: highest first whatever the sign, ties to the lower index
    assert select_images(acts, None, None, "top", top_n=3).tolist() == [1, 5, 3]
    assert select_images(acts, None, None, "top", top_n=100)[:4].tolist() == [1, 5, 3, 0]
    assert len(select_images(acts, None, None, "top", top_n=100)) == np.isfinite(acts).sum()
    assert select_images(acts, labels, 1, "auto").tolist() == [0, 2]
    # auto falls back to top when the class has no images or there are no labels
    assert select_images(acts, labels, 7, "auto", top_n=2).tolist() == [1, 5]
    assert select_images(acts, None, 1, "auto", top_n=2).tolist() == [1, 5]


def test_a_target_negative_everywhere_is_ranked_by_value_with_a_warning(caplog):
    acts = np.array([-3.0, -1.0, -2.0, np.nan])
    assert select_images(acts, None, None, "top", top_n=2, name="unit 7").tolist() == [1, 2]
    assert "every activation of unit 7 is <= 0" in caplog.text


def test_select_errors_name_the_target():
    with pytest.raises(MfvError, match="no activation of unit 7 is a number"):
        select_images(np.full(3, np.nan), None, None, "top", name="unit 7")
    with pytest.raises(MfvError, match="no image has the class of tench"):
        select_images(np.ones(3), np.array([1, 1, 2]), 0, "class", name="tench")
    with pytest.raises(MfvError, match="needs image labels"):
        select_images(np.ones(3), None, 0, "class")
    with pytest.raises(MfvError, match="unknown selection policy"):
        select_images(np.ones(3), None, None, "best")


# ----------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("k_true", [2, 3])
def test_recovers_blobs_with_true_k_and_auto_k(k_true):
    codes, acts, truth = blobs(300, k_true)
    fixed = find_facets(codes, acts, options=FacetOptions(k=k_true, seed=0))
    assert len(fixed.facets) == k_true
    assert adjusted_rand_score(truth, facet_labels(fixed, 300)) >= 0.95

    auto = find_facets(codes, acts, options=FacetOptions(k="auto", seed=0))
    assert auto.k_chosen == k_true
    assert len(auto.facets) == k_true
    assert sorted(auto.scores) == list(range(2, 11))
    assert max(auto.scores, key=auto.scores.get) == k_true
    assert adjusted_rand_score(truth, facet_labels(auto, 300)) >= 0.95


def test_members_are_original_indices_and_ranked_by_size():
    codes, acts, truth = blobs(400, 3, dim=256, seed=1)
    rng = np.random.default_rng(2)
    # an uneven subset, in shuffled order: 120 of blob 0, 60 of blob 1, 30 of blob 2
    idx = np.concatenate([np.flatnonzero(truth == c)[:s] for c, s in [(0, 120), (1, 60), (2, 30)]])
    rng.shuffle(idx)
    res = find_facets(codes, acts, idx, FacetOptions(k=3, m=15, embedding="pca", seed=0))
    assert np.array_equal(res.selected, idx)
    assert [f.size for f in res.facets] == [120, 60, 30]
    assert [f.rank for f in res.facets] == [0, 1, 2]
    for f in res.facets:
        assert np.unique(truth[f.members]).size == 1  # members index the original list
        assert np.all(np.isin(f.representatives, f.members))
        assert f.code_centre.shape == (256,)
        np.testing.assert_allclose(f.code_centre, codes[f.members].mean(0), rtol=1e-5, atol=1e-5)
        assert f.activation_max == pytest.approx(acts[f.members].max())
        assert f.activation_mean == pytest.approx(acts[f.members].mean())
    assert res.coords_2d.shape == (210, 2)
    assert np.array_equal(facet_labels(res, 400)[idx], res.assignment)


def test_representatives_are_nearest_the_centre_and_small_facets_give_all():
    codes, acts, truth = blobs(110, 2, dim=128, seed=3)
    idx = np.concatenate([np.flatnonzero(truth == 0), np.flatnonzero(truth == 1)[:20]])
    first = find_facets(codes, acts, idx, FacetOptions(k=2, seed=0, tsne_iter=500))
    small_size = min(f.size for f in first.facets)
    m = small_size + 1  # m only picks representatives; the clustering does not depend on it
    res = find_facets(codes, acts, idx, FacetOptions(k=2, m=m, seed=0, tsne_iter=500))
    big, small = res.facets
    assert big.size > m > small.size
    assert set(small.representatives.tolist()) == set(small.members.tolist())
    for f in res.facets:
        rows = np.flatnonzero(res.assignment == f.rank)
        np.testing.assert_allclose(f.centre_2d, res.coords_2d[rows].mean(0))
        dist = np.linalg.norm(res.coords_2d[rows] - f.centre_2d, axis=1)
        expected = res.selected[rows[np.argsort(dist, kind="stable")[:m]]]
        assert len(f.representatives) == min(m, f.size)
        assert np.array_equal(f.representatives, expected)  # nearest first


def test_deterministic_for_same_seed():
    codes, acts, _ = blobs(150, 3, dim=200, seed=4)
    a = find_facets(codes, acts, options=FacetOptions(k="auto", seed=5, tsne_iter=500))
    b = find_facets(codes, acts, options=FacetOptions(k="auto", seed=5, tsne_iter=500))
    assert np.array_equal(a.coords_2d, b.coords_2d)
    assert np.array_equal(a.assignment, b.assignment)
    assert a.scores == b.scores
    for fa, fb in zip(a.facets, b.facets, strict=True):
        assert np.array_equal(fa.members, fb.members)
        assert np.array_equal(fa.representatives, fb.representatives)
    c = find_facets(codes, acts, options=FacetOptions(k="auto", seed=6, tsne_iter=500))
    assert not np.array_equal(a.coords_2d, c.coords_2d)  # the seed is really used


# ----------------------------------------------------------------------------- options


def test_merge_collapses_near_duplicates_of_one_blob():
    codes, acts, _ = blobs(300, 1, seed=5)
    auto = find_facets(codes, acts, options=FacetOptions(k="auto", seed=0))  # merges by default
    assert auto.k_chosen >= 2  # silhouette cannot pick 1 ...
    assert len(auto.facets) == 1  # ... but the pieces of one blob are merged
    assert auto.settings["merge"] is True
    assert all(mg["separation"] < 0.5 for mg in auto.settings["merges"])


def test_fixed_k_keeps_k_facets_unless_merge_is_asked():
    codes, acts, truth = blobs(300, 3, seed=6)
    paper = find_facets(codes, acts, options=FacetOptions(k=10, seed=0, tsne_iter=500))
    assert len(paper.facets) == 10 and paper.settings["merge"] is False
    merged = find_facets(codes, acts, options=FacetOptions(k=10, merge=True, seed=0, tsne_iter=500))
    assert len(merged.facets) == 3
    assert len(merged.settings["merges"]) == 7
    assert adjusted_rand_score(truth, facet_labels(merged, 300)) >= 0.95


def test_min_size_dissolves_small_clusters():
    codes, acts, _ = blobs(300, 3, dim=128, seed=7)
    res = find_facets(codes, acts, options=FacetOptions(k=10, min_size=40, embedding="pca", seed=0))
    sizes = [f.size for f in res.facets]
    assert min(sizes) >= 40
    assert sum(sizes) == 300
    assert len(res.settings["dissolved"]) == 10 - len(sizes) > 0
    assert sizes == sorted(sizes, reverse=True)


def test_pca_embedding_and_small_n():
    codes, acts, truth = blobs(120, 3, dim=300, seed=8)
    res = find_facets(codes, acts, options=FacetOptions(k=3, embedding="pca", seed=0))
    assert res.settings["embedding_used"] == "pca"
    assert adjusted_rand_score(truth, facet_labels(res, 120)) >= 0.95
    tiny = find_facets(codes[:7], acts[:7], options=FacetOptions(k=2, seed=0))
    assert tiny.settings["perplexity_used"] == pytest.approx(2.0)
    assert sum(f.size for f in tiny.facets) == 7


@pytest.mark.parametrize("n", [5, 60, 301])
def test_the_exact_tsne_gradient_is_open_tsnes_at_theta_zero(n):
    """The exact gradient (every pair) equals openTSNE's Barnes-Hut gradient with no
    approximation (theta 0), gradient and KL, also for an exaggerated P."""
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.tsne import kl_divergence_bh

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 20))
    p = PerplexityBasedNN(x, perplexity=min(30, (n - 1) / 3), method="exact",
                          random_state=0).P * 12.0
    y = rng.normal(size=(n, 2)) * 4
    kl_bh, grad_bh = kl_divergence_bh(y.copy(), p, 1, {"theta": 0.0}, should_eval_error=True)
    kl, grad = exact_gradient(y.copy(), p, should_eval_error=True)
    assert np.allclose(grad, grad_bh, rtol=1e-9, atol=1e-12 * np.abs(grad_bh).max())
    assert kl == pytest.approx(kl_bh, rel=1e-9)
    assert exact_gradient(y, p)[0] == 0.0  # the KL only when asked
    with pytest.raises(ValueError, match="dof 1"):
        exact_gradient(y, p, dof=2)


@pytest.mark.parametrize("n", [20, 200])
def test_the_compiled_tsne_optimiser_is_open_tsnes(n):
    """The compiled descent gives openTSNE's own map (its optimiser, the exact gradient as
    its callback) to the last bit: the same arithmetic in the same order."""
    from openTSNE import TSNE

    x, _, _ = blobs(n, 3, dim=30, seed=n)
    def make() -> TSNE:
        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), n_iter=750,
                    early_exaggeration_iter=250, negative_gradient_method=exact_gradient,
                    random_state=1, n_jobs=1)
    np.testing.assert_array_equal(optimize(make(), x.astype(np.float64)),
                                  np.asarray(make().fit(x.astype(np.float64))))
    clipped = make()
    clipped.max_grad_norm = 1.0
    with pytest.raises(ValueError, match="no gradient clip"):
        optimize(clipped, x.astype(np.float64))


def test_kmeans_and_silhouette_are_scikit_learns():
    """The compiled k-means draws scikit-learn's random numbers and follows its rules, so its
    labels are `KMeans(n_init=10, random_state=seed)`'s; the silhouette (whole or sampled)
    is `silhouette_score`'s. With duplicate points (a cluster can empty) and k above the
    distinct points' count the runs tie in all but rounding: the same partition, maybe
    renamed (the facets never ask for more clusters than distinct codes)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    cases = []
    for dims in (2, 2, 2, 5):
        centres = rng.normal(size=(int(rng.integers(1, 6)), dims)) * 10
        n = int(rng.integers(30, 300))
        cases.append(centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, dims)))
    cases.append(np.repeat(rng.normal(size=(4, 2)), 10, axis=0))  # 4 distinct points
    for x in cases:
        for k in (2, 3, 5, 9):
            for seed in (0, 7):
                labels = kmeans(x, k, seed)
                want = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
                if k <= distinct_rows(x):
                    np.testing.assert_array_equal(labels, want)
                else:
                    assert adjusted_rand_score(labels, want) == 1.0
                if len(np.unique(labels)) < 2:
                    continue
                assert silhouette(x, labels) == pytest.approx(silhouette_score(x, labels),
                                                              abs=1e-12)
                assert silhouette(x, labels, 25, seed) == pytest.approx(
                    silhouette_score(x, labels, sample_size=25, random_state=seed), abs=1e-12)
    with pytest.raises(ValueError, match="2 to n - 1"):
        silhouette(cases[0], np.zeros(len(cases[0]), int))


def test_small_sets_use_the_exact_gradient_and_keep_their_blobs():
    codes, acts, truth = blobs(200, 3, dim=100, seed=4)
    res = find_facets(codes, acts, options=FacetOptions(k="auto", seed=0))
    assert res.settings["tsne_gradient"] == "exact"
    assert adjusted_rand_score(truth, facet_labels(res, 200)) >= 0.95


def test_sklearn_tsne_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "openTSNE", None)  # import openTSNE now fails
    codes, acts, truth = blobs(120, 2, dim=200, seed=9)
    res = find_facets(codes, acts, options=FacetOptions(k=2, seed=0, tsne_iter=500))
    assert res.settings["embedding_used"] == "tsne (scikit-learn)"
    assert res.settings["tsne_iter"] == 500
    assert adjusted_rand_score(truth, facet_labels(res, 120)) >= 0.95


def test_umap_embedding_recovers_blobs_and_is_seeded():
    """umap-learn is in the test extras, so this runs in CI (no silent skip)."""
    codes, acts, truth = blobs(150, 3, dim=100, seed=10)
    res = find_facets(codes, acts, options=FacetOptions(k=3, embedding="umap", seed=0))
    assert res.settings["embedding_used"] == "umap"
    assert adjusted_rand_score(truth, facet_labels(res, 150)) >= 0.95
    again = find_facets(codes, acts, options=FacetOptions(k=3, embedding="umap", seed=0))
    np.testing.assert_array_equal(again.assignment, res.assignment)


def test_umap_without_umap_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)
    codes, acts, _ = blobs(30, 2, dim=20)
    with pytest.raises(MfvError, match="umap-learn"):
        find_facets(codes, acts, options=FacetOptions(k=2, embedding="umap"))


# ----------------------------------------------------------------------------- edge cases


def test_more_facets_than_images_suggests_auto():
    codes, acts, _ = blobs(8, 2, dim=20)
    with pytest.raises(MfvError, match=r"10 facets but only 8 images.*--facets auto"):
        find_facets(codes, acts, options=FacetOptions(k=10), name="unit 3")


@pytest.mark.parametrize("acts", [np.zeros(20), np.full(20, -2.0), np.full(20, 1.5)])
def test_equal_or_negative_activations_still_give_facets(acts):
    """Twelve copies of one photo or a unit negative everywhere are not "dead": the facets come
    from the codes (a false "no image activates" message used to stop these)."""
    codes, _, truth = blobs(20, 2, dim=20)
    result = find_facets(codes, acts, options=FacetOptions(k=2), name="conv5:12")
    assert sorted(f.size for f in result.facets) == sorted(np.bincount(truth).tolist())


def test_activations_that_are_not_numbers_are_an_error():
    codes, _, _ = blobs(20, 2, dim=20)
    with pytest.raises(MfvError, match="activations of the images selected for conv5:12"):
        find_facets(codes, np.full(20, np.nan), options=FacetOptions(k=2), name="conv5:12")


def test_one_image_is_one_facet_or_a_true_message():
    codes, _, _ = blobs(20, 2, dim=20)
    (facet,) = find_facets(codes[:1], np.ones(1), options=FacetOptions(k="auto")).facets
    assert facet.size == 1
    with pytest.raises(MfvError, match="asked for 10 facets but only 1 image was selected"):
        find_facets(codes[:1], np.ones(1), options=FacetOptions(k=10), name="u")


def test_identical_codes_give_one_facet_with_a_warning():
    codes = np.ones((40, 16), np.float32)
    acts = np.linspace(0.1, 1.0, 40)
    with pytest.warns(UserWarning, match="identical"):
        res = find_facets(codes, acts, options=FacetOptions(k=10, m=5))
    assert len(res.facets) == 1 and res.facets[0].size == 40
    assert len(res.facets[0].representatives) == 5
    # fewer distinct codes than k: k is lowered to the number of distinct codes
    two = np.repeat(np.eye(2, 16, dtype=np.float32) * 5, 20, axis=0)
    with pytest.warns(UserWarning, match="only 2 distinct codes"):
        res = find_facets(two, acts, options=FacetOptions(k=10))
    assert sorted(f.size for f in res.facets) == [20, 20]


def test_distinct_rows_counts_as_numpy_unique_does():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    x[3] = x[7]  # a duplicate
    x[10], x[11] = 0.0, -0.0  # equal as numbers, not as bytes
    for a in (x, x.astype(np.float64), np.asfortranarray(x), x[:, :1], np.zeros((2, 0))):
        assert distinct_rows(a) == np.unique(a, axis=0).shape[0]
    assert distinct_rows(x) == 38


def test_bad_arguments_are_clear_errors():
    codes, acts, _ = blobs(30, 2, dim=20)
    with pytest.raises(MfvError, match=r"^FacetOptions: embedding must be one of 'tsne', 'pca' "
                       r"or 'umap' \(got 'mds'\)$"):
        FacetOptions(embedding="mds")
    with pytest.raises(MfvError, match=r"^FacetOptions: facets must be at least 1, or 'auto' "
                       r"\(got 0\)$"):
        FacetOptions(k=0)
    with pytest.raises(MfvError, match="k_range must be"):
        FacetOptions(k_range=(1, 5))
    assert FacetOptions(facets=3, mean_of=4) == FacetOptions(k=3, m=4)  # flat names, or short
    with pytest.raises(MfvError, match="does not match"):
        find_facets(codes, acts[:-1])
    with pytest.raises(MfvError, match="indices must lie"):
        find_facets(codes, acts, [0, 30], options=FacetOptions(k=2))
    bad = codes.copy()
    bad[3, 0] = np.nan
    with pytest.raises(MfvError, match="NaN"):
        find_facets(bad, acts, options=FacetOptions(k=2))


# ----------------------------------------------------------------------------- mean images


def test_mean_image_is_the_pixel_mean_of_the_representatives():
    codes, acts, _ = blobs(100, 2, dim=64, seed=10)
    res = find_facets(codes, acts, options=FacetOptions(k=2, m=15, embedding="pca", seed=0))
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(100, 8, 6, 3), dtype=np.uint8)
    means = facet_means(res, lambda ids: pool[ids])
    for f, img in zip(res.facets, means, strict=True):
        assert img.dtype == np.float32 and img.shape == (8, 6, 3)
        expected = sum(pool[i].astype(np.float64) for i in f.representatives) / len(
            f.representatives
        )
        np.testing.assert_allclose(img, expected, atol=1e-4)
    as_float = mean_image(pool[:3].astype(np.float32))
    np.testing.assert_allclose(as_float, pool[:3].mean(0), atol=1e-4)


def test_mean_image_rejects_bad_input():
    with pytest.raises(MfvError, match=r"\(m, H, W, 3\)"):
        mean_image(np.zeros((4, 4, 3)))
    with pytest.raises(MfvError, match="0..255"):
        mean_image(np.full((2, 4, 4, 3), 300.0))


# ----------------------------------------------------------------------------- storage


def test_save_and_load_round_trip(tmp_path):
    codes, acts, _ = blobs(120, 3, dim=64, seed=11)
    res = find_facets(codes, acts, np.arange(5, 115),
                      FacetOptions(k="auto", embedding="pca", seed=0))
    means = [np.full((8, 8, 3), 10.0 * f.rank, np.float32) for f in res.facets]
    store = RunDir(tmp_path).target("t")
    store.save_facets("k1", res, means)
    (folder,) = (tmp_path / "targets" / "t" / "facets").iterdir()
    doc = json.loads((folder / "facets.json").read_text())
    assert doc["k_requested"] == "auto" and len(doc["facets"]) == len(res.facets)
    back, back_means = store.load_facets("k1")
    assert back.k_requested == "auto" and back.k_chosen == res.k_chosen
    assert back.scores == res.scores
    assert back.settings == json.loads(json.dumps(res.settings))
    assert np.array_equal(back.selected, res.selected)
    assert np.array_equal(back.coords_2d, res.coords_2d)
    assert np.array_equal(back.assignment, res.assignment)
    for a, b in zip(res.facets, back.facets, strict=True):
        assert (a.rank, a.activation_mean, a.activation_max) == (
            b.rank,
            b.activation_mean,
            b.activation_max,
        )
        for name in ("members", "representatives", "centre_2d", "code_centre"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert all(np.array_equal(a, b) for a, b in zip(means, back_means, strict=True))
    assert not list(folder.parent.glob("*.tmp")) and not list(folder.glob("*.tmp"))
    assert store.load_facets("k2") is None  # another key is another clustering

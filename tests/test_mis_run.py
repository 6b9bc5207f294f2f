"""The MIS evaluation and --negative through the pipeline: the tiny network on synthetic photos
(orchestration, results and report fields), and one slow case with the real model and photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mfv
from conftest import CLASSES, FAST, PRE, make_images, tiny_net
from mfv.evaluate import mis
from mfv.results.model import Results


@pytest.fixture(scope="module")
def negative_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mis")
    images = make_images(root / "imgs", n=90)
    model = mfv.load_model(tiny_net(), preprocess=PRE, classes=CLASSES)
    out = root / "run"
    results = mfv.run(model=model, **{**FAST, "images": str(images), "targets": ["conv2:3"],
                                      "out": str(out), "judges": [], "negative": True,
                                      "observer": "efficientnet_lite0", "top_n": 30,
                                      "selection": "top"})
    return out, results.to_dict()


def test_negative_adds_the_negation_with_the_bottom_photos_and_links_it(negative_run) -> None:
    out, doc = negative_run
    positive, negation = doc["targets"]
    assert negation["spec"] == "-1*conv2:3"
    assert positive["negation"] == negation["slug"] and negation["negation_of"] == positive["slug"]
    acts = {p["path"]: p["activation"] for p in positive["map"]}
    shunned = {p["path"]: p["activation"] for p in negation["map"]}
    # the negation's facets hold the 30 photos the target likes least, with negated values
    assert not set(acts) & set(shunned)
    assert max(-v for v in shunned.values()) <= min(acts.values())
    assert negation["facets"] and negation["baselines"]  # rendered like any target
    Results.model_validate(json.loads((out / "results.json").read_text()))


def test_mis_scores_every_condition_and_says_a_verdict(negative_run) -> None:
    out, doc = negative_run
    positive, negation = doc["targets"]
    result = positive["metrics"]["mis"]
    assert result["observer"] == "efficientnet_lite0 penultimate"
    assert result["trials"] == 20 and result["references"] == mis.fitting_references(90) == 1
    assert result["alpha"] == mis.ALPHA
    for condition in (result["natural"], result["facet"]["paper-mean"],
                      result["random"]["paper-mean"]):
        assert 0 <= condition["mis"] <= 1 and 0 < condition["mis_soft"] < 1
    assert result["facet"]["paper-mean"]["negative"] == "pictures"
    assert result["facet"]["paper-mean"]["references"] == len(positive["facets"])
    natural = result["natural"]
    assert (natural["mis_soft"] > 0.5) == (natural["mis_delta"] > 0)
    assert "photos" in result["verdict"]
    assert "mis" not in negation["metrics"]  # the pair is scored once, on the positive
    html = (out / "index.html").read_text()
    assert "What it shuns" in html and "Would an observer learn it" in html
    assert result["verdict"].split(" (")[0] in html


def test_the_ranking_of_a_top_n_scan_uses_the_negation_for_the_bottom() -> None:
    from mfv.evaluate.evaluation import mis_ranking

    class Scan:  # a top-N scan's answers, enough for mis_ranking
        activations = None
        targets = ["t", "-1*t"]
        paths = [f"p{i}" for i in range(10)]

        def target_index(self, spec):
            return self.targets.index(spec)

        def top(self, t, n):
            return (np.array([0, 1, 2]), None) if t == 0 else (np.array([9, 8, 2]), None)

    assert mis_ranking(Scan(), "t", "-1*t").tolist() == [0, 1, 2, 8, 9]
    assert mis_ranking(Scan(), "t").tolist() == [0, 1, 2]


@pytest.mark.slow
def test_real_model_natural_references_score_above_chance(imagenette, lite0) -> None:
    """Lite0's tench logit on 60 tench and 60 other Imagenette photos, ranked by Lite0 and
    observed by Lite2 (the default observer): the natural exemplars teach the unit (K = 2 fits
    120 photos; the top 60 are the tench photos when Lite0 knows its class)."""
    from mfv.evaluate.observer import load_observer
    from mfv.models.read import read_photos
    from mfv.models.targets import resolve_layer

    folders = sorted(p for p in imagenette.iterdir() if p.is_dir())
    tench = [str(p) for p in sorted(folders[0].glob("*.JPEG"))[:60]]
    others = [str(p) for folder in folders[1:] for p in sorted(folder.glob("*.JPEG"))[:7]][:60]
    photos = [*tench, *others]
    logits = read_photos(lite0, photos, [resolve_layer(lite0, "logits")], batch_size=40)
    assert len(logits.kept) == len(photos)
    order = mis.ranked(logits.outputs[0][:, 0])
    assert np.isin(order[:50], np.arange(60)).all()  # Lite0 ranks its tench photos first
    observer = load_observer("auto", lite0)
    assert observer.label == "efficientnet_lite2 penultimate"
    k = mis.fitting_references(len(order))
    result = mis.evaluate(observer.photos(photos), mis.natural_trials(order, 20, k))
    assert k == 2 and result["mis"] >= 0.9, result
    shuffled = np.random.default_rng(0).permutation(order)  # a unit that ranks at random
    assert mis.evaluate(observer.photos(photos), mis.natural_trials(shuffled, 20, k))["mis"] \
        < result["mis"]

"""End to end: `mfv run` on real photos with the real model; results.json against its schema;
stages reuse finished work; user errors exit cleanly."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from mfv.cli import main
from mfv.core.keys import slug
from mfv.render.recipes import schedule

REPO = Path(__file__).resolve().parents[1]
CLASSES = {"n01440764": 0, "n03888257": 701}  # tench, parachute


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory, imagenette) -> Path:
    """12 photos each of tench and parachute, as a class-subfolder tree of links."""
    root = tmp_path_factory.mktemp("imgs")
    for wnid in CLASSES:
        (root / wnid).mkdir()
        for f in sorted((imagenette / wnid).iterdir())[:12]:
            (root / wnid / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, two_classes) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    code = main(["run", "--images", str(two_classes), "--target", "_fc:0 + _fc:701",
                 "--facets", "2", "--mean-of", "4", "--steps", "10", "--out", str(out),
                 "--quiet", "--seed", "3", "--recipe", "anchored", "--recipe", "paper-mean"])
    assert code == 0
    return out


@pytest.mark.slow
def test_results_follow_the_schema_and_name_real_files(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    schema = json.loads((REPO / "docs" / "results.schema.json").read_text())
    jsonschema.validate(results, schema)
    assert all(v == "done" for v in results["stages"].values())
    assert results["data"]["n_images"] == 24 and results["data"]["skipped"] == []
    (target,) = results["targets"]
    assert target["selection"]["policy"] == "class" and target["selection"]["n"] == 24
    assert target["k_chosen"] == 2 and len(target["facets"]) == 2
    assert sum(f["size"] for f in target["facets"]) == 24
    # the constructed neuron's two facets are its two classes
    assert target["metrics"]["recovery"]["ari"] == pytest.approx(1.0)
    for facet in target["facets"]:
        assert len(facet["representatives"]) == 4
        assert all(os.path.exists(p) for p in facet["members"])
        assert (finished_run / facet["mean_image"]).exists()
        visual = facet["visualizations"]["paper-mean"]
        assert Image.open(finished_run / visual["path"]).size == (269, 269)
        steps = sum(o.iters for o in schedule("paper-mean", 10))
        assert np.load(finished_run / visual["trace"]).shape == (steps,)
        anchored = facet["visualizations"]["anchored"]  # the default recipe: at input size
        assert Image.open(finished_run / anchored["path"]).size == (224, 224)
        assert np.load(finished_run / anchored["trace"]).shape == (10,)
        for recipe in ("anchored", "paper-mean"):
            assert np.isfinite(facet["visualizations"][recipe]["activation"])
            assert set(facet["metrics"][recipe]) >= {
                "activation_ratio", "fidelity", "centre_dominance", "plausibility",
                "path_similarity", "fidelity_central"}
            assert len(target["baselines"][recipe]) == 2
            assert set(target["metrics"]["facet"][recipe]["coverage"]) == {
                "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert (finished_run / "index.html").exists()


@pytest.mark.slow
def test_mean_image_is_the_mean_of_its_representatives(finished_run):
    from mfv.data.images import load_rgb
    from mfv.models import load_model

    results = json.loads((finished_run / "results.json").read_text())
    pre = load_model("efficientnet_lite0").preprocess
    for facet in results["targets"][0]["facets"]:
        pixels = np.stack([np.round(pre.to_array(load_rgb(p)) * 255).transpose(1, 2, 0)
                           for p in facet["representatives"]])
        stored = np.load((finished_run / facet["mean_image"]).with_suffix(".npy"))
        np.testing.assert_allclose(stored, pixels.mean(0), atol=1e-4)
        png = np.asarray(Image.open(finished_run / facet["mean_image"]))
        assert np.abs(png - stored).max() <= 0.5 + 1e-4


@pytest.mark.slow
def test_evaluation_sees_the_pixels_whose_activation_was_recorded(finished_run):
    """Codes and judges look at the central input-size crop the optimizer drove, at its scale:
    evaluate's view of a saved canvas gives exactly what the renderer's `measure` gives on it,
    and that is the recorded activation (measured on the saved 8-bit picture)."""
    import torch

    from mfv.evaluate.evaluation import Network, optimized_view, to_input
    from mfv.models import load_model
    from mfv.models.targets import parse_target, resolve_layer
    from mfv.render.objective import Objective, measure

    model = load_model("efficientnet_lite0")
    target = parse_target("_fc:0 + _fc:701", model)
    results = json.loads((finished_run / "results.json").read_text())
    for facet in results["targets"][0]["facets"]:
        visual = facet["visualizations"]["paper-mean"]
        canvas = np.asarray(Image.open(finished_run / visual["path"]).convert("RGB"))
        view = optimized_view(canvas, model.preprocess.input_size)
        assert canvas.shape == (269, 269, 3) and view.shape == (224, 224, 3)
        values = Network(model, resolve_layer(model, "penultimate")).read(
            to_input(model, [view]), [target])["values"]
        pixels = torch.from_numpy(canvas.copy()).permute(2, 0, 1)[None].float()
        rendered_view = measure(Objective(model, [target], [0]), pixels)
        assert values[0, 0] == pytest.approx(rendered_view[0], abs=1e-3)
        assert values[0, 0] == pytest.approx(visual["activation"], abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--target", "_blocks.99:1"], "has no layer '_blocks.99'"),
    (["--target", "_fc:1000"], "valid units are 0..999"),
    (["--target", "crane"], "matches several classes"),
    (["--target", "tench", "--images", "/no/such/folder"], "images not found"),
    (["--target", "tench", "--facets", "0"], "at least 1"),
    (["--target", "tench", "--size", "8"], "setting --size (size) must be at least 32"),
    (["--target", "tench", "--model", "/no/such/net.pt"], "model file not found"),
    (["--target", "_fc:*"], "LAYER:* (every unit of a layer) is for `mfv scan`"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, args, message):
    base = ["run", "--out", str(tmp_path / "r"), "--quiet", "--images", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error once, no second report of the same cause
        code = main(base + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count(message) == 1


def test_judges_option_reads_names_or_none():
    from mfv.cli import _settings, build_parser

    def judges(*extra: str) -> tuple[str, ...]:
        return _settings(build_parser().parse_args(["run", *extra])).evaluate.judges

    assert judges() == ("efficientnet_lite1", "efficientnet_lite2")
    assert judges("--judges", "none") == ()
    assert judges("--judges", "efficientnet_lite2, efficientnet_lite1") == (
        "efficientnet_lite2", "efficientnet_lite1")


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    code = main(["run", "--images", str(tmp_path), "--target", "tench", "--quiet",
                 "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert code == 2 and "is a file; give a directory" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_slugs_stay_inside_the_run_directory_and_differ_per_definition():
    names = set()
    for spec in ["../../etc/passwd", "/abs:1", "a b\\c:3", "<script>", "", "_fc:1 + _fc:2",
                 "_fc:1 - _fc:2"]:
        name = slug(spec, {"spec": spec})
        assert "/" not in name and "\\" not in name and ".." not in name
        assert re.fullmatch(r"[a-z0-9-]+-[0-9a-f]{8}", name)
        names.add(name)
    assert len(names) == 7

"""End to end: `mfv run` on real photos with the real model; results.json against its schema;
stages reuse finished work; user errors exit cleanly."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from mfv.cli import main
from mfv.pipeline import slugify
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
                 "--quiet", "--seed", "3"])
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
        assert np.isfinite(visual["activation"])
        assert set(facet["metrics"]["paper-mean"]) >= {"activation_ratio", "fidelity",
                                                       "centre_dominance"}
    assert len(target["baselines"]["paper-mean"]) == 2
    assert (finished_run / "index.html").exists()


@pytest.mark.slow
def test_mean_image_is_the_mean_of_its_representatives(finished_run):
    from mfv.facets import load_facets
    from mfv.pipeline import Run
    from mfv.settings import make_settings

    results = json.loads((finished_run / "results.json").read_text())
    run = Run(make_settings(**{**results["settings"], "progress": False}))
    facet = results["targets"][0]["facets"][0]
    pixels = run.load_pixels(facet["representatives"]).astype(np.float64)
    stored = np.load(finished_run / "targets" / results["targets"][0]["slug"] /
                     "facet00_mean.npy")
    np.testing.assert_allclose(stored, pixels.mean(0), atol=1e-4)
    loaded = load_facets(finished_run / "facets" / results["targets"][0]["slug"])
    assert loaded.facets[0].size == facet["size"]


@pytest.mark.slow
def test_evaluation_sees_the_pixels_whose_activation_was_recorded(finished_run):
    """Codes and judges look at the central input-size crop the optimizer drove, at its scale:
    evaluate's view of a saved canvas gives exactly what the renderer's `measure` gives on it,
    and that is the recorded activation up to the PNG's 8-bit rounding."""
    import torch

    from mfv.evaluate import _to_input, codes_and_values, optimized_view
    from mfv.models import load_model
    from mfv.render.objective import Objective, measure
    from mfv.targets import parse_target, resolve_layer

    model = load_model("efficientnet_lite0")
    target = parse_target("_fc:0 + _fc:701", model)
    results = json.loads((finished_run / "results.json").read_text())
    for facet in results["targets"][0]["facets"]:
        visual = facet["visualizations"]["paper-mean"]
        canvas = np.asarray(Image.open(finished_run / visual["path"]).convert("RGB"))
        view = optimized_view(canvas, model.preprocess.input_size)
        assert canvas.shape == (269, 269, 3) and view.shape == (224, 224, 3)
        _, values = codes_and_values(model, resolve_layer(model, "penultimate"), [target],
                                     _to_input(model, [view]))
        pixels = torch.from_numpy(canvas.copy()).permute(2, 0, 1)[None].float()
        rendered_view = measure(Objective(model, [target], [0]), pixels)
        assert values[0, 0] == pytest.approx(rendered_view[0], abs=1e-3)
        assert values[0, 0] == pytest.approx(visual["activation"], rel=0.03)


@pytest.mark.slow
def test_stages_reuse_finished_work(finished_run, two_classes, capsys):
    render_index = next((finished_run / "targets").glob("*/render.json"))
    before = render_index.stat().st_mtime_ns
    scan_before = (finished_run / "scan" / "manifest.json").stat().st_mtime_ns
    code = main(["render", "--images", str(two_classes), "--target", "_fc:0 + _fc:701",
                 "--facets", "2", "--mean-of", "4", "--steps", "10", "--out",
                 str(finished_run), "--quiet", "--seed", "3"])
    assert code == 0
    assert render_index.stat().st_mtime_ns == before
    assert (finished_run / "scan" / "manifest.json").stat().st_mtime_ns == scan_before


@pytest.mark.slow
def test_reclustering_renders_the_new_facets_and_drops_the_old(finished_run, two_classes,
                                                                tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    render_index = next((run_dir / "targets").glob("*/render.json"))
    before = json.loads(render_index.read_text())
    baseline_png = render_index.parent / before["random00_paper-mean"]["path"]
    baseline_mtime = baseline_png.stat().st_mtime_ns
    code = main(["evaluate", "--images", str(two_classes), "--target", "_fc:0 + _fc:701",
                 "--facets", "1", "--mean-of", "3", "--steps", "10", "--out", str(run_dir),
                 "--quiet", "--seed", "3", "--judges", "none"])
    assert code == 0
    after = json.loads(render_index.read_text())
    assert set(after) == {"facet00_paper-mean", "random00_paper-mean"}
    # a new mean image is a new start: the facet is rendered again; the noise start is reused
    assert after["facet00_paper-mean"]["key"] != before["facet00_paper-mean"]["key"]
    assert after["random00_paper-mean"] == before["random00_paper-mean"]
    assert baseline_png.stat().st_mtime_ns == baseline_mtime
    results = json.loads((run_dir / "results.json").read_text())
    (target,) = results["targets"]
    assert len(target["facets"]) == 1 and len(target["baselines"]["paper-mean"]) == 1
    assert set(target["facets"][0]["metrics"]) == {"paper-mean"}  # evaluated: the new facet only


@pytest.mark.slow
def test_size_sets_the_input_size_of_every_stage(two_classes, tmp_path):
    """--size 160: scanned at 160 (recorded), mean images at 160, canvases from 160 crops;
    --judges none: evaluated without the transferability judges."""
    out = tmp_path / "small"
    code = main(["evaluate", "--images", str(two_classes), "--target", "tench", "--facets", "1",
                 "--mean-of", "3", "--steps", "10", "--size", "160", "--no-baseline",
                 "--judges", "none", "--out", str(out), "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["judges"] == [] and results["settings"]["size"] == 160
    metrics = results["targets"][0]["facets"][0]["metrics"]["paper-mean"]
    assert "activation_ratio" in metrics and "transfer_top1" not in metrics
    manifest = json.loads((out / "scan" / "manifest.json").read_text())
    assert manifest["model"]["preprocess"]["input_size"] == 160
    assert manifest["model"]["preprocess"]["resize_size"] == round(160 * 256 / 224)
    (target_dir,) = (out / "targets").iterdir()
    assert np.load(target_dir / "facet00_mean.npy").shape == (160, 160, 3)
    canvas = Image.open(target_dir / "facet00_paper-mean.png")
    assert canvas.size == (192, 192)  # the paper-mean canvas grows 1.2x from the input size


@pytest.mark.parametrize("args, message", [
    (["--target", "_blocks.99:1"], "has no layer '_blocks.99'"),
    (["--target", "_fc:1000"], "valid units are 0..999"),
    (["--target", "crane"], "matches several classes"),
    (["--target", "tench", "--images", "/no/such/folder"], "images not found"),
    (["--target", "tench", "--facets", "0"], "at least 1"),
    (["--target", "tench", "--size", "8"], "--size must be at least 32"),
    (["--target", "tench", "--model", "/no/such/net.pt"], "model file not found"),
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
        return _settings(build_parser().parse_args(["run", *extra])).judges

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


def test_slugs_stay_inside_the_run_directory():
    for spec in ["../../etc/passwd", "/abs:1", "a b\\c:3", "<script>", ""]:
        slug = slugify(7, spec)
        assert "/" not in slug and "\\" not in slug and ".." not in slug
        assert slug.startswith("t07_")

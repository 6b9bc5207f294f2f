"""The orchestration, fast: the whole pipeline on the tiny test network and 20 synthetic images.

Every rerun case must give what a fresh run with its settings gives (keys that cannot lie),
finished work survives failures, stale results are dropped from the published ones, one process
writes a run directory at a time, and a custom `nn.Module` works through `mfv.run`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

import mfv
from conftest import (
    CLASSES,
    FAST,
    LITE_LIKE_PRE,
    PRE,
    LiteLike,
    comparable,
    make_images,
    readme_example,
    tiny_net,
)
from mfv.cli import main
from mfv.core.errors import MfvError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("orch") / "imgs")


def tiny_run(out: Path, images: Path, **options) -> dict:
    """The pipeline on a fresh TinyNet (same seed, same weights) with the tests' class names, so
    the folders "red thing" / "blue thing" label the photos as classes 0 and 2; its results as
    the dict results.json holds (these tests compare runs and files)."""
    settings = {**FAST, "images": str(images), "targets": ["fc:0 + fc:2", "conv2:3"],
                "out": str(out), **options}
    model = mfv.load_model(tiny_net(), preprocess=PRE, classes=CLASSES)
    return mfv.run(model=model, **settings).to_dict()


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.parent.name != "thumbs" and p.suffix in (".npy", ".png")}


def test_a_custom_module_runs_the_whole_pipeline(tmp_path, images):
    results = tiny_run(tmp_path / "run", images, recipes=["anchored", "paper-mean"])
    schema = json.loads((REPO / "docs" / "results.schema.json").read_text())
    jsonschema.validate(results, schema)
    assert results["status"] == "complete" and set(results["stages"].values()) == {"done"}
    assert results["model"]["class"] == "TinyNet" and results["model"]["parameters"] == 1477
    assert len(results["model"]["fingerprint"]) == 64
    assert results["settings"]["model"] == "TinyNet"
    for target in results["targets"]:
        assert len(target["facets"]) == 2
        assert set(target["baselines"]) == {"anchored", "paper-mean"}
        for facet in target["facets"]:
            for rel in (facet["mean_image"], *(v["path"] for v in
                                               facet["visualizations"].values())):
                assert (tmp_path / "run" / rel).is_file()
            assert set(facet["metrics"]) == {"anchored", "paper-mean"}
    pair = results["targets"][0]
    assert pair["metrics"]["recovery"]["ari"] == pytest.approx(1.0)  # red vs blue photos
    assert (tmp_path / "run" / "index.html").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


def test_a_rerun_reuses_every_finished_result(tmp_path, images):
    first = tiny_run(tmp_path / "run", images)
    before = mtimes(tmp_path / "run")
    started = time.perf_counter()
    again = tiny_run(tmp_path / "run", images)
    assert time.perf_counter() - started < 5
    assert mtimes(tmp_path / "run") == before
    assert comparable(again) == comparable(first)


def test_post_activation_is_a_different_scan(tmp_path, images):
    pre_act = tiny_run(tmp_path / "run", images, targets=["conv1:3"], activation="pre")
    post = tiny_run(tmp_path / "run", images, targets=["conv1:3"], activation="post")
    fresh = tiny_run(tmp_path / "fresh", images, targets=["conv1:3"], activation="post")
    assert comparable(post) == comparable(fresh)
    assert comparable(post) != comparable(pre_act)
    assert min(p["activation"] for p in post["targets"][0]["map"]) >= 0  # after the ReLU


def test_matching_every_other_step_is_a_different_render(tmp_path, images):
    """`match_every` reaches the anchored recipe and its pictures' keys: a rerun with it
    renders anew (the scan and facets reused), as a fresh run with it does."""
    every = tiny_run(tmp_path / "run", images, recipes=["anchored"])
    other = tiny_run(tmp_path / "run", images, recipes=["anchored"], match_every=2)
    fresh = tiny_run(tmp_path / "fresh", images, recipes=["anchored"], match_every=2)
    assert comparable(other) == comparable(fresh)
    assert comparable(other) != comparable(every)


def test_weights_changed_in_place_are_noticed(tmp_path, images):
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    state = tiny_net().state_dict()
    save_file(state, weights)
    tiny_run(tmp_path / "run", images, weights=str(weights))
    state["conv2.weight"] = state["conv2.weight"] * 1.5
    save_file(state, weights)  # same path, other content
    changed = tiny_run(tmp_path / "run", images, weights=str(weights))
    fresh = tiny_run(tmp_path / "fresh", images, weights=str(weights))
    assert comparable(changed) == comparable(fresh)
    assert changed["model"]["fingerprint"] == fresh["model"]["fingerprint"]


def test_a_sum_and_a_difference_get_their_own_folders_and_baselines(tmp_path, images):
    tiny_run(tmp_path / "run", images, targets=["fc:1 + fc:2"])
    diff = tiny_run(tmp_path / "run", images, targets=["fc:1 - fc:2"])
    fresh = tiny_run(tmp_path / "fresh", images, targets=["fc:1 - fc:2"])
    assert comparable(diff) == comparable(fresh)
    assert [p.name for p in (tmp_path / "run" / "targets").iterdir()] == [diff["targets"][0]
                                                                           ["slug"]]
    none = tiny_run(tmp_path / "run", images, targets=["fc:1 - fc:2"], baseline=False)
    assert none["targets"][0]["baselines"] == {}
    assert all(not m.startswith("random") for m in none["targets"][0]["metrics"])


def test_a_recipe_no_longer_asked_for_is_not_published(tmp_path, images):
    tiny_run(tmp_path / "run", images, recipes=["paper-mean", "fourier"])
    make_images(tmp_path / "other", seed=5)
    now = tiny_run(tmp_path / "run", tmp_path / "other", recipes=["paper-mean"])
    fresh = tiny_run(tmp_path / "fresh", tmp_path / "other", recipes=["paper-mean"])
    assert comparable(now) == comparable(fresh)
    for target in now["targets"]:
        assert set(target["baselines"]) == {"paper-mean"}
        assert all(set(f["visualizations"]) == set(f["metrics"]) == {"paper-mean"}
                   for f in target["facets"])
    assert not list((tmp_path / "run").rglob("*fourier*"))  # pruned after the complete run


def test_a_failing_rerun_keeps_the_finished_work(tmp_path, images):
    first = tiny_run(tmp_path / "run", images)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.jpg").write_bytes(b"not an image")
    before = mtimes(tmp_path / "run")
    with pytest.raises(MfvError, match="could be read"):
        tiny_run(tmp_path / "run", broken)
    failed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert failed["status"] == "failed" and "could be read" in failed["error"]
    assert failed["stages"]["scan"] == "missing" and failed["targets"][0]["facets"] == []
    assert {k: v for k, v in mtimes(tmp_path / "run").items() if k in before} == before
    again = tiny_run(tmp_path / "run", images)
    assert comparable(again) == comparable(first)
    assert {k: v for k, v in mtimes(tmp_path / "run").items() if k in before} == before


def test_an_error_while_rendering_publishes_what_is_finished(tmp_path, images, monkeypatch):
    import mfv.runtime.tasks

    real = mfv.runtime.tasks.render_batches
    calls = []

    def fail_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("GPU fell off the bus")
        return real(*args, **kwargs)

    monkeypatch.setattr(mfv.runtime.tasks, "render_batches", fail_second_batch)
    with pytest.raises(RuntimeError, match="fell off"):
        tiny_run(tmp_path / "run", images, recipes=["paper-mean", "fourier"])
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "failed" and partial["stages"]["facets"] == "done"
    assert partial["stages"]["render"] == "missing"
    shown = [f["visualizations"] for t in partial["targets"] for f in t["facets"]]
    assert all(set(v) == {"paper-mean"} for v in shown)  # the first recipe's batch is kept
    monkeypatch.setattr(mfv.runtime.tasks, "render_batches", real)
    done = tiny_run(tmp_path / "run", images, recipes=["paper-mean", "fourier"])
    fresh = tiny_run(tmp_path / "fresh", images, recipes=["paper-mean", "fourier"])
    assert comparable(done) == comparable(fresh)


def test_reclustering_renders_the_new_facets_and_drops_the_old(tmp_path, images):
    first = tiny_run(tmp_path / "run", images, targets=["fc:0 + fc:2"])
    slug = first["targets"][0]["slug"]
    index = tmp_path / "run" / "targets" / slug / "render.json"
    old = {(e["kind"], e["rank"]): e for e in json.loads(index.read_text())["entries"]}
    noise = tmp_path / "run" / "targets" / slug / old[("random", 0)]["files"]["image"]
    noise_mtime = noise.stat().st_mtime_ns
    one = tiny_run(tmp_path / "run", images, targets=["fc:0 + fc:2"], facets=1)
    new = {(e["kind"], e["rank"]): e for e in json.loads(index.read_text())["entries"]}
    assert set(new) == {("facet", 0), ("random", 0)}
    assert new[("facet", 0)]["key"] != old[("facet", 0)]["key"]  # a new mean: a new start
    assert new[("random", 0)] == old[("random", 0)] and noise.stat().st_mtime_ns == noise_mtime
    (target,) = one["targets"]
    assert len(target["facets"]) == 1 and len(target["baselines"]["paper-mean"]) == 1
    assert len(list((tmp_path / "run" / "targets" / slug / "facets").iterdir())) == 1


def test_stage_commands_stop_after_their_stage_and_show_what_still_holds(tmp_path, images):
    tiny_run(tmp_path / "run", images)
    facets_only = tiny_run(tmp_path / "run", images, until="facets")
    assert facets_only["stages"]["render"] == "done"  # stored and still current: shown
    fresh = tiny_run(tmp_path / "fresh", images, until="facets")
    assert fresh["status"] == "partial"
    assert fresh["stages"] == {"scan": "done", "facets": "done", "render": "missing",
                               "evaluate": "missing", "report": "done"}
    assert all(f["visualizations"] == {} for t in fresh["targets"] for f in t["facets"])


HOLDER = textwrap.dedent("""
    import sys, time
    from mfv.runtime.lock import open_run
    with open_run(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_one_writer_at_a_time_and_a_killed_holder_does_not_block(tmp_path, images):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MfvError, match=rf"in use by process {holder.pid} on "):
            tiny_run(tmp_path / "run", images)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert tiny_run(tmp_path / "run", images)["status"] == "complete"


def test_an_exported_model_file_runs_from_the_command_line(tmp_path, images, capsys):
    module = tiny_net()
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(module, (torch.rand(2, 3, 32, 32),), dynamic_shapes=(dims,))
    torch.export.save(program, tmp_path / "tiny.pt2")
    code = main(["run", "--model", str(tmp_path / "tiny.pt2"), "--images", str(images),
                 "--target", "fc:1", "--target", "conv2:3", "--size", "32", "--facets", "2",
                 "--mean-of", "3", "--steps", "10", "--embedding", "pca", "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "complete" and results["model"]["source"] == "torch.export"
    assert all(len(t["facets"]) == 2 for t in results["targets"])


def test_demo_settings_keep_every_option_the_user_gave():
    from mfv.demo import PRESET, demo_settings
    from mfv.runtime.settings import Settings, make_settings

    defaults = Settings()
    given = make_settings(facets=defaults.facets.k, steps=40, out="x")
    chosen = demo_settings(given)
    assert chosen.facets.k == defaults.facets.k != PRESET["facets"]  # the default, given: kept
    assert chosen.render.steps == 40 and chosen.out == "x" and chosen.facets.m == PRESET["mean_of"]
    assert demo_settings(None).facets.k == PRESET["facets"]


def test_the_readme_python_example_runs_as_written(tmp_path, images, monkeypatch):
    """The README's `mfv.run` example, with only its model line replaced by a small network
    with Lite0's layer names."""
    os.symlink(images, tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"LiteLike": LiteLike, "PRE": LITE_LIKE_PRE}
    code = readme_example("mfv.run(", "mfv.load_model(LiteLike(), preprocess=PRE)")
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    results = namespace["results"]
    assert results.status == "complete" and results.root == (tmp_path / "runs" / "pair").resolve()
    assert json.loads((tmp_path / "runs" / "pair" / "results.json").read_text()) == \
        results.to_dict()
    assert len(results.targets[0].facets) >= 2


def test_size_sets_the_input_size_of_every_stage(tmp_path, images):
    """--size 40: scanned at 40 (recorded), mean images at 40, paper-mean canvases grown 1.2x
    from 40-pixel crops."""
    results = tiny_run(tmp_path / "run", images, size=40, targets=["fc:1"], baseline=False)
    scan_manifest = json.loads(next((tmp_path / "run" / "scan").glob("*/manifest.json"))
                               .read_text())
    assert scan_manifest["model"]["preprocess"]["input_size"] == 40
    assert scan_manifest["model"]["preprocess"]["resize_size"] == round(40 * 36 / 32)
    facet = results["targets"][0]["facets"][0]
    assert np.load((tmp_path / "run" / facet["mean_image"]).with_suffix(".npy")).shape == \
        (40, 40, 3)
    assert Image.open(tmp_path / "run" / facet["visualizations"]["paper-mean"]["path"]).size \
        == (48, 48)


def test_maco_runs_from_the_scanned_spectrum_with_its_transparency_map(tmp_path, images):
    results = tiny_run(tmp_path / "run", images, recipes=["maco"], maco_crops=2,
                       targets=["fc:0 + fc:2"])
    assert results["status"] == "complete"
    (scan_dir,) = (tmp_path / "run" / "scan").iterdir()
    assert np.load(scan_dir / "spectrum.npy").shape == (3, 32, 17)  # the scanned images' own
    target = results["targets"][0]
    for visual in [*(f["visualizations"]["maco"] for f in target["facets"]),
                   *target["baselines"]["maco"]]:
        canvas = Image.open(tmp_path / "run" / visual["path"])
        alpha = Image.open(tmp_path / "run" / visual["alpha"])
        assert canvas.size == alpha.size == (73, 73)  # 512 / 224 of the input size
        assert np.asarray(alpha).max() == 255
    assert set(target["facets"][0]["metrics"]["maco"]) >= {"activation", "fidelity"}

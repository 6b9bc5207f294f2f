"""The layer sweep (`mfv sweep`) on the tiny network: the streaming top-N of every unit of
every layer equals a brute-force ranking, the sweep's results and plot follow their format, a
rerun reuses them, and a sweep killed in its scan resumes to the same results."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mfv
from conftest import CLASSES, HANG_S, PRE, SWEEP, SlowNet, finish, make_images, start, tiny_net
from mfv.cli import main
from mfv.data.sources import from_folder
from mfv.models.targets import parse_targets
from mfv.scan.options import ScanOptions
from mfv.scan.scanner import scan
from mfv.study.layers import block_layers, sweep
from mfv.study.measures import MEASURES


@pytest.fixture(scope="module")
def fork() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mfv.study.layers"])
    return ctx


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("sweep") / "imgs", n=40)


def tiny(delay: float = 0.0):
    model = SlowNet(delay).eval() if delay else tiny_net()
    if delay:
        model.load_state_dict(tiny_net().state_dict())
    return mfv.load_model(model, preprocess=PRE, classes=CLASSES)


def test_the_streaming_top_n_of_every_unit_equals_a_brute_force_ranking(tmp_path, images):
    model = tiny()
    targets = parse_targets(["conv1:*", "conv2:*", "fc:*"], model)
    listed = from_folder(images)
    small = {"batch_size": 3, "chunk_batches": 2, "workers": 0}
    full = scan(model, listed, targets, tmp_path / "a", ScanOptions(**small, mode="full"),
                progress=False)
    streamed = scan(model, listed, targets, tmp_path / "b",
                    ScanOptions(**small, mode="topn", top_n=7), progress=False)
    assert streamed.activations is None
    for t in range(len(targets)):
        values = np.where(full.valid, full.activations[:, t], -np.inf)
        brute = np.lexsort((np.arange(len(values)), -values))[:7]  # ties: the lower index
        rows, top = streamed.top(t, 7)
        np.testing.assert_array_equal(rows, brute)
        np.testing.assert_allclose(top, values[brute], rtol=1e-6)


@pytest.mark.slow
def test_a_sweep_measures_every_layer_and_a_rerun_reuses_it(tmp_path, images):
    out = tmp_path / "run"
    doc = sweep(model=tiny(), images=str(images), out=str(out), **SWEEP)
    assert doc["format"] == "mfv.sweep/1" and doc["measures"] == list(MEASURES)
    assert [e["layer"] for e in doc["layers"]] == ["conv1", "conv2", "fc"]
    assert json.loads((out / "sweep" / "sweep.json").read_text()) == json.loads(json.dumps(doc))
    for entry in doc["layers"]:
        assert 1 <= len(entry["units"]) <= 3
        for unit in entry["units"]:
            assert unit["k"] == len(unit["sizes"]) == len(unit["members"]) >= 1
            assert sum(unit["sizes"]) == SWEEP["top_n"]
            assert all(os.path.exists(p) for m in unit["members"] for p in m)
            assert 0 <= unit["polysemanticity"] <= 2
        for name in MEASURES:
            s = entry["summary"][name]
            assert s["low"] <= s["mean"] <= s["high"]
        for example in entry["examples"]:
            for facet in example["facets"]:
                assert Image.open(out / facet["mean_image"]).size == (32, 32)
    assert set(doc["chance"]) == set(MEASURES)
    assert doc["chance"]["k"]["draws"] == sum(e["chance"]["k"]["draws"] for e in doc["layers"])
    assert [e["region"] for e in doc["layers"]] == ["patch", "patch", "image"]
    for entry in doc["layers"][:2]:  # patches of the tiny net's 32 px input: 3/14-3/7 of it
        assert 7 <= entry["patch_side"] <= 14 and entry["chance"]["k"]["draws"] == 10
        assert all(len(box) == 4 and box[2] == box[3] == entry["patch_side"]
                   for u in entry["units"] for f in u["representative_boxes"] for box in f)
        calibration = entry["calibration"]
        assert len(calibration["pairs"]) == len(calibration["two_kind"]) >= 1
        for name in ("k", "polysemanticity", "separation"):
            power = calibration["measures"][name]
            assert power["power"] == (power["low"] > 0)
            assert power["low"] <= power["difference"] <= power["high"]
    png = Image.open(out / doc["plot"]["png"])
    assert png.size[0] > 300 and (out / doc["plot"]["svg"]).read_text().startswith("<?xml")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "sweep" / "units").iterdir()}
    again = sweep(model=tiny(), images=str(images), out=str(out), **SWEEP)
    assert again["layers"] == doc["layers"] and again["chance"] == doc["chance"]
    assert {p: p.stat().st_mtime_ns for p in (out / "sweep" / "units").iterdir()} == stamps


def _killable_sweep(out: str, images: str) -> None:
    sweep(model=tiny(delay=0.05), images=images, out=out, **{**SWEEP, "scan_batch_size": 1})


@pytest.mark.slow
def test_a_sweep_killed_in_its_scan_resumes_to_the_same_results(tmp_path, images, fork):
    clean = sweep(model=tiny(), images=str(images), out=str(tmp_path / "clean"),
                  **{**SWEEP, "scan_batch_size": 1})
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = start(fork, log, _killable_sweep, str(out), str(images))
    deadline = time.monotonic() + HANG_S
    while len(list(out.glob("scan/*/chunks/*.json"))) < 2:
        assert proc.is_alive(), log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not (out / "sweep" / "sweep.json").exists()
    again = start(fork, tmp_path / "again.log", _killable_sweep, str(out), str(images))
    assert finish(again, tmp_path / "again.log") == 0, (tmp_path / "again.log").read_text()
    resumed = json.loads((out / "sweep" / "sweep.json").read_text())
    assert resumed["layers"] == json.loads(json.dumps(clean["layers"]))
    assert resumed["chance"] == json.loads(json.dumps(clean["chance"]))


@pytest.mark.slow
def test_blocks_of_efficientnet_and_a_clear_error_without_blocks(lite0):
    assert block_layers(lite0) == [f"_blocks.{i}" for i in range(16)] + ["_fc"]
    with pytest.raises(mfv.MfvError, match="found no blocks"):
        block_layers(tiny())


@pytest.mark.slow
def test_the_sweep_command_rejects_a_typo_in_its_layers(tmp_path, images, capsys):
    code = main(["sweep", "--images", str(images), "--layers", "_blocks.3,_blokcs.4",
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and "has no layer '_blokcs.4'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_sweep_command_prints_a_layer_where_a_measure_has_no_value(tmp_path, images,
                                                                      monkeypatch, capsys):
    """A layer whose units all have one facet has no silhouette (None in sweep.json): the
    summary says so instead of failing after the sweep was written."""
    undefined = {"mean": None, "low": None, "high": None}
    summary = {name: {"mean": 1.0, "low": 1.0, "high": 1.0} for name in MEASURES}
    doc = {"measures": list(MEASURES), "settings": {"out": str(tmp_path / "run")},
           "plot": {"png": "sweep/measures.png"},
           "layers": [{"layer": "_blocks.7", "units": [{}, {}],
                       "summary": {**summary, "silhouette": undefined}}]}
    monkeypatch.setattr("mfv.study.layers.sweep", lambda settings: doc)
    code = main(["sweep", "--images", str(images), "--out", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "_blocks.7: 2 units  k 1  silhouette –  polysemanticity 1  separation 1" in out


@pytest.mark.slow
@pytest.mark.parametrize("region", ["image", "auto"])
def test_the_run_and_the_sweep_give_a_unit_the_same_mean_images(tmp_path, images, region):
    """One definition of a facet's representatives and mean image: `mfv run` on a unit and the
    sweep's example of the same unit, under the same settings (`--mean-resize squash` here, not
    the default), store the same pictures: of whole photos, and (auto: a hidden spatial unit)
    the means of the crops around the unit's peaks."""
    same = dict(top_n=16, embedding="pca", mean_of=3, mean_resize="squash", reduction="max",
                region=region, progress=False, device="cpu", scan_batch_size=4)
    doc = sweep(model=tiny(), images=str(images), out=str(tmp_path / "sweep"), layers="relu2",
                units=4, embedder="efficientnet_lite0", **same)
    example = doc["layers"][0]["examples"][0]
    unit = next(u for u in doc["layers"][0]["units"] if u["unit"] == example["unit"])
    # the run scans what the sweep scanned (as `mfv sweep --render` does): where a unit's map
    # is flat (these synthetic images), its peak is a tie that the scanned set can break
    results = mfv.run(model=tiny(), images=str(images), out=str(tmp_path / "run"),
                      targets=[f"relu2:{unit['unit']}"], scan_targets=["relu2:*"],
                      selection="top", facets="auto", until="facets", **same)
    facets = results.targets[0].facets
    assert [f.size for f in facets] == unit["sizes"] and len(facets) >= 1
    assert unit["region"] == ("image" if region == "image" else "patch")
    for facet, shown in zip(facets, example["facets"], strict=True):
        made = np.asarray(Image.open(tmp_path / "run" / facet.mean_image))
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sweep" /
                                                            shown["mean_image"])), made)


class _Photos:
    """What `code_items` reads of a scan: the photos' paths and their (whole-photo) codes."""

    def __init__(self, paths: list[str], width: int) -> None:
        self.paths, self.codes = paths, np.zeros((len(paths), width), np.float32)


def test_crops_coded_over_worker_processes_equal_those_coded_here(tmp_path, images, caplog,
                                                                    monkeypatch):
    """The crops' codes over 2 worker processes (one thread each, both networks shipped) are
    the in-process ones, item for item; a photo gone since the scan is left out with a
    warning logged here, not in the worker."""
    from mfv.facets.patches import crop_codes
    from mfv.models.targets import resolve_layer
    from mfv.study import seen
    from mfv.study.seen import Items, code_items

    model, embedder = tiny(), mfv.load_model(tiny_net(1), preprocess=PRE, classes=CLASSES)
    paths = sorted(str(p) for p in images.glob("*/*.png"))[:9] + [str(tmp_path / "gone.png")]
    rows = np.repeat(np.arange(len(paths)), 2)
    boxes = np.tile([[0, 0, 8, 8], [2, 4, 12, 12]], (len(paths), 1))
    items = Items(rows, boxes)
    layer = resolve_layer(model, "penultimate")
    size = model.preprocess.input_size
    scan = _Photos(paths, crop_codes(model, np.zeros((1, size, size, 3), np.uint8), layer).shape[1])
    monkeypatch.setattr(seen, "PHOTOS_PER_CHUNK", 4)  # 3 chunks of photos
    here = code_items(model, embedder, scan, items, layer, processes=1)
    caplog.clear()
    pools = []

    def spied(func, tasks, processes=None, **kw):
        pools.append((processes, kw.get("min_size"), len(tasks)))
        yield from parallel_map(func, tasks, processes, **kw)

    parallel_map = seen.parallel_map
    monkeypatch.setattr(seen, "parallel_map", spied)
    there = code_items(model, embedder, scan, items, layer, processes=2)
    assert pools == [(2, 0, 3)]  # a pool of 2 workers for 3 chunks, whatever the work's size
    assert any("gone.png" in r.getMessage() for r in caplog.records)
    for a, b in zip(here, there, strict=True):
        assert a.shape == b.shape and np.abs(a[:-2]).sum() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not there[0][-2:].any() and not there[1][-2:].any()  # the gone photo's two crops


def test_an_inner_square_that_is_an_item_is_coded_once(images, monkeypatch):
    """A larger crop's code is `patch_codes`' (its own code averaged with its inner square's);
    where that inner square is itself an item (a centred early-layer crop inside a late
    layer's), the swept network codes it once for both."""
    from mfv.facets.patches import crop_codes, frames, patch_codes
    from mfv.models.targets import resolve_layer
    from mfv.study import seen
    from mfv.study.seen import Items, code_items

    model, embedder = tiny(), mfv.load_model(tiny_net(1), preprocess=PRE, classes=CLASSES)
    paths = sorted(str(p) for p in images.glob("*/*.png"))[:4]
    # rows 0-2: a 12 px crop and its 7 px inner square (3/14 of 32), both items; row 3: a
    # 12 px crop whose inner square is not an item, and a 5 px crop (not larger: alone)
    rows = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    boxes = np.array([[10, 10, 12, 12], [12, 12, 7, 7]] * 3 + [[0, 0, 12, 12], [20, 3, 5, 5]])
    layer = resolve_layer(model, "penultimate")
    scan = _Photos(paths, crop_codes(model, np.zeros((1, 32, 32, 3), np.uint8), layer).shape[1])
    coded = []

    def counted(net, crops, *args):
        coded.append((net.module is model.module, len(crops)))
        return crop_codes(net, crops, *args)

    monkeypatch.setattr(seen, "crop_codes", counted)
    codes, other = code_items(model, embedder, scan, Items(rows, boxes), layer, processes=1)
    pictures = frames(model, paths, rows)
    want = np.concatenate([patch_codes(model, pictures[i:i + 1], boxes[i:i + 1], layer)
                           for i in range(len(rows))])
    np.testing.assert_allclose(codes, want, rtol=1e-4, atol=1e-5)
    assert sum(n for own, n in coded if own) == 8 + 1  # the items and row 3's inner square
    assert sum(n for own, n in coded if not own) == 8 and other.shape[0] == 8


def test_crops_are_coded_in_parallel_only_when_it_pays_and_fits(monkeypatch):
    """Over one process per core for many crops on the CPU, no more than half the memory
    holds; in this process for a few crops, or for a network a worker cannot unpickle."""
    from mfv.study import seen

    model = tiny()
    monkeypatch.setattr(seen.os, "sched_getaffinity", lambda _: set(range(8)))
    for gigabytes, workers in ((64, 8), (8, 2), (2, 1)):
        monkeypatch.setattr(seen.os, "sysconf", lambda name, gb=gigabytes:
                            4096 if name == "SC_PAGE_SIZE" else gb * 10**9 // 4096)
        assert seen._default_processes(seen.PARALLEL_CROPS, model, model) == workers
    assert seen._default_processes(seen.PARALLEL_CROPS - 1, model, model) == 1
    local = type("Net", (type(model.module),), {"__module__": "__main__"})
    notebook = mfv.load_model(local().eval(), preprocess=PRE, classes=CLASSES)
    assert seen._default_processes(10**6, notebook, model) == 1

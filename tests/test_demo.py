"""`mfv demo` end to end, as the README's first command runs it: EfficientNet-Lite0 on the
built-in pool, a results.json that follows its schema, and a report that works in headless
Chromium. The demo's wall time is printed at the end of the test run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from conftest import WALL_TIMES, ReportPage
from mfv.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    out = tmp_path_factory.mktemp("demo") / "mfv-demo"
    started = time.perf_counter()
    code = main(["demo", "--out", str(out), "--quiet"])  # demo pool from the user's cache
    seconds = time.perf_counter() - started
    request.config.stash.setdefault(WALL_TIMES, {})["mfv demo"] = seconds
    assert code == 0
    return out


@pytest.fixture(scope="module")
def demo_report(demo_run: Path, report_browser) -> Iterator[ReportPage]:
    with report_browser(demo_run / "index.html") as rp:
        yield rp


@pytest.fixture(scope="module")
def demo_results(demo_run: Path) -> dict:
    return json.loads((demo_run / "results.json").read_text())


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((224, 224)), dtype=np.float64)


def _section(results: dict, index: int) -> str:
    return f"t{index}-{results['targets'][index]['slug']}"


@pytest.mark.slow
def test_demo_renders_class_logits_and_channels_with_baselines(demo_results, demo_run):
    schema = json.loads((REPO / "docs" / "results.schema.json").read_text())
    jsonschema.validate(demo_results, schema)
    assert all(v == "done" for v in demo_results["stages"].values())
    specs = [t["spec"] for t in demo_results["targets"]]
    assert len(specs) == 4
    assert sum(s.startswith("_fc:") for s in specs) == 2
    assert sum(s.startswith("_blocks.10:") for s in specs) == 2
    assert demo_results["data"]["n_images"] > 400 and demo_results["data"]["skipped"] == []
    for target in demo_results["targets"]:
        assert len(target["facets"]) == 3
        randoms = [_pixels(demo_run / b["path"]) for b in target["baselines"]["anchored"]]
        assert len(randoms) == 3
        for facet in target["facets"]:
            picture = _pixels(demo_run / facet["visualizations"]["anchored"]["path"])
            mean = _pixels(demo_run / facet["mean_image"])
            # what MFV adds shows: the picture is neither its blurry mean nor a random start
            assert np.abs(picture - mean).mean() > 8, facet["mean_image"]
            assert min(np.abs(picture - r).mean() for r in randoms) > 8


@pytest.mark.slow
@pytest.mark.browser
def test_demo_report_loads_cleanly_offline(demo_report: ReportPage):
    n, bad = demo_report.images_not_loaded()
    assert n > 100 and bad == []
    assert demo_report.console_errors == [] and demo_report.page_errors == []
    assert all(u.startswith("file://") for u in demo_report.requests)
    assert demo_report.page.locator("section.target").count() == 4


@pytest.mark.slow
@pytest.mark.browser
def test_demo_map_hover_and_facet_highlight(demo_report: ReportPage, demo_results: dict):
    page = demo_report.page
    for index in range(len(demo_results["targets"])):
        sid = _section(demo_results, index)
        points = demo_report.map_points(sid)
        assert len(points) == 60  # the demo's top-N per target
        middle = demo_report.uncovered_point(sid, len(points) // 2)
        shown = demo_report.hover_point(sid, middle)
        assert shown["path"] == points[middle]["p"] and shown["natural_width"] > 0
        section = page.locator(f"section.target[id='{sid}']")
        section.locator(".card.facet[data-facet='0'] header").click()
        state = demo_report.highlighted(sid)
        assert state["on"] == sorted(i for i, p in enumerate(points) if p["f"] == 0)
        assert state["on_opacity"] == 1 and state["off_opacity"] < 0.3
        section.locator(".card.facet[data-facet='0'] header").click()  # toggle off again
    assert demo_report.console_errors == [] and demo_report.page_errors == []

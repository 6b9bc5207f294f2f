"""The report in real headless Chromium from file://: loads cleanly, every image shows,
the facet map's tooltip and highlighting work, hostile file names stay text, metrics read by
their plain names with explanations on hover, and the trace charts are drawn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mfv.report import write_report
from mfv.results.metrics import METRICS

pytestmark = pytest.mark.browser  # every test here drives headless Chromium

T0 = "t0-t00-fake-00000000"  # section ids of the two targets
T1 = "t1-t01-fake-00000001"


@pytest.fixture(scope="module")
def fake_results(fake_runs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return fake_runs.make(tmp_path_factory.mktemp("fake_run"))


@pytest.fixture(scope="module")
def report(fake_results: tuple[Path, dict], report_browser) -> Iterator[Any]:
    """The opened page (conftest's `ReportPage`)."""
    run, results = fake_results
    index = write_report(run, results, progress=False)
    # a missing browser or Playwright is a failure, not a skip: CI installs both
    with report_browser(index) as rp:
        yield rp


def test_loads_cleanly_and_offline(report) -> None:
    n, bad = report.images_not_loaded()
    assert n > 40 and bad == []
    assert report.console_errors == [] and report.page_errors == []
    assert report.requests and all(u.startswith("file://") for u in report.requests)
    assert report.page.locator("section.target").count() == 2
    assert report.page.locator(f"section.target[id='{T0}'] .card.facet").count() == 3
    # every maco picture shows its transparency map (loaded, as every image above)
    assert report.page.locator("img.alpha").count() == 10


def test_hover_shows_the_image(report) -> None:
    points = report.map_points(T0)
    for i in (0, 7):
        shown = report.hover_point(T0, i)
        assert shown["path"] == points[i]["p"]
        assert shown["src"].endswith(points[i]["t"]) and shown["natural_width"] > 0
        assert f"facet {points[i]['f']}" in shown["text"]
    # an unreadable image shows its reason instead of a broken picture
    broken = next(i for i, p in enumerate(points) if p["p"].endswith("missing.png"))
    shown = report.hover_point(T0, broken)
    assert "src" not in shown and "missing file" in shown["text"]
    assert report.console_errors == [] and report.page_errors == []


def test_hostile_names_are_text(report, fake_runs) -> None:
    page = report.page
    points = report.map_points(T0)
    evil = next(i for i, p in enumerate(points) if p["p"].endswith(fake_runs.EVIL_NAME))
    shown = report.hover_point(T0, evil)
    assert shown["path"] == f"inputs/odd/{fake_runs.EVIL_NAME}"  # visible, verbatim
    assert fake_runs.EVIL_LABEL in shown["text"]
    assert page.get_by_text(fake_runs.EVIL_CLASS).first.is_visible()
    assert page.locator("section.target h2 code").nth(1).inner_text().endswith(fake_runs.EVIL_CLASS)
    assert page.locator("b", has_text="bold").count() == 0  # '<b>bold</b>' in a spec stays text
    assert page.get_by_text(f"coverage by {fake_runs.EVIL_JUDGE}").first.is_visible()
    assert report.dialogs == []
    assert page.evaluate("document.scripts.length") == 2


def test_metrics_have_plain_names_and_explanations(report,
                                                   fake_results: tuple[Path, dict]) -> None:
    page = report.page
    text = page.evaluate("document.body.innerText")
    raw = set()
    for t in fake_results[1]["targets"]:
        for f in t["facets"]:
            for m in f["metrics"].values():
                raw |= {k for k in m if "_" in k}
        for level in ("facet", "random"):
            for m in t["metrics"][level].values():
                raw |= {k for k in m if "_" in k}
    assert {"activation_ratio_facet", "judge_ranks", "transfer_top1_central"} <= raw
    assert not [k for k in raw if k in text]
    labels = page.evaluate("""() => [...document.querySelectorAll('table.metrics .m')].map(
        e => ({label: e.textContent, title: e.title, row: e.closest('tr').dataset.metric,
               visible: e.getBoundingClientRect().width > 0}))""")
    assert len(labels) > 50
    for item in labels:
        info = METRICS[item["row"]]
        assert item["label"].startswith(info.label) and item["title"].startswith(
            info.explanation)
    # the central crop's value stands beside the value as seen, in grey
    grey = page.evaluate("""() => { const c = document.querySelector('table.metrics .cv');
        return getComputedStyle(c).color; }""")
    assert grey == "rgb(152, 162, 179)"


def test_verdicts_and_trace_charts(report, fake_runs, fake_results: tuple[Path, dict]
                                   ) -> None:
    page = report.page
    section = page.locator(f"section.target[id='{T0}']")
    verdicts = section.locator(".verdict")
    assert verdicts.count() == len(fake_runs.RECIPES)
    assert verdicts.nth(0).get_attribute("data-outcome") == "better"
    assert "covers 2/2 classes vs 1/2 from random starts" in verdicts.nth(0).inner_text()
    worse = verdicts.nth(1).locator(".clause[data-outcome='worse']")
    assert worse.count() == 2 and "0.72× the best photo vs 0.96×" in worse.nth(1).inner_text()
    assert worse.nth(0).evaluate("e => getComputedStyle(e).color") == "rgb(164, 38, 44)"
    charts = page.evaluate("""() => [...document.querySelectorAll('.spark')].map(s => {
        const line = s.querySelector('polyline'), box = line.getBoundingClientRect();
        return {n: line.points.numberOfItems, w: box.width, h: box.height,
                ends: s.querySelector('.ends').textContent, title: s.title}; })""")
    results = fake_results[1]
    pictures = sum(len(f["visualizations"]) for t in results["targets"] for f in t["facets"])
    pictures += sum(len(b) for t in results["targets"] for b in t["baselines"].values())
    assert len(charts) == pictures == page.locator("figure.pic img.vis:not(.alpha)").count()
    for chart in charts:
        assert chart["n"] >= 2 and chart["w"] > 60 and chart["h"] > 3
        assert " → " in chart["ends"] and "per optimization step" in chart["title"]


def test_clicking_a_facet_highlights_its_members(report) -> None:
    page = report.page
    points = report.map_points(T0)
    section = page.locator(f"section.target[id='{T0}']")
    members = sorted(i for i, p in enumerate(points) if p["f"] == 1)

    section.locator(".card.facet[data-facet='1'] header").click()
    state = report.highlighted(T0)
    assert state["on"] == members and state["facets"] == [1]
    assert state["on_opacity"] == 1 and state["off_opacity"] < 0.3
    assert "selected" in (section.locator(".lg[data-facet='1']").get_attribute("class") or "")

    section.locator(".lg[data-facet='2']").click()  # the legend switches to another facet
    state = report.highlighted(T0)
    assert state["facets"] == [2] and len(state["on"]) == sum(p["f"] == 2 for p in points)

    section.locator(".lg[data-facet='2']").click()  # and toggles it off
    state = report.highlighted(T0)
    assert state["on"] == [] and state["off_opacity"] == 1
    # the other target's map is untouched
    assert report.highlighted(T1)["on"] == []


def test_screenshot(report, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    report.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 1500
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank page

"""The report in real headless Chromium from file://: loads cleanly, every image shows,
the facet map's tooltip and highlighting work, and hostile file names stay text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from mfv.report import write_report
from report_fixtures import (
    EVIL_CLASS,
    EVIL_LABEL,
    EVIL_NAME,
    ReportPage,
    highlighted,
    hover_point,
    images_not_loaded,
    make_fake_run,
    map_points,
    open_report,
)

T0 = "t0-t00_fake"  # section id of the first target


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReportPage]:
    root = tmp_path_factory.mktemp("fake_run")
    run, results = make_fake_run(root)
    index = write_report(run, results, progress=False)
    # a missing browser or Playwright is a failure, not a skip: CI installs both
    with open_report(index) as rp:
        yield rp


def test_loads_cleanly_and_offline(report: ReportPage) -> None:
    n, bad = images_not_loaded(report.page)
    assert n > 40 and bad == []
    assert report.console_errors == [] and report.page_errors == []
    assert report.requests and all(u.startswith("file://") for u in report.requests)
    assert report.page.locator("section.target").count() == 2
    assert report.page.locator("section.target[id='t0-t00_fake'] .card.facet").count() == 3


def test_hover_shows_the_image(report: ReportPage) -> None:
    points = map_points(report.page, T0)
    for i in (0, 7):
        shown = hover_point(report.page, T0, i)
        assert shown["path"] == points[i]["p"]
        assert shown["src"].endswith(points[i]["t"]) and shown["natural_width"] > 0
        assert f"facet {points[i]['f']}" in shown["text"]
    # an unreadable image shows its reason instead of a broken picture
    broken = next(i for i, p in enumerate(points) if p["p"].endswith("missing.png"))
    shown = hover_point(report.page, T0, broken)
    assert "src" not in shown and "missing file" in shown["text"]
    assert report.console_errors == [] and report.page_errors == []


def test_hostile_names_are_text(report: ReportPage) -> None:
    page = report.page
    points = map_points(page, T0)
    evil = next(i for i, p in enumerate(points) if p["p"].endswith(EVIL_NAME))
    shown = hover_point(page, T0, evil)
    assert shown["path"] == f"inputs/odd/{EVIL_NAME}"  # visible, verbatim
    assert EVIL_LABEL in shown["text"]
    assert page.get_by_text(EVIL_CLASS).first.is_visible()
    assert page.locator("section.target h2 code").nth(1).inner_text().endswith(EVIL_CLASS)
    assert page.locator("b", has_text="bold").count() == 0  # '<b>bold</b>' in a spec stays text
    assert report.dialogs == []
    assert page.evaluate("document.scripts.length") == 2


def test_clicking_a_facet_highlights_its_members(report: ReportPage) -> None:
    page = report.page
    points = map_points(page, T0)
    section = page.locator(f"section.target[id='{T0}']")
    members = sorted(i for i, p in enumerate(points) if p["f"] == 1)

    section.locator(".card.facet[data-facet='1'] header").click()
    state = highlighted(page, T0)
    assert state["on"] == members and state["facets"] == [1]
    assert state["on_opacity"] == 1 and state["off_opacity"] < 0.3
    assert "selected" in (section.locator(".lg[data-facet='1']").get_attribute("class") or "")

    section.locator(".lg[data-facet='2']").click()  # the legend switches to another facet
    state = highlighted(page, T0)
    assert state["facets"] == [2] and len(state["on"]) == sum(p["f"] == 2 for p in points)

    section.locator(".lg[data-facet='2']").click()  # and toggles it off
    state = highlighted(page, T0)
    assert state["on"] == [] and state["off_opacity"] == 1
    # the other target's map is untouched
    assert highlighted(page, "t1-t01_fake")["on"] == []


def test_screenshot(report: ReportPage, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    report.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 1500
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank page

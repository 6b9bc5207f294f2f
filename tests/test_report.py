"""The HTML report: escaping, self-contained file references, thumbnails, partial results."""

from __future__ import annotations

import json
import os
import re
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

from PIL import Image

from mfv.report import write_report
from mfv.report.page import STRIP_MAX
from mfv.report.thumbs import THUMB_PX
from report_fixtures import (
    EVIL_CLASS,
    EVIL_LABEL,
    EVIL_NAME,
    ODD_VIS_NAME,
    drop_stages,
    make_fake_run,
)


class _Refs(HTMLParser):
    """Collects src/href attributes and the text of <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)
        if tag == "script":
            self._script = dict(attrs)

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self.scripts.append((self._script, data))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None


def _parse(html: str) -> _Refs:
    p = _Refs()
    p.feed(html)
    p.close()
    return p


def _page_data(refs: _Refs) -> dict:
    (text,) = [t for a, t in refs.scripts if a.get("id") == "mfv-data"]
    return json.loads(text)


def _all_urls(html: str) -> list[str]:
    refs = _parse(html)
    urls = [r for r in refs.refs if not r.startswith("#")]
    for target in _page_data(refs)["targets"].values():
        urls += [p["t"] for p in target["points"] if p["t"]]
    return urls


def test_report_full_run(tmp_path: Path) -> None:
    run, results = make_fake_run(tmp_path)
    out = write_report(run, results, progress=False)
    assert out == run / "index.html" and out.is_file()
    html = out.read_text(encoding="utf-8")

    # user data never becomes markup: only the page's own two <script> elements exist
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html
    refs = _parse(html)
    assert len(refs.scripts) == 2
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in html  # shown, escaped
    # the JSON for the script holds the raw strings, with no '<' that could end the element
    (data_text,) = [t for a, t in refs.scripts if a.get("id") == "mfv-data"]
    assert "<" not in data_text and "&" not in data_text
    points = [p for t in _page_data(refs)["targets"].values() for p in t["points"]]
    assert {p["p"] for p in points} >= {f"inputs/odd/{EVIL_NAME}"}
    assert {p["l"] for p in points} >= {EVIL_LABEL}

    # every referenced file is inside the run dir and exists (URLs percent-quoted)
    urls = _all_urls(html)
    assert urls
    for url in urls:
        assert "://" not in url and not url.startswith("/"), url
        path = (run / unquote(url)).resolve()
        assert path.is_file(), url
        assert path.is_relative_to(run.resolve()), url
    # the visualization with '#' and '%' in its name is referenced quoted, so it resolves
    assert any(unquote(u).endswith(ODD_VIS_NAME) for u in urls)
    assert not any(u.endswith(ODD_VIS_NAME) for u in urls)

    # every facet, visualization, mean image and baseline of every target is on the page
    for t in results["targets"]:
        for f in t["facets"]:
            for rel in (f["mean_image"], f["visualizations"]["paper-mean"]["path"]):
                assert any(unquote(u) == rel for u in urls), rel
        for b in t["baselines"]["paper-mean"]:
            assert any(unquote(u) == b["path"] for u in urls)
    # the overview leads with the targets (pictures), each tile naming its class, escaped
    assert html.index("<h2>Targets</h2>") < html.index("<h2>Run</h2>")
    tiles = re.findall(r'<a class="card tcard".*?</a>', html, flags=re.S)
    assert len(tiles) == len(results["targets"])
    assert f'<span class="muted small">{html_escape(EVIL_CLASS)} · 2 facets' in tiles[1]
    assert EVIL_CLASS not in html
    # settings, versions, timings and skipped files (escaped) are shown
    assert "1 min 15 s" in html and "2.13.0" in html
    assert "2 skipped files" in html and "empty file (0 bytes)" in html


def test_thumbnails(tmp_path: Path) -> None:
    run, results = make_fake_run(tmp_path)
    html = write_report(run, results, progress=False).read_text(encoding="utf-8")
    thumbs = sorted((run / "report" / "thumbs").glob("*.jpg"))
    # one per readable input image shown (strips + map), none for the broken or missing file
    shown = {p["path"] for t in results["targets"] for p in t["map"]}
    assert len(thumbs) == len(shown) - 2
    for th in thumbs:
        with Image.open(th) as im:
            assert im.format == "JPEG" and im.size == (THUMB_PX, THUMB_PX)
    assert not list((run / "report" / "thumbs").glob(".*"))  # no temp files left
    # unreadable images get a placeholder that says why
    strip = html.split('<div class="strip">', 1)[1].split("</div>\n", 1)[0]
    assert 'title="inputs/odd/missing.png — activation 5.5 — missing file"' in strip
    assert "inputs/odd/broken.png — activation 5.4 — corrupt image header" in strip
    reasons = {p["p"]: p["r"] for t in _page_data(_parse(html))["targets"].values()
               for p in t["points"]}
    assert reasons["inputs/odd/missing.png"] == "missing file"

    # thumbnails are reused ...
    before = {th: th.stat().st_mtime_ns for th in thumbs}
    write_report(run, results, progress=False)
    assert {th: th.stat().st_mtime_ns for th in thumbs} == before
    # ... unless their image changed since
    first = results["targets"][0]["facets"][1]["members"][0]
    src = tmp_path / first
    os.utime(src, ns=(max(before.values()) + 10**9,) * 2)
    write_report(run, results, progress=False)
    changed = [th for th in thumbs if th.stat().st_mtime_ns != before[th]]
    assert len(changed) == 1


def test_strip_shows_representatives_first_and_a_count(tmp_path: Path) -> None:
    run, results = make_fake_run(tmp_path)
    facet = results["targets"][0]["facets"][0]
    assert facet["size"] > STRIP_MAX
    html = write_report(run, results, progress=False).read_text(encoding="utf-8")
    card = html.split('data-facet="0"', 1)[1].split("</article>", 1)[0]
    strip = card.split('<div class="strip">', 1)[1].split("</div>\n", 1)[0]
    titles = re.findall(r'class="(?:ph )?thumb"[^>]*?title="([^"]*)"', strip)
    assert len(titles) == STRIP_MAX
    reps = facet["representatives"]
    import html as html_mod

    shown = [html_mod.unescape(t).split(" — ")[0] for t in titles]
    assert shown[: len(reps)] == reps
    assert f"+{facet['size'] - STRIP_MAX}" in strip


def test_partial_results(tmp_path: Path) -> None:
    run, results = make_fake_run(tmp_path)
    facets_only = drop_stages(results, "facets")
    html = write_report(run, facets_only, progress=False).read_text(encoding="utf-8")
    assert "not rendered yet" in html and "Random starts" not in html
    assert html.count('class="card facet"') == 5  # 3 + 2 facets, with mean images and strips
    for url in _all_urls(html):
        assert (run / unquote(url)).is_file()
    assert "<script>alert" not in html

    scan_only = drop_stages(results, "scan")
    html = write_report(run, scan_only, progress=False).read_text(encoding="utf-8")
    assert "Facets not computed yet" in html and "facet map" not in html.lower()

    bare = {"schema": "mfv.results/1", "stages": {"scan": "missing"}, "targets": None}
    html = write_report(tmp_path / "empty_run", bare, progress=False).read_text(encoding="utf-8")
    assert "No targets yet" in html
    assert "EVIL" not in html and EVIL_CLASS not in html

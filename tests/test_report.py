"""The HTML report: escaping, self-contained file references, thumbnails, partial results, plain
metric names with explanations, trace charts, verdicts, transparency maps, the page layout."""

from __future__ import annotations

import copy
import html as html_mod
import json
import os
import re
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, unquote

import jinja2
import jsonschema
import markupsafe
import numpy as np
import pytest
from PIL import Image

import mfv.evaluate.evaluation
import mfv.report.pages as pages
from mfv.evaluate.metrics import recovery
from mfv.report import PAGES, PageSpec, write_page, write_report
from mfv.report.charts import SPARK_POINTS, Sparkline, sparkline
from mfv.report.glossary import metric_table
from mfv.report.run_page import EAGER_TARGETS, STRIP_MAX
from mfv.report.thumbs import THUMB_PX
from mfv.report.verdict import verdicts
from mfv.results.metrics import METRICS
from mfv.runtime.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]


class _Refs(HTMLParser):
    """Collects src/href attributes, <img> attributes in order, the text of <script> elements
    and the page's visible text (outside <script> and <style>)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.text: list[str] = []
        self._script: dict[str, str | None] | None = None
        self._style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag == "script":
            self._script = dict(attrs)
        self._style = self._style or tag == "style"

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self.scripts.append((self._script, data))
        elif not self._style:
            self.text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None
        if tag == "style":
            self._style = False


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


def _esc(text: str) -> str:
    """As the templates escape (quotes too)."""
    return str(markupsafe.escape(text))


def _visible_text(html: str) -> str:
    return " ".join(_parse(html).text)


def _section(html: str, index: int) -> str:
    """The HTML of target `index`'s section."""
    return html.split('<section class="target"')[index + 1].split("</section>", 1)[0]


def _metric_keys(obj: Any) -> set[str]:
    """Every key of every metrics dict in a results object, nested ones included."""
    keys: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                keys.add(k)
                walk(v)

    for t in obj["targets"]:
        walk(t["metrics"])
        for f in t["facets"]:
            walk(f["metrics"])
    walk(obj.get("evaluation") or {})
    return keys


@pytest.fixture(scope="module")
def fake(fake_runs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    run, results = fake_runs.make(tmp_path_factory.mktemp("report"))
    html = write_report(run, results, progress=False).read_text(encoding="utf-8")
    return run, results, html


def test_fixture_follows_the_schema(fake: tuple[Path, dict, str]) -> None:
    schema = json.loads((REPO / "docs" / "results.schema.json").read_text())
    jsonschema.validate(fake[1], schema)


def test_report_full_run(fake_runs, tmp_path: Path) -> None:
    run, results = fake_runs.make(tmp_path)
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
    assert {p["p"] for p in points} >= {f"inputs/odd/{fake_runs.EVIL_NAME}"}
    assert {p["l"] for p in points} >= {fake_runs.EVIL_LABEL}

    # every referenced file is inside the run dir and exists (URLs percent-quoted)
    urls = _all_urls(html)
    assert urls
    for url in urls:
        assert "://" not in url and not url.startswith("/"), url
        path = (run / unquote(url)).resolve()
        assert path.is_file(), url
        assert path.is_relative_to(run.resolve()), url
    # the visualization with '#' and '%' in its name is referenced quoted, so it resolves
    assert any(unquote(u).endswith(fake_runs.ODD_VIS_NAME) for u in urls)
    assert not any(u.endswith(fake_runs.ODD_VIS_NAME) for u in urls)

    # every facet, visualization (of every recipe), mean image and baseline is on the page
    for t in results["targets"]:
        for f in t["facets"]:
            rels = [f["mean_image"], *(v["path"] for v in f["visualizations"].values())]
            for rel in rels:
                assert any(unquote(u) == rel for u in urls), rel
        for items in t["baselines"].values():
            for b in items:
                assert any(unquote(u) == b["path"] for u in urls)
    # the overview leads with the targets (pictures), each tile naming its class, escaped
    assert html.index("<h2>Targets</h2>") < html.index("<h2>Run</h2>")
    tiles = re.findall(r'<a class="card tcard".*?</a>', html, flags=re.S)
    assert len(tiles) == len(results["targets"])
    assert f'<span class="muted small">{html_escape(fake_runs.EVIL_CLASS)} · 2 facets' in tiles[1]
    assert fake_runs.EVIL_CLASS not in html
    # settings, versions, timings and skipped files (escaped) are shown
    assert "1 min 15 s" in html and "2.13.0" in html
    assert "2 skipped files" in html and "empty file (0 bytes)" in html
    assert "status: complete" in html and "on cpu" in html
    assert "Other results" not in html  # every top-level key of the schema has its place


def test_thumbnails(fake_runs, tmp_path: Path) -> None:
    run, results = fake_runs.make(tmp_path)
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


def test_strip_shows_representatives_first_and_a_count(fake: tuple[Path, dict, str]) -> None:
    _, results, html = fake
    facet = results["targets"][0]["facets"][0]
    assert facet["size"] > STRIP_MAX
    card = html.split('data-facet="0"', 1)[1].split("</article>", 1)[0]
    strip = card.split('<div class="strip">', 1)[1].split("</div>\n", 1)[0]
    titles = re.findall(r'class="(?:ph )?thumb"[^>]*?title="([^"]*)"', strip)
    assert len(titles) == STRIP_MAX
    reps = facet["representatives"]
    shown = [html_mod.unescape(t).split(" — ")[0] for t in titles]
    assert shown[: len(reps)] == reps
    assert f"+{facet['size'] - STRIP_MAX}" in strip


def test_partial_results(fake_runs, tmp_path: Path) -> None:
    run, results = fake_runs.make(tmp_path)
    facets_only = fake_runs.drop_stages(results, "facets")
    html = write_report(run, facets_only, progress=False).read_text(encoding="utf-8")
    assert "not rendered yet" in html and "Random starts" not in html
    assert html.count('class="card facet"') == 5  # 3 + 2 facets, with mean images and strips
    for url in _all_urls(html):
        assert (run / unquote(url)).is_file()
    assert "<script>alert" not in html
    assert 'class="verdict"' not in html and "<polyline" not in html  # nothing to judge yet

    scan_only = fake_runs.drop_stages(results, "scan")
    html = write_report(run, scan_only, progress=False).read_text(encoding="utf-8")
    assert "Facets not computed yet" in html and "facet map" not in html.lower()

    bare = {"schema": "mfv.results/1", "stages": {"scan": "missing"}, "targets": None}
    html = write_report(tmp_path / "empty_run", bare, progress=False).read_text(encoding="utf-8")
    assert "No targets yet" in html
    assert "EVIL" not in html and fake_runs.EVIL_CLASS not in html


def test_later_targets_load_lazily(fake_runs, tmp_path: Path) -> None:
    run, results = fake_runs.make(tmp_path)
    many = copy.deepcopy(results)
    many["targets"] = [{**copy.deepcopy(results["targets"][0]), "slug": f"t-{i:08x}"}
                       for i in range(EAGER_TARGETS + 2)]
    html = write_report(run, many, progress=False).read_text(encoding="utf-8")
    for i in range(len(many["targets"])):
        imgs = re.findall(r"<img [^>]*>", _section(html, i))
        assert len(imgs) > 20
        lazy = [' loading="lazy"' in img for img in imgs]
        assert all(lazy) if i >= EAGER_TARGETS else not any(lazy), i


# --------------------------------------------------------------------------- metric names
def test_every_metric_evaluate_writes_has_a_plain_name() -> None:
    source = Path(mfv.evaluate.evaluation.__file__).read_text(encoding="utf-8")
    written = set(re.findall(r'm\[f?"([a-z0-9_]+?)(?:\{view\})?"\]', source))
    written |= set(re.findall(r'stats\["([a-z0-9_]+)"\]', source))
    written |= set(re.findall(r'entry\["target"\]\["([a-z0-9_]+)"\]', source))
    assert {"activation_ratio_facet", "judge_ranks", "fidelity_margin", "coverage",
            "diversity_central", "recovery", "plausibility"} <= written  # the regexes work
    written = {k.removesuffix("_central") for k in written} - {"recovery"}
    written |= {f"recovery.{k}" for k in recovery(np.array([0, 1]), np.array([0, 1]))}
    assert written <= set(METRICS), written - set(METRICS)
    for info in METRICS.values():  # plain: no raw key as a name, a one-line explanation
        assert "_" not in info.label and info.explanation.strip()
        assert "\n" not in info.explanation and len(info.explanation) < 260


def test_no_raw_metric_key_is_visible(fake: tuple[Path, dict, str]) -> None:
    _, results, html = fake
    text = _visible_text(html)
    raw = {k for k in _metric_keys(results) if "_" in k}
    assert {"activation_ratio_facet", "judge_ranks", "transfer_top5_central",
            "path_similarity_layers", "fidelity_margin_central"} <= raw
    for key in raw:
        assert not re.search(rf"\b{re.escape(key)}\b", text), key
    # each metric row names its metric plainly and explains it on hover
    rows = re.findall(r'<tr data-metric="([^"]+)"><th scope="row"><span class="m" '
                      r'title="([^"]*)">([^<]*)</span>', html)
    assert len(rows) > 50
    for key, title, label in rows:
        info = METRICS[key]
        assert html_mod.unescape(title).startswith(info.explanation)
        assert html_mod.unescape(label).startswith(info.label)
    assert {key for key, _, _ in rows} >= set(METRICS) - {"activation_max_real"} - {
        k for k in METRICS if k.startswith("recovery.")}
    # the chips with target-level metrics explain themselves too
    for key in ("activation_max_real", "recovery.ari", "recovery.purity"):
        info = METRICS[key]
        assert f'title="{_esc(info.explanation)}">{_esc(info.label)} ' in html
    assert "facet recovery (purity) 85 %" in html
    # a glossary at the end lists what the page's numbers mean
    glossary = html.split('id="glossary"', 1)[1]
    for key in METRICS:
        assert f"<dt>{_esc(METRICS[key].label)}</dt>" in glossary


def _row(html: str, key: str) -> str:
    return html.split(f'<tr data-metric="{key}">', 1)[1].split("</tr>", 1)[0]


def test_metric_views_and_values(fake_runs, fake: tuple[Path, dict, str]) -> None:
    _, results, html = fake
    card = _section(html, 1).split('data-facet="0"', 1)[1].split("</article>", 1)[0]
    m = results["targets"][1]["facets"][0]["metrics"]["paper-mean"]
    assert m["activation_central"] != m["activation"]
    # as seen, with the central crop in grey beside it where they differ ...
    cells = re.findall(r"<td>(.*?)</td>", _row(card, "activation"))
    assert cells[0] == '20 <span class="cv" title="on the central crop">22</span>'
    assert re.findall(r"<td>(.*?)</td>", _row(card, "activation_ratio"))[0].startswith(
        '1.6× <span class="cv"')
    # ... and once where the two views agree or only one exists
    assert re.findall(r"<td>(.*?)</td>", _row(card, "fidelity")) == ["yes", "yes"]
    assert re.findall(r"<td>(.*?)</td>", _row(card, "centre_dominance")) == ["0.300", "0.300"]
    # lists per judge and per layer; the judges are named (escaped) in the explanation
    ranks = _row(card, "judge_ranks")
    assert "<td>1 · 4" in ranks and f"In order: {_esc(fake_runs.EVIL_JUDGE)}." in ranks
    assert "<td>0.950 · 0.810 · 0.620</td>" in _row(card, "path_similarity_layers")
    assert "<td>50 %" in _row(card, "transfer_top1")
    # per network coverage in the target's table of facets vs random starts
    table = _section(html, 0).split('class="card tmetrics"', 1)[1]
    header = re.findall(r'<th scope="col">([^<]+)</th>', table)
    assert header == ["paper-mean: facets", "paper-mean: random starts", "maco: facets",
                      "maco: random starts"]
    cov = _row(table, "coverage")
    assert f"coverage by {_esc(fake_runs.EVIL_JUDGE)}" in table and "coverage by tinynet" in table
    assert re.findall(r"<td>(.*?)</td>", cov) == ["100 %", "50 %", "50 %", "100 %"]
    # the summary over all targets
    summary = html.split("<h2>Quality</h2>", 1)[1].split("</table>", 1)[0]
    assert re.findall(r'<th scope="col">([^<]+)</th>', summary) == ["paper-mean", "maco"]
    assert re.findall(r"<td>(.*?)</td>", _row(summary, "fidelity"))[1].startswith("40 %")


def test_metric_table_unknown_keys_get_readable_names() -> None:
    table = metric_table({"a": {"new_metric_central": 1.0, "new_metric": 2.0, "odd": {"x": 1}}})
    assert [(r.label, r.cells[0].seen, r.cells[0].central) for r in table.rows] == [
        ("new metric", "2", "1"), ("odd: x", "1", None)]


# --------------------------------------------------------------------------- sparklines
def _points(chart: Sparkline) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in chart.points.split()]


def _check_follows(chart: Sparkline, trace: np.ndarray) -> list[int]:
    """Each point lies on the trace (x → step, y → the value at that step); returns the steps."""
    steps = []
    y_tol = 0.006 / (chart.height - 4) * (chart.high - chart.low) + 1e-9
    for x, y in _points(chart):
        step = round((x - 2) / (chart.width - 4) * (len(trace) - 1))
        assert abs(chart.x_of(step) - x) < 0.006
        value = chart.high - (y - 2) / (chart.height - 4) * (chart.high - chart.low)
        assert abs(value - trace[step]) <= y_tol * 1.01, (step, value, trace[step])
        steps.append(step)
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    return steps


def test_sparkline_follows_the_trace() -> None:
    trace = np.array([0.5, 2.0, 1.0, 3.5, 3.0, 4.0], np.float32)
    chart = sparkline(trace)
    assert chart is not None and (chart.start, chart.end, chart.steps) == (0.5, 4.0, 6)
    assert _check_follows(chart, trace) == list(range(6))
    ys = [y for _, y in _points(chart)]
    assert ys[5] == min(ys) == 2.0 and ys[0] == max(ys) == 28.0  # up is more
    # a reference line widens the range to hold it
    with_ref = sparkline(trace, reference=6.0)
    assert with_ref.high == 6.0 and with_ref.reference_y == 2.0
    _check_follows(with_ref, trace)

    rng = np.random.default_rng(0)
    long = np.cumsum(rng.normal(size=5000)).astype(np.float32)
    long[1234] = 500.0  # a spike must survive the downsampling
    chart = sparkline(long)
    steps = _check_follows(chart, long)
    assert len(steps) <= SPARK_POINTS + 2
    assert steps[0] == 0 and steps[-1] == 4999 and 1234 in steps
    assert int(np.argmin(long)) in steps

    gappy = np.array([np.nan, 1.0, np.inf, 2.0, np.nan])
    chart = sparkline(gappy)
    assert (chart.start, chart.end) == (1.0, 2.0) and _check_follows(chart, gappy) == [1, 3]
    assert sparkline([np.nan, np.nan]) is None and sparkline([]) is None
    flat = sparkline([2.0, 2.0, 2.0])
    assert {y for _, y in _points(flat)} == {15.0}


def test_sparklines_on_the_page(fake_runs, fake: tuple[Path, dict, str]) -> None:
    run, results, html = fake
    n_visuals = sum(len(f["visualizations"]) for t in results["targets"] for f in t["facets"])
    n_visuals += sum(len(b) for t in results["targets"] for b in t["baselines"].values())
    assert html.count("<polyline ") == n_visuals
    facet = results["targets"][0]["facets"][1]
    vis = facet["visualizations"]["paper-mean"]
    trace = np.load(run / vis["trace"])
    assert len(trace) == fake_runs.LONG_TRACE
    figure = html.split(f'<img class="vis" src="{quote(vis["path"])}"', 1)[1]
    figure = figure.split("</figure>", 1)[0]
    points = re.search(r'<polyline points="([^"]+)"', figure).group(1)
    ref_y = float(re.search(r'<line class="ref" [^>]*y1="([^"]+)"', figure).group(1))
    chart = sparkline(trace, reference=facet["activation_real"]["max"])
    assert points == chart.points and ref_y == chart.reference_y
    assert len(_check_follows(chart, trace)) <= SPARK_POINTS + 2
    ends = f"{trace[0]:.4g} → {trace[-1]:.4g}"
    assert f'<span class="ends">{ends}</span>' in figure
    assert (f"({fake_runs.LONG_TRACE} steps): {ends}; dashed: the facet&#39;s best photo "
            "(10.5)") in figure


def test_unreadable_or_missing_traces_leave_their_chart_out(fake_runs, tmp_path: Path) -> None:
    run, results = fake_runs.make(tmp_path)
    facet = results["targets"][1]["facets"][0]["visualizations"]
    (run / facet["paper-mean"]["trace"]).write_bytes(b"\x93NUMPY garbage")
    (run / facet["maco"]["trace"]).unlink()
    html = write_report(run, results, progress=False).read_text(encoding="utf-8")
    figures = {recipe: html.split(f'<img class="vis" src="{quote(v["path"])}"', 1)[1]
               .split("</figure>", 1)[0] for recipe, v in facet.items()}
    assert "<polyline" not in figures["paper-mean"] and "<polyline" not in figures["maco"]
    assert ".npy</a>" in figures["paper-mean"] and ".npy</a>" not in figures["maco"]
    pictures = sum(len(f["visualizations"]) for t in results["targets"] for f in t["facets"])
    pictures += sum(len(b) for t in results["targets"] for b in t["baselines"].values())
    assert pictures == 20 and html.count("<polyline ") == 18  # the others keep their chart


# --------------------------------------------------------------------------- verdicts
def _judged_target(mfv: dict, random: dict | None, fidelity: list[bool],
                   ratios: list[float]) -> dict:
    facets = [{"metrics": {"anchored": {"fidelity": ok, "activation_ratio": r}}}
              for ok, r in zip(fidelity, ratios, strict=True)]
    metrics: dict = {"facet": {"anchored": mfv}}
    if random is not None:
        metrics["random"] = {"anchored": random}
    return {"class_index": None, "facets": facets, "metrics": metrics,
            "target": {"terms": [{"weight": 1.0, "layer": "fc", "unit": 0},
                                 {"weight": 1.0, "layer": "fc", "unit": 2}]}}


def test_verdict_when_mfv_wins() -> None:
    target = _judged_target(
        {"diversity": 0.38, "coverage": {"own": 0.5, "lite1": 1.0, "lite2": 1.0}},
        {"diversity": 0.2, "activation_ratio": 0.8,
         "coverage": {"own": 1.0, "lite1": 0.5, "lite2": 0.5}},
        [True, True], [1.3, 1.5])
    (v,) = verdicts(target, "own")
    assert v.outcome == "better"
    assert v.text == (
        "MFV (anchored) beats random starts on coverage, activation and diversity: covers 2/2 "
        "classes vs 1/2 from random starts, judged by 2 other networks; 2/2 pictures stay in "
        "their facet (fidelity 100 %); 1.4× the best photo vs 0.8× from random starts; "
        "1.9× more diverse than random starts")
    # without independent networks, the optimized one judges, and the verdict says so
    target["metrics"]["facet"]["anchored"]["coverage"] = {"own": 1.0}
    target["metrics"]["random"]["anchored"]["coverage"] = {"own": 0.5}
    assert "covers 2/2 classes vs 1/2 from random starts, judged by own;" in \
        verdicts(target, "own")[0].text


def test_verdict_when_mfv_loses() -> None:
    target = _judged_target(
        {"diversity": 0.1, "coverage": {"lite1": 0.5}},
        {"diversity": 0.3, "activation_ratio": 1.1, "coverage": {"lite1": 1.0}},
        [True, False], [0.6, 0.8])
    (v,) = verdicts(target, "own")
    assert v.outcome == "worse"
    assert v.summary == "loses to random starts on coverage, activation and diversity"
    assert [c.outcome for c in v.clauses] == ["worse", "info", "worse", "worse"]
    assert "covers 1/2 classes vs 2/2 from random starts, judged by 1 other network" in v.text
    assert "1/2 pictures stay in their facet (fidelity 50 %)" in v.text
    assert "0.7× the best photo vs 1.1× from random starts" in v.text
    assert "3× less diverse than random starts" in v.text

    # mixed, with a tie: both said
    target = _judged_target({"diversity": 0.3, "coverage": {"lite1": 1.0}},
                            {"diversity": 0.301, "activation_ratio": 2.0,
                             "coverage": {"lite1": 0.5}}, [True], [1.0])
    (v,) = verdicts(target, "own")
    assert v.outcome == "mixed"
    assert v.summary == "beats random starts on coverage but loses on activation, ties on " \
        "diversity"
    assert "as diverse as random starts (0.3 vs 0.3)" in v.text
    # nothing to compare with: no winner claimed
    (v,) = verdicts(_judged_target({"diversity": 0.3}, None, [True], [1.2]), "own")
    assert v.outcome == "alone" and v.text == (
        "MFV (anchored) has no random starts to compare with: 1/1 pictures stay in their facet "
        "(fidelity 100 %); 1.2× the best photo; diversity 0.3")


def test_verdicts_on_the_page(fake: tuple[Path, dict, str]) -> None:
    _, results, html = fake
    section = _section(html, 0)
    found = re.findall(r'<p class="verdict" data-outcome="([a-z]+)">(.*?)</p>', section)
    texts = [(o, html_mod.unescape(re.sub(r"<[^>]+>", "", t))) for o, t in found]
    expected = verdicts(results["targets"][0], results["model"]["name"])
    assert texts == [(v.outcome, v.text) for v in expected]
    assert [v.recipe for v in expected] == ["paper-mean", "maco"]
    assert texts[0][0] == "better" and texts[1][0] == "mixed"
    assert "covers 2/2 classes vs 1/2 from random starts" in texts[0][1]
    assert texts[1][1].startswith("MFV (maco) beats random starts on diversity but loses on "
                                  "coverage and activation: covers 1/2 classes vs 2/2")
    # the channel target has no classes to cover: the verdict leaves coverage out
    channel = _section(html, 1)
    assert channel.count('class="verdict"') == 2 and "covers" not in channel


# --------------------------------------------------------------------------- transparency
def test_transparency_map_next_to_its_picture(fake: tuple[Path, dict, str]) -> None:
    _, results, html = fake
    imgs = [i for i in _parse(html).imgs if i.get("class") != "tile-img"]
    srcs = [unquote(i["src"] or "") for i in imgs]
    visuals = [v for t in results["targets"] for f in t["facets"]
               for v in f["visualizations"].values()]
    visuals += [b for t in results["targets"] for items in t["baselines"].values()
                for b in items]
    with_alpha = [v for v in visuals if "alpha" in v]
    assert len(with_alpha) == 10  # every maco picture: 5 facets, 5 random starts
    for v in visuals:
        i = srcs.index(v["path"])
        if "alpha" in v:  # the very next image is its transparency map
            assert srcs[i + 1] == v["alpha"]
            assert imgs[i + 1]["class"] == "vis alpha"
            assert (imgs[i + 1]["alt"] or "").endswith("transparency map")
        else:
            assert imgs[i + 1]["class"] != "vis alpha"
    assert html.count("<br>transparency map</figcaption>") == 10


# --------------------------------------------------------------------------- escaping
def test_hostile_names_in_recipes_judges_and_metrics(fake_runs, tmp_path: Path) -> None:
    run, results = fake_runs.make(tmp_path)
    evil_recipe = "<script>alert(6)</script>&"
    hostile = json.loads(json.dumps(results).replace('"maco"', json.dumps(evil_recipe)))
    hostile["targets"][0]["facets"][0]["metrics"]["paper-mean"]["<img src=y onerror=alert(7)>"] \
        = 1.0
    hostile["settings"]["recipes"] = ["paper-mean", evil_recipe]
    html = write_report(run, hostile, progress=False).read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=y" not in html
    assert len(_parse(html).scripts) == 2
    escaped = html_escape(evil_recipe)
    assert f"<b>MFV ({escaped})</b>" in html  # the verdict
    assert f'<th scope="col">{escaped}: random starts</th>' in html  # a table's column
    assert f"{escaped}<br><b" in html  # a picture's caption
    assert f'<div class="muted small">{escaped}</div>' in html  # the random starts' recipe
    assert "&lt;img src=y onerror=alert(7)&gt;" in html  # an unknown metric, shown as text
    assert f"coverage by {_esc(fake_runs.EVIL_JUDGE)}" in html
    judge = fake_runs.EVIL_JUDGE
    assert judge not in html and html_escape(judge, quote=False) not in html


# --------------------------------------------------------------------------- pages
def test_a_new_page_on_the_base_layout(fake_runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """What the Layers page will do: its own template on base.html, in the navigation."""
    run, results = fake_runs.make(tmp_path)
    rundir = RunDir(run)
    layers = PageSpec("layers", "Layers", lambda r: r.root / "layers.html")
    monkeypatch.setattr(pages, "PAGES", MappingProxyType({**PAGES, "layers": layers}))
    template = ('{% extends "base.html" %}{% from "macros.html" import picture %}'
                '{% block content %}<p id="x">{{ x }}</p>{{ picture(im) }}{% endblock %}')
    package = pages.environment

    def with_layers() -> jinja2.Environment:
        env = package()
        env.loader = jinja2.ChoiceLoader([jinja2.DictLoader({"layers.html": template}),
                                          env.loader])
        return env

    monkeypatch.setattr(pages, "environment", with_layers)
    links = pages.Links(rundir, layers)
    evil = fake_runs.EVIL_CLASS
    im = pages.Img(links.file(results["targets"][0]["facets"][0]["mean_image"]), evil,
                   "vis")
    out = write_page(rundir, "layers", {"title": f"Layers {evil}", "x": evil,
                                        "im": im, "script_data": {"n": fake_runs.EVIL_CLASS}})
    assert out == run / "layers.html"
    html = out.read_text(encoding="utf-8")
    refs = _parse(html)
    assert f'<p id="x">{_esc(evil)}</p>' in html and evil not in html
    assert f"<title>Layers {_esc(fake_runs.EVIL_CLASS)}</title>" in html
    assert _page_data(refs) == {"n": fake_runs.EVIL_CLASS} and len(refs.scripts) == 2
    assert "<style>:root {" in html and "Generated by mfv" in html
    assert (run / unquote(refs.imgs[0]["src"])).is_file()
    # the navigation names the pages whose files exist (none other yet), the current one marked
    assert '<nav class="pages">' not in html
    write_report(run, results, progress=False)
    html = write_page(rundir, "layers", {"title": "Layers", "x": "", "im": im}).read_text()
    assert ('<nav class="pages"><a href="index.html">Run</a>'
            '<a href="layers.html" aria-current="page">Layers</a></nav>') in html
    index = write_report(run, results, progress=False).read_text()
    assert ('<nav class="pages"><a href="index.html" aria-current="page">Run</a>'
            '<a href="layers.html">Layers</a></nav>') in index

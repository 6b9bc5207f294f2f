"""The Layers page (RUN/layers.html) of `mfv sweep`, on a real tiny-network sweep that also
rendered one unit per layer: plot, answer, per-layer table and example units are there and
agree with sweep.json, every image loads in headless Chromium, measures read by their plain
names, hostile layer and file names stay text, and the run page and the Layers page link to
each other (the rendered units to their sections of the run page)."""

from __future__ import annotations

import copy
import html as html_mod
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import markupsafe
import pytest

from conftest import SWEEP, make_images, make_tiny
from mfv.report import write_layers_page
from mfv.report.layers_page import answer_sentence
from mfv.report.run_page import STRIP_MAX
from mfv.results.metrics import SWEEP_MEASURES, format_value
from mfv.study.layers import sweep

EVIL_LAYER = "blocks.<script>alert(5)</script>\"&'"
RENDER = dict(render=1, steps=10, recipes=["paper-mean"], baseline=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """A sweep of the tiny network that rendered the first unit of each layer, then its
    Layers page: (run directory, sweep.json, the page's HTML)."""
    root = tmp_path_factory.mktemp("layers")
    out = root / "run"
    sweep(model=make_tiny(), images=str(make_images(root / "imgs", n=40)), out=str(out), **SWEEP,
          **RENDER)
    (out / "layers.html").unlink(missing_ok=True)  # whatever sweep() wrote: write it here
    doc = json.loads((out / "sweep" / "sweep.json").read_text(encoding="utf-8"))
    page = write_layers_page(out, doc, progress=False)
    assert page == out / "layers.html"
    return out, doc, page.read_text(encoding="utf-8")


def _esc(text: str) -> str:
    return str(markupsafe.escape(text))


def _answers(html: str) -> dict[str, tuple[str, str]]:
    """measure key → (trend, sentence) as the page shows them."""
    found = re.findall(r'<p class="verdict answer" data-measure="([^"]+)" data-trend="([^"]+)">'
                       r'<span class="m" title="[^"]*">([^<]*)</span>', html)
    return {key: (trend, html_mod.unescape(text)) for key, trend, text in found}


def _strip(facet: dict[str, Any]) -> list[str]:
    """The images an example facet's strip shows: the representatives its mean image averages,
    then its other members, at most STRIP_MAX."""
    return list(dict.fromkeys([*facet.get("representatives", []), *facet["members"]]))[:STRIP_MAX]


def _expected_images(doc: dict[str, Any]) -> int:
    """The plot, and per example facet its mean image and its shown members."""
    return 1 + sum(1 + len(_strip(f)) for e in doc["layers"]
                   for u in e["examples"] for f in u["facets"])


# ------------------------------------------------------------------------- the page
@pytest.mark.slow
def test_the_page_shows_the_plot_table_and_every_layers_examples(swept) -> None:
    out, doc, html = swept
    assert f'<img class="plot" src="{quote(doc["plot"]["png"])}"' in html
    assert f'<a href="{quote(doc["plot"]["svg"])}">SVG</a>' in html
    assert set(_answers(html)) == set(doc["measures"]) == set(SWEEP_MEASURES)
    for entry in doc["layers"]:
        row = html.split(f'<tr data-layer="{entry["depth"]}">', 1)[1].split("</tr>", 1)[0]
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[1] == str(len(entry["units"]))  # units measured
        for key, cell in zip(doc["measures"], cells[2:], strict=True):
            s, kind = entry["summary"][key], SWEEP_MEASURES[key].kind
            power = entry["calibration"]["measures"][key]["power"]
            assert html_mod.unescape(cell) == (f"{format_value(s['mean'], kind)} <span class="
                                               f'"ci">{format_value(s["low"], kind)}–'
                                               f'{format_value(s["high"], kind)}</span>'
                                               + (' <span class="nopower">no power</span>'
                                                  if power is False else ""))
        section = html.split(f'<code>{_esc(entry["layer"])}</code></h2>', 1)[1].split(
            "</section>", 1)[0]
        cards = section.split('<article class="card ucard"')[1:]
        assert [int(re.match(r' data-unit="(\d+)"', c)[1]) for c in cards] == [
            u["unit"] for u in entry["examples"]] and cards
        for card, unit in zip(cards, entry["examples"], strict=True):
            facets = card.split('<div class="lfacet"')[1:]
            assert len(facets) == len(unit["facets"]) == unit["k"]
            for block, facet in zip(facets, unit["facets"], strict=True):
                assert f'src="{quote(facet["mean_image"])}"' in block
                assert f"{facet['size']} images" in block
                shown = _strip(facet)
                assert block.count('class="thumb"') == len(shown)
                # a patch unit shows the crops its mean image averages, each a link to the
                # whole photo with the crop outlined, as the run's report does
                crops = sum(p in facet["representatives"] for p in shown) if \
                    entry["units"][0]["region"] == "patch" else 0
                assert block.count("the crop its unit saw") == crops
                assert len(facet.get("boxes", [])) == (len(facet["representatives"]) if crops
                                                       else 0)
                more = facet["size"] - len(shown)
                assert (f'<span class="more">+{more}</span>' in block) == (more > 0)
    assert any(f.get("boxes") for e in doc["layers"] for u in e["examples"]
               for f in u["facets"])  # the conv layers' units are patch units
    for key in ("k", "polysemanticity", "separation"):  # where the measure can be read
        powered = doc["answer"][key]["with_power"]["layers"]
        sentence = re.search(rf'<p class="verdict power small" data-measure="{key}">([^<]*)</p>',
                             html)
        assert sentence and f"power at {len(powered)} of the" in html_mod.unescape(
            sentence[1]), key
    chance = html.split("<tfoot>", 1)[1]
    for key in doc["measures"]:
        assert format_value(doc["chance"][key]["mean"], SWEEP_MEASURES[key].kind) in chance


@pytest.mark.slow
@pytest.mark.browser
def test_every_image_loads_and_no_raw_measure_key_is_visible(swept, report_browser) -> None:
    out, doc, _ = swept
    with report_browser(out / "layers.html") as rp:
        n, bad = rp.images_not_loaded()
        text = rp.page.inner_text("body")
        headers = rp.page.eval_on_selector_all(
            "th[data-measure] .m", "els => els.map(e => [e.closest('th').dataset.measure, "
            "e.textContent, e.title])")
        requests = rp.requests
        assert not rp.console_errors and not rp.page_errors
    assert n == _expected_images(doc) and bad == []
    assert all(r.startswith("file://") for r in requests), requests
    # each measure is named plainly in its column and explained on hover
    assert headers == [[k, SWEEP_MEASURES[k].label, SWEEP_MEASURES[k].explanation]
                       for k in doc["measures"]]
    raw = {"k", "polysemanticity", "mono_score", "activation_max", "first_quarter",
           "last_quarter", "n_valid", "n_images", "mean_image", "top_n", "mean_of", "scan_key"}
    for key in raw:
        assert not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text), key
    for key in doc["measures"]:
        assert SWEEP_MEASURES[key].label in text and SWEEP_MEASURES[key].explanation in text


# ------------------------------------------------------------------------- the answer
def test_the_answer_sentence_in_plain_words() -> None:
    line = dict(first_quarter=0.21, last_quarter=0.34, chance=0.35)
    assert answer_sentence("1 − MonoScore", dict(slope=0.012, low=0.008, high=0.016, **line)) == (
        "grows", "1 − MonoScore grows with depth: +0.012 per layer (95 % CI 0.008–0.016), "
        "0.21 in the first quarter vs 0.34 in the last; chance 0.35")
    assert answer_sentence("separation ratio", dict(slope=-0.39, low=-0.64, high=-0.018,
                                                    first_quarter=1.7, last_quarter=0.97,
                                                    chance=2.0))[1] == (
        "Separation ratio shrinks with depth: −0.39 per layer (95 % CI −0.64 to −0.018), "
        "1.7 in the first quarter vs 0.97 in the last; chance 2")
    assert answer_sentence("x", dict(slope=4.8e-3, low=-5.1e-6, high=7.2e-3, **line)) == (
        "unclear", "X shows no clear trend with depth: +0.0048 per layer (95 % CI "
        "−0.0000051 to 0.0072), 0.21 in the first quarter vs 0.34 in the last; chance 0.35")
    # a constant measure: its slope is round-off, and says so
    assert answer_sentence("number of facets", dict(slope=2e-16, low=2e-16, high=6e-16,
                                                    first_quarter=2.0, last_quarter=2.0,
                                                    chance=2.0)) == (
        "flat", "Number of facets does not change with depth: 2 in the first quarter vs 2 in "
        "the last; chance 2")
    nan = float("nan")
    assert answer_sentence("x", dict(slope=nan, low=nan, high=nan)) == (
        "unknown", "X: too few layers with measured units to tell a trend.")


_SENTENCE = re.compile(
    r"^(?P<subject>.+?) (?P<verb>grows|shrinks|shows no clear trend|does not change) with "
    r"depth: (?:(?P<slope>\S+) per layer \(95 % CI (?P<low>\S+?)(?:–| to )(?P<high>\S+)\), )?"
    r"(?P<first>\S+) in the first quarter vs (?P<last>\S+) in the last; chance (?P<chance>\S+)$")


def _close(shown: str, value: float) -> bool:
    """`shown` is `value` to two significant digits."""
    return math.isclose(float(shown.replace("−", "-")), value, rel_tol=0.051, abs_tol=1e-12)


@pytest.mark.slow
def test_the_answer_on_the_page_matches_sweep_json(swept) -> None:
    _, doc, html = swept
    shown = _answers(html)
    for key in doc["measures"]:
        a, (trend, text) = doc["answer"][key], shown[key]
        m = _SENTENCE.match(text)
        assert m, text
        assert m["subject"].lower() == SWEEP_MEASURES[key].label.lower()
        for part in ("first", "last"):
            assert _close(m[part], a[f"{part}_quarter"]), (text, a)
        assert _close(m["chance"], doc["chance"][key]["mean"]), text
        scale = 1e-9 * max(1.0, abs(a["first_quarter"]), abs(a["last_quarter"]))
        if m["verb"] == "does not change":
            assert trend == "flat" and max(abs(a[k]) for k in ("slope", "low", "high")) < scale
            continue
        assert all(_close(m[k], a[k]) for k in ("slope", "low", "high")), (text, a)
        if m["verb"] == "grows":
            assert trend == "grows" and a["low"] > scale
        elif m["verb"] == "shrinks":
            assert trend == "shrinks" and a["high"] < -scale
        else:
            assert trend == "unclear" and a["low"] <= scale and a["high"] >= -scale


# ------------------------------------------------------------------------- hostile names
@pytest.mark.slow
@pytest.mark.browser
def test_hostile_layer_and_file_names_are_text(swept, tmp_path: Path, fake_runs,
                                              report_browser) -> None:
    out, doc, _ = swept
    run = tmp_path / "run"
    shutil.copytree(out / "sweep", run / "sweep")
    doc = copy.deepcopy(doc)
    doc["model"]["name"], doc["embedder"] = fake_runs.EVIL_CLASS, fake_runs.EVIL_JUDGE
    doc["data"]["source"] = f"folder {fake_runs.EVIL_LABEL}"
    for entry in doc["layers"]:
        entry["layer"] += EVIL_LAYER
    facet = doc["layers"][0]["examples"][0]["facets"][0]
    evil = tmp_path / "in" / fake_runs.EVIL_NAME
    evil.parent.mkdir()
    shutil.copy(facet["members"][0], evil)
    facet["members"][:2] = [str(evil), str(tmp_path / "in" / "gone.png")]
    facet["representatives"], facet["boxes"] = facet["members"][:2], []  # whole photos shown
    odd = Path(facet["mean_image"]).with_name(fake_runs.ODD_VIS_NAME).as_posix()
    (run / facet["mean_image"]).rename(run / odd)
    facet["mean_image"] = odd
    html = write_layers_page(run, doc, progress=False).read_text(encoding="utf-8")
    assert not (run / "index.html").exists()  # no run page here: none is made, none linked
    assert "rendered →" not in html and "index.html" not in html
    f = fake_runs
    for s in (f.EVIL_CLASS, f.EVIL_JUDGE, f.EVIL_LABEL, EVIL_LAYER, str(evil)):
        assert s not in html and _esc(s) in html, s
    assert f'src="{quote(odd)}"' in html and 'class="ph thumb"' in html  # the missing member
    ids = re.findall(r'<section class="layer" id="([^"]+)"', html)
    assert len(ids) == len(doc["layers"]) and all(re.fullmatch(r"[\w-]+", i) for i in ids)
    with report_browser(run / "layers.html") as rp:
        n, bad = rp.images_not_loaded()
        codes = rp.page.eval_on_selector_all("section.layer h2 code", "e => e.map(c => "
                                             "c.textContent)")
        titles = rp.page.eval_on_selector_all("img.thumb", "e => e.map(i => i.title)")
        linked = rp.page.eval_on_selector_all(
            ".tnav a", "e => e.slice(2).map(a => !!document.getElementById("
            "decodeURIComponent(a.hash.slice(1))))")
        assert not rp.dialogs and not rp.page_errors and not rp.console_errors
    assert bad == [] and n == _expected_images(doc) - 1  # the missing member: a placeholder
    assert codes == [e["layer"] for e in doc["layers"]]
    assert str(evil) in titles and linked == [True] * len(doc["layers"])


# ------------------------------------------------------------------------- navigation
@pytest.mark.slow
@pytest.mark.browser
def test_the_run_page_and_the_layers_page_link_both_ways(swept, report_browser) -> None:
    out, doc, html = swept
    index = (out / "index.html").read_text(encoding="utf-8")
    assert ('<nav class="pages"><a href="index.html" aria-current="page">Run</a>'
            '<a href="layers.html">Layers</a></nav>') in index
    assert ('<nav class="pages"><a href="index.html">Run</a>'
            '<a href="layers.html" aria-current="page">Layers</a></nav>') in html
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rendered = {t["spec"] for t in results["targets"]}
    assert rendered == {f"{e['layer']}:{e['units'][0]['unit']}" for e in doc["layers"]}
    with report_browser(out / "index.html") as rp:
        page = rp.page
        page.click("nav.pages a:text('Layers')")
        page.wait_for_load_state()
        assert unquote(page.url).endswith("/layers.html")
        links = page.eval_on_selector_all(
            "a.rendered", "e => e.map(a => [a.closest('section').querySelector('h2 code')"
            ".textContent + ':' + a.closest('article').dataset.unit, a.getAttribute('href')])")
        assert {spec for spec, _ in links} == rendered and len(links) == len(rendered)
        for spec, href in links:
            page.goto((out / "layers.html").resolve().as_uri())
            page.click(f"a.rendered[href='{href}']")
            page.wait_for_load_state()
            assert unquote(page.url).endswith(f"/index.html{href.removeprefix('index.html')}")
            shown = page.evaluate("() => document.getElementById(location.hash.slice(1))"
                                  ".querySelector('h2 code').textContent")
            assert shown == spec
        assert not rp.page_errors

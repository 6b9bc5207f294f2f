"""Notebook display: `Results`, a target and a facet as self-contained HTML (`_repr_html_`,
pictures inlined, every user string escaped), `mfv.open` on finished and unfinished run
directories, `mfv.run`'s typed results, `mfv.visualize`'s pictures, and progress bars that
`progress=False` silences."""

from __future__ import annotations

import base64
import io
import json
import re
from html import escape

import numpy as np
import pytest
from PIL import Image

import mfv
from conftest import make_images
from mfv.api import Visualization
from mfv.core.errors import MfvError
from mfv.results.model import Results

INLINE_PNG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, fake_runs):
    run, doc = fake_runs.make(tmp_path_factory.mktemp("display"))
    (run / "results.json").write_text(json.dumps(doc))
    return run, doc


def _sources(html: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', html)


def test_a_run_displays_self_contained_with_every_user_string_escaped(fake_run, fake_runs):
    run, doc = fake_run
    results = mfv.open(run)
    html = results._repr_html_()
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert escape(fake_runs.EVIL_NAME) in html  # a member photo's name, in its thumbnail's title
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in html  # the target spec, class name
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "<b>bold</b>" not in html
    sources = _sources(html)
    assert sources and all(s.startswith("data:image/") for s in sources)  # nothing to fetch
    pictures = sum(len(f["visualizations"]) + 1 for t in doc["targets"] for f in t["facets"])
    assert html.count(INLINE_PNG) >= pictures  # each facet's pictures and mean image
    assert "missing" in html and "unreadable" in html  # the listed-but-absent, the broken photo
    assert html.count("<svg") == len(doc["targets"])  # a facet map per target
    assert 'class="mfv-target"' in html and html.count('class="mfv-facet"') == 5


def test_a_target_and_a_facet_display_alone_with_their_paths_resolved(fake_run):
    run, doc = fake_run
    results = mfv.open(run)
    target = results.targets[1]
    html = target._repr_html_()
    assert html.startswith('<div class="mfv-target"') and html.count('class="mfv-facet"') == 2
    assert html.count("<circle") == len(doc["targets"][1]["map"])
    facet = target.facets[0]
    alone = facet._repr_html_()
    assert alone.count(INLINE_PNG) == len(facet.visualizations) + 1
    assert alone.count("data:image/jpeg;base64,") == min(8, len(facet.members))  # the strip
    decoded = Image.open(io.BytesIO(base64.b64decode(_sources(alone)[0].split(",", 1)[1])))
    assert max(decoded.size) <= 128  # a thumbnail, not the picture


def test_their_plain_text_is_one_line_not_every_field(fake_run):
    from IPython.lib.pretty import pretty

    results = mfv.open(fake_run[0])
    assert pretty(results) == (f"Results(status='complete', root={str(results.root)!r}, "
                               f"targets={[t.spec for t in results.targets]!r})")
    assert pretty(results.targets[0]) == "TargetResult(spec='_fc:0 + _fc:701', " \
        "facet_sizes=[22, 6, 5])"
    assert pretty(results.targets[0].facets[1]) == \
        "Facet(rank=1, size=6, pictures=['paper-mean', 'maco'])"


def test_results_without_their_run_directory_still_display(fake_run):
    _, doc = fake_run
    results = Results.model_validate(doc)
    assert results.root is None
    html = results._repr_html_()
    assert "no file" in html and INLINE_PNG not in html  # nothing resolved, nothing guessed


def test_open_needs_a_finished_run_directory(tmp_path, fake_run):
    run, _ = fake_run
    assert mfv.open(str(run)).root == run.resolve()
    with pytest.raises(MfvError, match="no such run directory"):
        mfv.open(tmp_path / "nowhere")
    with pytest.raises(MfvError, match=r"no results.json \(it is not an mfv run directory\)"):
        mfv.open(tmp_path)
    started = tmp_path / "started"
    started.mkdir()
    (started / ".lock").touch()
    (started / "settings.json").write_text("{}")
    with pytest.raises(MfvError, match="its run has not finished yet"):
        mfv.open(started)
    (started / "results.json").write_text('{"targets": [{"facets": "many"}]')
    with pytest.raises(MfvError, match="not readable as mfv results"):
        mfv.open(started)


def test_visualize_pictures_display_as_a_grid_with_their_activations():
    shown = Visualization([np.full((40, 40, 3), 200, np.uint8)] * 2,
                          [np.array([0.5, 2.0]), np.array([0.1, 3.0])], [2.0, 3.25],
                          "<script>bad</script>", "fourier")
    html = shown._repr_html_()
    assert html.count(INLINE_PNG) == 2 and "activation 3.25" in html and "from 0.1" in html
    assert "<script>" not in html and "&lt;script&gt;bad" in html


FAST = dict(targets=["fc:0 + fc:2"], facets=2, mean_of=3, steps=10, embedding="pca",
            judges=[], baseline=False, device="cpu")


def test_run_returns_typed_located_results_and_progress_false_is_silent(tmp_path, tiny, capfd):
    images = make_images(tmp_path / "imgs", 12)
    capfd.readouterr()
    results = mfv.run(model=tiny, images=str(images), out=str(tmp_path / "quiet"),
                      progress=False, **FAST)
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""  # no bar, no print
    assert isinstance(results, Results) and results.root == (tmp_path / "quiet").resolve()
    assert results.to_dict() == json.loads((tmp_path / "quiet" / "results.json").read_text())
    (target,) = results.targets
    assert len(target.facets) == 2 and target.facets[0].visualizations["anchored"].path
    assert results._repr_html_().count(INLINE_PNG) == 4  # 2 facets x (picture, mean image)
    mfv.run(model=tiny, images=str(images), out=str(tmp_path / "loud"), until="render", **FAST)
    loud = capfd.readouterr().err
    assert "scan" in loud and "img" in loud and "step" in loud  # the scan's and render's bars

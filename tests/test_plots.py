"""Layer-measure figures: a valid PNG and SVG, one point per layer in every panel."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import matplotlib
import numpy as np
import pytest
from PIL import Image

from mfv.core.errors import MfvError
from mfv.report.plots import panel_id, plot_layer_measures

LAYERS = ["stem", "blocks.1", "blocks.3", "blocks.5", "head"]
SVG = "{http://www.w3.org/2000/svg}"


def _measures():
    rng = np.random.default_rng(0)
    out = {}
    for name in ("k (facets)", "1 - MonoScore", "separation ratio"):
        mean = rng.uniform(1, 3, len(LAYERS))
        out[name] = [(m, m - 0.2, m + 0.3) for m in mean]
    return out


def _group(root: ET.Element, gid: str) -> ET.Element:
    found = [g for g in root.iter(f"{SVG}g") if g.get("id") == gid]
    assert len(found) == 1, f"no single SVG group {gid!r}"
    return found[0]


def test_png_and_svg_are_written_with_one_point_per_layer(tmp_path):
    backend = matplotlib.get_backend()
    measures = _measures()
    chance = {"1 - MonoScore": [0.5] * len(LAYERS), "separation ratio": [1.0] * len(LAYERS)}
    paths = plot_layer_measures(LAYERS, measures, chance, tmp_path / "fig" / "layers")
    assert [p.name for p in paths] == ["layers.png", "layers.svg"]
    assert matplotlib.get_backend() == backend  # global state untouched
    assert not list((tmp_path / "fig").glob(".*tmp"))  # atomic writes leave no temp files

    with Image.open(paths[0]) as img:
        img.verify()
    with Image.open(paths[0]) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert 800 <= width <= 4000 and 300 <= height <= 2000

    root = ET.parse(paths[1]).getroot()
    assert root.tag == f"{SVG}svg"
    for name in measures:
        markers = _group(root, f"mean-{panel_id(name)}").findall(f".//{SVG}use")
        assert len(markers) == len(LAYERS)
    for name in chance:
        (path,) = _group(root, f"chance-{panel_id(name)}").iter(f"{SVG}path")
        assert len(re.findall(r"[ML]", path.get("d"))) == len(LAYERS)
    raw = paths[1].read_text(encoding="utf-8")  # text is drawn as glyphs, named in comments
    assert all(f"<!-- {layer} -->" in raw for layer in LAYERS)


def test_nan_points_are_left_out_and_chance_is_optional(tmp_path):
    measures = {"silhouette": [(0.5, 0.4, 0.6), (np.nan,) * 3, (0.7, np.nan, 0.8),
                               (0.6, 0.5, 0.7), (0.9, 0.8, 1.0)]}
    _, svg = plot_layer_measures(LAYERS, measures, None, tmp_path / "s")
    root = ET.parse(svg).getroot()
    assert len(_group(root, "mean-silhouette").findall(f".//{SVG}use")) == len(LAYERS) - 1
    assert not [g for g in root.iter(f"{SVG}g") if (g.get("id") or "").startswith("chance")]


def test_rewriting_the_same_figure_gives_the_same_png(tmp_path):
    a = plot_layer_measures(LAYERS, _measures(), None, tmp_path / "a")[0].read_bytes()
    b = plot_layer_measures(LAYERS, _measures(), None, tmp_path / "a")[0].read_bytes()
    assert a == b


def test_mismatched_lengths_are_clear_errors(tmp_path):
    with pytest.raises(MfvError, match="one \\(mean, low, high\\) per layer"):
        plot_layer_measures(LAYERS, {"k": [(1, 1, 1)]}, None, tmp_path / "x")
    with pytest.raises(MfvError, match="not a plotted measure"):
        plot_layer_measures(LAYERS, _measures(), {"other": [0] * 5}, tmp_path / "x")
    with pytest.raises(MfvError, match="one value per layer"):
        plot_layer_measures(LAYERS, _measures(), {"k (facets)": [0]}, tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_the_calibration_draws_both_kinds_and_marks_layers_without_power(tmp_path):
    measures = _measures()
    name = "1 - MonoScore"
    rows = [(0.3, 0.5, True), (0.4, 0.4, False), (np.nan, np.nan, None), (0.3, 0.6, True),
            (0.5, 0.45, False)]
    _, svg = plot_layer_measures(LAYERS, measures, None, tmp_path / "c",
                                 calibration={name: rows})
    root = ET.parse(svg).getroot()
    pid = panel_id(name)
    assert len(_group(root, f"one-kind-{pid}").findall(f".//{SVG}use")) == 4  # NaN left out
    assert len(_group(root, f"two-kind-{pid}").findall(f".//{SVG}use")) == 4
    assert len(_group(root, f"no-power-{pid}").findall(f".//{SVG}use")) == 2  # layers 1, 4
    assert not [g for g in root.iter(f"{SVG}g")
                if (g.get("id") or "").startswith("no-power-k")]  # other panels: none
    with pytest.raises(MfvError, match="one \\(one-kind, two-kind, power\\) per layer"):
        plot_layer_measures(LAYERS, measures, None, tmp_path / "d", calibration={name: rows[:2]})

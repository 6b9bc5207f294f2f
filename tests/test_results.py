"""The typed results (`mfv.results`): the schema file is the model's, results.json is strict JSON
(no NaN or Infinity, whatever the run) and reads back into the model unchanged, and one metric
registry averages and names every metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mfv
from mfv.evaluate.evaluation import summary
from mfv.models import LoadedModel
from mfv.results.metrics import METRICS, SWEEP_MEASURES, markdown_table, means
from mfv.results.model import SCHEMA, Results, json_schema

REPO = Path(__file__).resolve().parents[1]
FAST = dict(mean_of=3, steps=10, embedding="pca", progress=False, device="cpu",
            recipes=["paper-mean"], targets=["fc:0"])


def strict_loads(text: str) -> object:
    """json.loads that refuses NaN, Infinity and -Infinity, as JavaScript's JSON.parse does."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_the_strict_parser_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        strict_loads('{"diversity": NaN}')


def test_the_schema_file_is_generated_from_the_model() -> None:
    committed = json.loads((REPO / "docs" / "results.schema.json").read_text(encoding="utf-8"))
    assert committed == json_schema(), "regenerate it: python -m mfv.results.model"
    assert committed["$id"] == SCHEMA == "mfv.results/2"


def test_undefined_numbers_are_written_as_null() -> None:
    doc = {"schema": SCHEMA, "targets": [{"spec": "fc:0", "activation_max_real": float("inf"),
                                          "metrics": {"facet": {"anchored": {
                                              "diversity": float("nan"),
                                              "coverage": {"own": np.float32("nan")}}}}}],
           "timings": {"scan": float("-inf")}, "evaluation": {"anchored": {"x": math.nan}}}
    results = Results.model_validate(doc)
    back = strict_loads(results.to_json())
    target = back["targets"][0]
    assert target["activation_max_real"] is None and back["timings"]["scan"] is None
    assert target["metrics"]["facet"]["anchored"] == {"diversity": None, "coverage": {"own": None}}
    assert back["evaluation"] == {"anchored": {"x": None}}
    assert results.model_dump(mode="json") == back  # the API's dict is strict too


def _pictures(root: Path, colours: list[tuple[int, int, int]]) -> Path:
    """Small photos of the given colours with noise; equal colours give identical files."""
    root.mkdir(parents=True)
    for i, colour in enumerate(colours):
        noise = np.random.default_rng(sum(colour)).integers(-30, 30, (36, 36, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
            root / f"img{i:02d}.png")
    return root


@pytest.mark.parametrize("case", ["one facet", "one image", "identical images"])
def test_results_json_is_strict_json(case: str, tiny: LoadedModel, tmp_path: Path) -> None:
    colours = {"one facet": [(200, 40 * i % 255, 90) for i in range(8)],
               "one image": [(200, 30, 90)],
               "identical images": [(120, 120, 120)] * 6}[case]
    images = _pictures(tmp_path / "imgs", colours)
    out = tmp_path / "run"
    mfv.run(model=tiny, images=str(images), out=str(out), facets=1, **FAST)  # each completes
    text = (out / "results.json").read_text(encoding="utf-8")
    doc = strict_loads(text)
    for stored in out.rglob("*.json"):  # every file of the run, indexes and records too
        strict_loads(stored.read_text(encoding="utf-8"))
    assert "NaN" not in text and "Infinity" not in text
    assert Results.model_validate(doc).to_dict() == doc  # reads back unchanged
    assert doc["status"] == "complete" and doc["error"] is None
    (target,) = doc["targets"]
    assert len(target["facets"]) == 1
    if case == "one facet":  # the case that wrote bare NaN: one picture has no diversity
        assert target["metrics"]["facet"]["paper-mean"]["diversity"] is None


# --------------------------------------------------------------------------- the registry
def test_one_registry_averages_every_metric() -> None:
    pictures = [{"fidelity": True, "activation": 2.0, "judge_ranks": [1, 3],
                 "diversity": float("nan")},
                {"fidelity": False, "activation": 4.0, "judge_ranks": [2, 2]},
                {"fidelity": None, "activation": 6.0}]
    assert means(pictures) == {"fidelity": 0.5, "activation": 4.0, "diversity": None}
    assert METRICS["fidelity"].average == "share" and METRICS["judge_ranks"].average == "none"
    # evaluate's summary over all facets of all targets is the registry's average
    per_target = {"a": {"facets": {"facet00": {"r": pictures[0]}, "facet01": {"r": pictures[1]}}},
                  "b": {"facets": {"facet00": {"r": pictures[2]}}}}
    assert summary(per_target) == {"r": means(pictures)}


def test_a_markdown_table_of_the_metrics() -> None:
    table = markdown_table(["fidelity", "k"], SWEEP_MEASURES | METRICS).splitlines()
    assert table[0].startswith("| metric |") and len(table) == 4
    assert table[2].startswith("| stays in its facet | Whether the picture's features")
    assert table[2].endswith("| share of yes |")
    assert METRICS["coverage"].markdown_row(0.5).endswith("| mean | 50 % |")

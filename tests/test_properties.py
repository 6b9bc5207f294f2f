"""Property-based tests (hypothesis) for the two texts a user writes: target strings and
settings files. Whatever is generated, mfv answers with a result or one `MfvError` — never
another exception — and the same input always gives the same result. (Damaged run
directories: tests/test_damage_hypothesis.py.)"""

from __future__ import annotations

import re
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny
from mfv.core.errors import MfvError
from mfv.models.targets import parse_targets
from mfv.runtime.settings import SECTIONS, make_settings

TINY = make_tiny()  # conv1, relu1, conv2, relu2, pool, flatten, fc; classes "red thing", ...
LAYERS = ("conv1", "conv2", "relu1", "relu2", "fc", "logits", "penultimate", "pool",
          "nope", "conv1.weight", "", "_fc")
TEXT = string.ascii_letters + string.digits + " _.:+-*()<>'\"\\\t\n,;=&"
FLAT = ("out", "model", "weights", "images", "targets", "reduction", "activation", "seed",
        "device", "size", "progress", "nonsense", *(n for s in SECTIONS.values()
                                                    for n in s.flat_names()))
CHECKED = settings(max_examples=2500, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])


def _parse(specs: list[str], reduction: str = "center") -> list[dict] | str:
    try:
        return [t.to_dict() for t in parse_targets(specs, TINY, reduction)]
    except MfvError as error:
        assert "\n" not in str(error).strip() and str(error).strip(), repr(error)
        return f"error: {error}"


number = st.one_of(st.integers(-3, 40).map(str), st.floats(-1e3, 1e3, allow_nan=False,
                                                            width=32).map(repr),
                   st.sampled_from(["nan", "inf", "-0", "1e400", "0x10", "1_0", "٣"]))
term = st.tuples(st.one_of(st.just(""), number.map(lambda w: f"{w}*")),
                 st.sampled_from(LAYERS),
                 st.one_of(st.integers(-2, 20).map(str), st.sampled_from(["*", "", "x", "1.5"])))
structured = st.lists(term, min_size=1, max_size=4).flatmap(
    lambda terms: st.lists(st.sampled_from([" + ", " - ", "+", " +", "--", " * "]),
                           min_size=len(terms) - 1, max_size=len(terms) - 1).map(
        lambda ops: "".join(f"{w}{layer}:{unit}" + (ops[i] if i < len(ops) else "")
                            for i, (w, layer, unit) in enumerate(terms))))
class_names = st.sampled_from(["red thing", "Red Thing", " dark ", "dark", "blue", "thing"])


@CHECKED
@given(st.lists(st.one_of(structured, class_names, st.text(TEXT, max_size=30)), min_size=1,
                max_size=3), st.sampled_from(["center", "max", "mean", "cls"]))
def test_any_target_string_parses_or_is_one_line_error_and_always_the_same(specs, reduction):
    first = _parse(specs, reduction)
    assert _parse(specs, reduction) == first  # the same input, the same answer


@CHECKED
@given(st.lists(term, min_size=1, max_size=3))
def test_well_formed_sums_of_existing_units_parse_to_their_terms(terms):
    valid = [(w, layer, unit) for w, layer, unit in terms
             if layer in ("conv1", "conv2", "fc") and unit.isdigit()
             and int(unit) < {"conv1": 8, "conv2": 16, "fc": 5}[layer]
             and (w == "" or re.fullmatch(r"-?[0-9]*\.?[0-9]+", w[:-1]))]
    if not valid:
        return
    spec = " + ".join(f"{w}{layer}:{unit}" for w, layer, unit in valid)
    (parsed,) = parse_targets([spec], TINY)
    assert len(parsed.terms) == len(valid)
    assert [(t.layer.path, t.unit) for t in parsed.terms] == \
        [(layer, int(unit)) for _, layer, unit in valid]


scalar = st.one_of(st.booleans(), st.integers(-5, 300), st.floats(allow_nan=False, width=32),
                   st.text(TEXT, max_size=12), st.sampled_from(
                       ["auto", "all", "tsne", "pca", "max", "demo", "cpu", "anchored", "none"]))
value = st.one_of(scalar, st.lists(scalar, max_size=3))
flat_table = st.dictionaries(st.one_of(st.sampled_from(FLAT), st.text(string.ascii_lowercase,
                                                                       min_size=1, max_size=8)),
                             value, max_size=5)
document = st.one_of(
    flat_table,
    st.dictionaries(st.sampled_from([*SECTIONS, "other"]), flat_table, max_size=3),
    st.tuples(flat_table, st.dictionaries(st.sampled_from(list(SECTIONS)), flat_table,
                                          max_size=2)).map(lambda p: {**p[0], **p[1]}))


def _toml(doc: dict) -> str:
    def lit(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v) if v == v and abs(v) != float("inf") else "0"
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
            .replace("\t", "\\t") + '"'

    top = [f'"{k}" = {lit(v)}' for k, v in doc.items() if not isinstance(v, dict)]
    tables = [f'["{k}"]\n' + "\n".join(f'"{n}" = {lit(x)}' for n, x in v.items())
              for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def _settings(path: Path) -> dict | str:
    try:
        return make_settings(path).to_dict()
    except MfvError as error:
        assert "\n" not in str(error).strip() and str(error).strip(), repr(error)
        return f"error: {error}"


@CHECKED
@given(st.one_of(document.map(_toml), st.text(TEXT, max_size=60),
                 st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_any_settings_file_gives_settings_or_one_line_error_and_always_the_same(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "settings.toml"
        path.write_text(text, encoding="utf-8")
        first = _settings(path)
        assert _settings(path) == first
        if isinstance(first, dict):  # what a run records reads back as the same settings
            assert make_settings(**first).to_dict() == first


@CHECKED
@given(document)
def test_flat_names_and_section_tables_mean_the_same(doc):
    flat = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tabled: dict = {}
    for name, v in flat.items():
        home = next((s for s, cls in SECTIONS.items() if name in cls.flat_names()), None)
        if home is None:
            tabled[name] = v
        else:
            tabled.setdefault(home, {})[name] = v
    with tempfile.TemporaryDirectory() as folder:
        a, b = Path(folder) / "a.toml", Path(folder) / "b.toml"
        a.write_text(_toml(flat), encoding="utf-8")
        b.write_text(_toml(tabled), encoding="utf-8")
        one, two = _settings(a), _settings(b)
        assert isinstance(one, dict) == isinstance(two, dict)
        if isinstance(one, dict):
            assert one == two

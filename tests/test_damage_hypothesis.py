"""Generated damage to a finished run directory (issue 23): whatever happens to any one of its
files — cut short at any length, overwritten with random bytes, a few bytes changed in place,
deleted, replaced by a folder, an array that pickles objects, a JSON document cut off — the same
command run again raises nothing, finishes, warns at most one line, and gives the results of the
undamaged run: the same facets and activations, and every array, picture and thumbnail the same
bytes.

One tiny run is made per module and copied for each example. The default test run draws
`DEFAULT_EXAMPLES` damages (derandomized: the same ones every time); `pytest -m long` draws
`LONG_EXAMPLES` more, at random.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfv
from conftest import FAST, comparable, make_images, make_tiny

DEFAULT_EXAMPLES = 20
LONG_EXAMPLES = 250
DAMAGES = ("truncate", "overwrite", "flip", "delete", "directory", "pickled", "broken-json")
SAME_BYTES = (".npy", ".png", ".jpg")  # files a rerun must give back exactly


class Finished:
    """A finished tiny run: its folder, its results, and how to run it again."""

    def __init__(self, root: Path) -> None:
        self.model = make_tiny()
        self.images = make_images(root / "imgs", n=8)
        self.out = root / "run"
        self.results = comparable(self.run(self.out))
        self.files = sorted(str(p.relative_to(self.out)) for p in self.out.rglob("*")
                            if p.is_file())
        self.outputs = outputs(self.out)

    def run(self, out: Path) -> dict:
        """The run into `out`; its results as results.json holds them."""
        mfv.run(model=self.model, images=str(self.images), targets=["fc:1"], judges=(),
                workers=0, batch_size=1, out=str(out), **FAST)  # a picture redone alone
        return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
    return Finished(tmp_path_factory.mktemp("damage"))


def outputs(run: Path) -> dict[str, str | None]:
    """Every file of a run: arrays and pictures by their bytes' digest, the rest by name."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.suffix in SAME_BYTES else None for p in run.rglob("*") if p.is_file()}


def damage(path: Path, kind: str, where: float, junk: bytes) -> None:
    """Damage one file; `where` (0..1) is where it is cut or changed, `junk` random bytes."""
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[:min(int(len(data) * where), max(len(data) - 1, 0))])
    elif kind == "overwrite":
        path.write_bytes(junk)
    elif kind == "flip":  # bit rot: the same size, a few bytes inverted
        at = min(int(len(data) * where), max(len(data) - 1, 0))
        span = data[at:at + max(1, len(junk))]
        path.write_bytes(data[:at] + bytes(b ^ 0xFF for b in span) + data[at + len(span):])
    elif kind == "delete":
        path.unlink()
    elif kind == "directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_bytes(junk)
    elif kind == "pickled":
        with open(path, "wb") as f:
            np.save(f, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif kind == "broken-json":
        path.write_text('{"entries": [{"kind": "facet", "rank": ')


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def warnings_of_mfv() -> Iterator[list[str]]:
    """The warnings mfv logs in the block (function-scoped `caplog` does not reset between
    hypothesis examples)."""
    handler, logger = Records(), logging.getLogger("mfv")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def check_rerun_heals(finished: Finished, rel: str, kind: str, where: float, junk: bytes
                      ) -> None:
    with tempfile.TemporaryDirectory(prefix="mfv-damage-") as tmp:
        out = Path(tmp) / "run"
        shutil.copytree(finished.out, out)
        damage(out / rel, kind, where, junk)
        with warnings_of_mfv() as lines:
            results = finished.run(out)
        assert comparable(results) == finished.results, (rel, kind)
        assert results["status"] == "complete"
        expected = dict(finished.outputs)
        if rel == "timings.json" and not (out / rel).exists():  # lost times are measured
            expected.pop(rel)  # again only by a stage that works
        assert outputs(out) == expected, (rel, kind)
        assert len(lines) <= 1, lines
        assert all("\n" not in line and "Traceback" not in line for line in lines), lines


@st.composite
def damages(draw, files: list[str]) -> tuple[str, str, float, bytes]:
    return (draw(st.sampled_from(files)), draw(st.sampled_from(DAMAGES)),
            draw(st.floats(0, 1)), draw(st.binary(max_size=48)))


def _property(examples: int, derandomize: bool):
    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(data=st.data())
    def test(finished: Finished, data) -> None:
        check_rerun_heals(finished, *data.draw(damages(finished.files)))
    return test


test_any_damage_to_one_file_heals_on_the_rerun = _property(DEFAULT_EXAMPLES, derandomize=True)
test_any_damage_to_one_file_heals_on_the_rerun_long = pytest.mark.long(
    _property(LONG_EXAMPLES, derandomize=False))


@pytest.mark.long
@pytest.mark.parametrize("kind", DAMAGES)
def test_every_kind_of_damage_to_every_kind_of_file_heals(finished, kind):
    """Each damage on one file of each kind (a scan array, a clustering's array, a picture,
    its trace, each index and record, a thumbnail), whatever the generator draws."""
    kinds: dict[str, str] = {}
    for rel in finished.files:
        p = Path(rel)
        kinds.setdefault(p.parts[0] + p.suffix if p.parts[0] != p.name else p.name, rel)
    for rel in kinds.values():
        check_rerun_heals(finished, rel, kind, 0.33, b"\x00junk")

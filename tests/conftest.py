"""Shared fixtures and helpers: the real default model, real photos, a tiny model for fast unit
tests, its runs on synthetic photos, child processes, and a command-line run. Test modules share
code only through this file (`from conftest import make_images`), never by importing each other
(tests/test_architecture.py checks)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mfv.cli import main
from mfv.models import LoadedModel, Preprocess, load_model
from mfv.models.classes import ClassNames
from mfv.results.metrics import means

REPO = Path(__file__).resolve().parents[1]

# Wall times worth seeing in every test run (e.g. `mfv demo`'s), printed in the summary.
WALL_TIMES = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for name, seconds in config.stash.get(WALL_TIMES, {}).items():
        terminalreporter.write_line(f"wall time: {name}: {seconds:.0f} s")


# A test that asks for one of these fixtures must carry the marker (pyproject.toml lists them).
MARKED_FIXTURES = {"lite0": "slow", "imagenette": "slow", "report_browser": "browser"}


def pytest_collection_modifyitems(config, items) -> None:
    """Refuse to run a test that uses the real model, real photos or Chromium through a fixture
    without its marker, so that `-m "not slow"` / `-m "not browser"` leave out every one."""
    unmarked = sorted(f"{item.nodeid} uses {name} but is not marked @pytest.mark.{mark}"
                      for item in items for name, mark in MARKED_FIXTURES.items()
                      if name in getattr(item, "fixturenames", ()) and not
                      item.get_closest_marker(mark))
    if unmarked:
        raise pytest.UsageError("\n".join(unmarked))


def shared_data() -> Path:
    """The project's real photos: $MFV_SHARED_DATA or ../shared/data beside the repository."""
    path = Path(os.environ.get("MFV_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "imagenette-train").is_dir():
        raise RuntimeError(f"real test photos not found at {path}; set MFV_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def imagenette() -> Path:
    return shared_data() / "imagenette-train"


@pytest.fixture(scope="session")
def lite0() -> LoadedModel:
    return load_model("efficientnet_lite0")


class TinyNet(nn.Module):
    """A small CNN with a conv stack, a ReLU and a linear head: enough to address every kind
    of unit (conv channel, pre/post activation, penultimate features, logits)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


def make_tiny(seed: int = 0) -> LoadedModel:
    """`tiny_net(seed)` with the tests' preprocessing (`PRE`) and class names (`CLASSES`)."""
    return load_model(tiny_net(seed), preprocess=PRE, classes=CLASSES)


@pytest.fixture()
def tiny() -> LoadedModel:
    return make_tiny()


class LiteLike(nn.Module):
    """Lite0's names (`_blocks.10`, `_fc` with 1000 logits) on a network small enough for a
    unit test: the README's examples run on it with only their model line replaced."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self._blocks = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1),
                                     *(nn.ReLU() for _ in range(9)),
                                     nn.Conv2d(8, 40, 3, stride=2, padding=1))
        self._fc = nn.Linear(40, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._blocks(x).mean((2, 3)))


LITE_LIKE_PRE = Preprocess(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)
README_MODEL_LINE = 'mfv.load_model("efficientnet_lite0")'


def readme_example(marker: str, model_line: str | None = None) -> str:
    """The README's Python example that contains `marker`, exactly as written; `model_line`
    replaces its `mfv.load_model("efficientnet_lite0")` (the only change a fast test makes)."""
    text = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (code,) = [b for b in blocks if marker in b]
    assert README_MODEL_LINE in code
    return code if model_line is None else code.replace(README_MODEL_LINE, model_line)


# ----------------------------------------------------------------------------- report fakes
# A fake run directory and its results for the report's tests (no model needed): `fake_runs`.

EVIL_NAME = "x<script>alert(1)<\\script> & \"q\" 'a'.png"
EVIL_LABEL = "<img src=x onerror=alert(2)>"
EVIL_CLASS = "<script>alert(3)</script>"
EVIL_JUDGE = "judge<script>alert(4)</script>\"&'"  # an independent network's name
ODD_VIS_NAME = "facet00 #1 %20.png"  # needs URL quoting to load
RECIPES = ("paper-mean", "maco")  # maco pictures carry a transparency map (`alpha`)
LONG_TRACE = 500  # steps of target 0 facet 1's paper-mean trace (the chart downsamples it)


def _png(path: Path, colour: tuple[int, int, int], seed: int, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def fake_trace(steps: int, start: float, end: float, seed: int) -> np.ndarray:
    """A rising, wiggly optimization trace from `start` to `end`."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, steps)
    wiggle = 0.05 * (end - start) * rng.normal(size=steps)
    wiggle[0] = wiggle[-1] = 0
    return (start + (end - start) * np.sqrt(t) + wiggle).astype(np.float32)


def _picture_metrics(activation: float, real_max: float, facet_max: float, *, facet: bool,
                     fidelity: bool, judged: bool, k: int) -> dict[str, Any]:
    """One picture's metrics as evaluate writes them: as seen, and `_central`."""
    m: dict[str, Any] = {}
    for view, a in (("", activation), ("_central", activation * 1.1)):
        m[f"activation{view}"] = a
        m[f"activation_ratio{view}"] = a / real_max
        m[f"activation_ratio_facet{view}"] = a / facet_max
    m["centre_dominance"] = 0.3 - 0.1 * k
    if facet:
        m["path_similarity_layers"] = [0.95, 0.81, 0.62 - 0.05 * k]
        m["path_similarity"] = float(np.mean(m["path_similarity_layers"]))
        m["plausibility"] = 0.41 + 0.01 * k
    if judged:
        for view, ranks in (("", [1, 4 + k]), ("_central", [1, 1])):
            m[f"judge_ranks{view}"] = ranks
            m[f"transfer_top1{view}"] = float(np.mean([r == 1 for r in ranks]))
            m[f"transfer_top5{view}"] = float(np.mean([r <= 5 for r in ranks]))
    if facet:
        m["fidelity"], m["fidelity_central"] = fidelity, True
        m["fidelity_margin"], m["fidelity_margin_central"] = (0.12 if fidelity else -0.2), 0.3
    return m


def _make_fake_run(root: Path) -> tuple[Path, dict[str, Any]]:
    """Inputs under root/inputs, a run at root/run with every stage done; see `FakeRuns`."""
    root = Path(root)
    run = root / "run"
    colours = [(200, 60, 50), (60, 160, 70), (60, 80, 200)]
    seed = 0

    def inputs(cls: str, n: int, colour: tuple[int, int, int]) -> list[str]:
        nonlocal seed
        out = []
        for k in range(n):
            rel = f"inputs/{cls}/{cls}_{k:02d}.png"
            seed += 1
            _png(root / rel, colour, seed)
            out.append(rel)
        return out

    def generated(rel: str, colour: tuple[int, int, int], size: int = 64) -> str:
        nonlocal seed
        seed += 1
        _png(run / rel, colour, seed, size)
        return rel

    def visual(stem: str, colour: tuple[int, int, int], recipe: str, activation: float,
               steps: int = 40) -> dict[str, Any]:
        nonlocal seed
        seed += 1
        name = f"{stem}.png"
        out = {"path": generated(name, colour, 96), "activation": activation,
               "trace": name[:-4] + "_trace.npy"}
        np.save(run / out["trace"], fake_trace(steps, 0.1 * activation, activation, seed))
        if recipe == "maco":
            out["alpha"] = generated(name[:-4] + "_alpha.png", (128, 128, 128))
        return out

    evil = f"inputs/odd/{EVIL_NAME}"
    _png(root / evil, (230, 200, 40), 999)
    broken = "inputs/odd/broken.png"
    (root / broken).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    missing = "inputs/odd/missing.png"
    absolute = str((root / "inputs" / "abs_one.png").resolve())
    _png(Path(absolute), (90, 90, 90), 777)
    real_max = 12.5
    networks = ["tinynet", EVIL_JUDGE]  # the optimized one and an independent judge
    # coverage of each recipe's facet pictures vs its random starts: paper-mean wins, maco loses
    coverage = {"paper-mean": (1.0, 0.5), "maco": (0.5, 1.0)}

    def target(i: int, spec: str, sizes: list[int], class_name: str | None) -> dict[str, Any]:
        slug = f"t{i:02d}-fake-{i:08x}"
        folder = f"targets/{slug}"
        facets, points = [], []
        for r, n in enumerate(sizes):
            members = inputs(f"t{i}f{r}", n, colours[r % 3])
            if i == 0 and r == 0:
                members[1] = evil
                members[4:4] = [broken, missing]  # inside the strip of 12
            if i == 1 and r == 0:
                members.append(absolute)
            reps = members[:3]
            facet_max = 9.5 + r
            vis = {}
            for recipe in RECIPES:
                odd = i == 0 and r == 0 and recipe == "paper-mean"
                name = ODD_VIS_NAME[:-4] if odd else f"facet{r:02d}_{recipe}"
                stem = f"{folder}/{name}"
                steps = LONG_TRACE if (i == 0 and r == 1 and recipe == "paper-mean") else 40
                activation = (20.0 + r) if recipe == "paper-mean" else (8.0 + r)
                vis[recipe] = visual(stem, colours[r % 3], recipe, activation, steps)
            facets.append({
                "rank": r, "size": len(members), "members": members, "representatives": reps,
                "mean_image": generated(f"{folder}/facets/0123456789abcdef/mean{r:02d}.png",
                                        colours[r % 3]),
                "activation_real": {"mean": 3.0 + r, "max": facet_max},
                "visualizations": vis,
                "metrics": {recipe: _picture_metrics(
                    v["activation"], real_max, facet_max, facet=True, judged=i == 1, k=r,
                    fidelity=recipe == "paper-mean" or r == 0) for recipe, v in vis.items()},
            })
            cx, cy = 12.0 * math.cos(2.1 * r), 12.0 * math.sin(2.1 * r)
            for k, path in enumerate(members):
                angle = 2 * math.pi * k / len(members)
                rad = 2.5 + (k % 2)
                points.append({"path": path, "x": cx + rad * math.cos(angle),
                               "y": cy + rad * math.sin(angle), "facet": r,
                               "activation": 5.0 + 0.1 * k,
                               "label": EVIL_LABEL if path == evil else f"class{r}"})
        baselines = {recipe: [
            visual(f"{folder}/random{k:02d}_{recipe}", (128, 128, 128), recipe, 11.0 + k)
            for k in range(len(sizes))] for recipe in RECIPES}
        metrics: dict[str, Any] = {"activation_max_real": real_max, "facet": {}, "random": {}}
        if i == 0:
            metrics["recovery"] = {"ari": 0.62, "nmi": 0.7, "purity": 0.85}
        for recipe in RECIPES:
            mfv_cov, random_cov = coverage[recipe]
            random = [_picture_metrics(b["activation"], real_max, 9.5 + k, facet=False,
                                       fidelity=False, judged=i == 1, k=k)
                      for k, b in enumerate(baselines[recipe])]
            metrics["facet"][recipe] = {"diversity": 0.41, "diversity_central": 0.39}
            metrics["random"][recipe] = {**means(random), "diversity": 0.22,
                                         "diversity_central": 0.2}
            if i == 0:
                metrics["facet"][recipe]["coverage"] = {n: mfv_cov for n in networks}
                metrics["random"][recipe]["coverage"] = {n: random_cov for n in networks}
        terms = ([{"weight": 1.0, "layer": "_fc", "unit": 0},
                  {"weight": 1.0, "layer": "_fc", "unit": 701}] if i == 0
                 else [{"weight": 1.0, "layer": "conv", "unit": 3}])
        return {
            "spec": spec, "slug": slug, "class_index": None if class_name is None else 3,
            "class_name": class_name,
            "target": {"spec": spec, "reduction": "center",
                       "class_index": None if class_name is None else 3, "terms": terms},
            "selection": {"policy": "top", "n": sum(sizes), "top_n": 200},
            "activation_max_real": real_max, "k_requested": len(sizes), "k_chosen": len(sizes),
            "map": points, "facets": facets, "baselines": baselines, "metrics": metrics,
        }

    targets = [
        target(0, "_fc:0 + _fc:701", [20, 6, 5], None),
        target(1, f"conv:3 <b>bold</b> {EVIL_CLASS}", [5, 4], EVIL_CLASS),
    ]
    evaluation = {}
    for recipe in RECIPES:
        per = [f["metrics"][recipe] for t in targets for f in t["facets"]]
        evaluation[recipe] = {k: float(np.mean([float(m[k]) for m in per if k in m]))
                              for k in per[0] if not isinstance(per[0][k], list)}
    results: dict[str, Any] = {
        "schema": "mfv.results/2", "mfv_version": "0.1.0",
        "created": "2026-11-26T15:00:00Z", "updated": "2026-11-26T15:05:00Z",
        "status": "complete", "error": None, "device": "cpu",
        "stages": {"scan": "done", "facets": "done", "render": "done", "evaluate": "done",
                   "report": "done"},
        "model": {"name": "tinynet", "class": "TinyNet", "parameters": 1477,
                  "fingerprint": "cd" * 32,
                  "preprocess": {"input_size": 32, "mean": [0.5] * 3},
                  "logits_layer": "fc", "num_classes": 5},
        "data": {"source": "folder inputs", "base": str(root.resolve()), "n_images": 60,
                 "n_valid": 58, "fingerprint": "sha256:" + "ab" * 32, "code_layer": "penultimate",
                 "skipped": [{"path": f"inputs/{EVIL_CLASS}.jpg", "reason": "truncated file"},
                             {"path": "inputs/empty.png", "reason": "empty file (0 bytes)"}]},
        "settings": {"targets": [t["spec"] for t in targets], "facets": 3, "mean_of": 3,
                     "recipes": list(RECIPES), "steps": None, "seed": 0, "device": "cpu",
                     "judges": [EVIL_JUDGE], "note": EVIL_CLASS},
        "versions": {"python": "3.11", "torch": "2.13.0", "numpy": "2.4.6", "mfv": "0.1.0"},
        "timings": {"scan": 1.5, "facets": 0.7, "render": 75.0, "evaluate": 0.2},
        "targets": targets,
        "evaluation": evaluation,
    }
    return run, results


def _drop_stages(results: dict[str, Any], keep: str) -> dict[str, Any]:
    """A copy of `results` as written after stage `keep` ("scan" or "facets")."""
    out = copy.deepcopy(results)
    out["stages"] = {s: ("done" if s in ("scan", keep) else "missing")
                     for s in ("scan", "facets", "render", "evaluate", "report")}
    for t in out["targets"]:
        t.pop("baselines", None)
        t.pop("metrics", None)
        if keep == "scan":
            for k in ("map", "facets", "k_chosen"):
                t.pop(k, None)
        for f in t.get("facets") or []:
            f.pop("visualizations", None)
            f.pop("metrics", None)
    return out


class FakeRuns:
    """`make(root)` writes small PNG inputs under root/inputs (one named with a `<script>` tag,
    one broken, one listed but missing), generated images under root/run/targets, and returns
    (run_dir, results) as results.json holds them (mfv.results.model): two recipes, paper-mean
    and maco (maco's pictures with transparency maps), traces as .npy files, metrics as evaluate
    writes them (as seen and `_central`); paper-mean beats its random starts, maco loses to its
    own on coverage and activation. `drop_stages` strips the results back to what an earlier
    stage would have written. The hostile names are attributes too."""

    EVIL_NAME, EVIL_LABEL, EVIL_CLASS, EVIL_JUDGE = EVIL_NAME, EVIL_LABEL, EVIL_CLASS, EVIL_JUDGE
    ODD_VIS_NAME, RECIPES, LONG_TRACE = ODD_VIS_NAME, RECIPES, LONG_TRACE
    make = staticmethod(_make_fake_run)
    drop_stages = staticmethod(_drop_stages)
    trace = staticmethod(fake_trace)


@pytest.fixture(scope="session")
def fake_runs() -> type[FakeRuns]:
    return FakeRuns


# ----------------------------------------------------------------------------- browser checks
# Any report (the demo's too) in real headless Chromium driven by Playwright: `open_report`.

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

_WAIT_IMAGES_JS = """async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = "eager"; });
  const settle = i => new Promise(res => {
    if (i.complete) return res();
    i.addEventListener("load", res, {once: true});
    i.addEventListener("error", res, {once: true});
  });
  const timeout = new Promise(res => setTimeout(res, 15000));
  await Promise.race([Promise.all(imgs.map(settle)), timeout]);
  return {n: imgs.length, bad: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.src)};
}"""


def chromium_path() -> str:
    """Debian's chromium ($MFV_CHROMIUM to override); a clear error when it is missing."""
    path = os.environ.get("MFV_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        raise RuntimeError(f"headless Chromium not found at {path}: install the Debian package "
                           "`chromium` (apt-get install -y chromium) or set MFV_CHROMIUM")
    return path


@dataclass
class ReportPage:
    """An opened report page and everything it reported while open."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def images_not_loaded(self) -> tuple[int, list[str]]:
        return images_not_loaded(self.page)

    def map_points(self, section_id: str) -> list[dict[str, Any]]:
        return map_points(self.page, section_id)

    def hover_point(self, section_id: str, index: int) -> dict[str, Any]:
        return hover_point(self.page, section_id, index)

    def uncovered_point(self, section_id: str, near: int) -> int:
        return uncovered_point(self.page, section_id, near)

    def highlighted(self, section_id: str) -> dict[str, Any]:
        return highlighted(self.page, section_id)


@contextmanager
def open_report(index_html: Path, width: int = 1280, height: int = 900) -> Iterator[ReportPage]:
    """Open `index_html` from file:// in headless Chromium; dialogs are recorded and dismissed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeError("the browser tests need Playwright: pip install playwright") from exc
    exe = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            rp = ReportPage(page)
            page.on("console", lambda m: m.type == "error" and rp.console_errors.append(m.text))
            page.on("pageerror", lambda e: rp.page_errors.append(str(e)))
            page.on("request", lambda r: rp.requests.append(r.url))

            def on_dialog(d: Any) -> None:
                rp.dialogs.append(d.message)
                d.dismiss()

            page.on("dialog", on_dialog)
            page.goto(Path(index_html).resolve().as_uri(), wait_until="load")
            yield rp
        finally:
            browser.close()


def images_not_loaded(page: Any) -> tuple[int, list[str]]:
    """(number of <img>, those that failed to load), loading lazy ones too."""
    out = page.evaluate(_WAIT_IMAGES_JS)
    return out["n"], out["bad"]


def map_points(page: Any, section_id: str) -> list[dict[str, Any]]:
    """The tooltip data of a target's map points, as embedded in the page."""
    return page.evaluate(
        "sid => JSON.parse(document.getElementById('mfv-data').textContent)"
        ".targets[sid].points", section_id)


def uncovered_point(page: Any, section_id: str, near: int) -> int:
    """The index of the map point closest to `near` (by index) that no other point covers at
    its centre, so that a pointer over it reaches it (t-SNE maps put points on top of others)."""
    free = page.evaluate(
        """sid => [...document.querySelectorAll(`section.target[id='${sid}'] svg.map .pt`)]
        .filter(c => { c.scrollIntoView({block: 'center'}); const r = c.getBoundingClientRect();
          return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === c; })
        .map(c => Number(c.dataset.i))""", section_id)
    assert free, f"every map point of {section_id} is covered by another"
    return min(free, key=lambda i: (abs(i - near), i))


def hover_point(page: Any, section_id: str, index: int) -> dict[str, Any]:
    """Hover map point `index`; return what the tooltip shows (image src, loaded, text)."""
    section = page.locator(f"section.target[id='{section_id}']")
    section.locator(f"svg.map .pt[data-i='{index}']").hover()
    tip = section.locator(".tip")
    tip.wait_for(state="visible", timeout=5000)
    img = tip.locator("img")
    shown: dict[str, Any] = {"text": tip.inner_text(), "path": tip.locator(".path").inner_text()}
    if img.count():
        img.evaluate("i => i.complete || new Promise(r => { i.onload = i.onerror = () => r(1); })")
        shown["src"] = img.get_attribute("src")
        shown["natural_width"] = img.evaluate("i => i.naturalWidth")
    return shown


def highlighted(page: Any, section_id: str) -> dict[str, Any]:
    """Which map points are highlighted, and the opacity of the most and least visible one,
    once transitions have settled."""
    page.wait_for_timeout(300)
    return page.evaluate("""sid => {
      const pts = [...document.querySelectorAll(`section.target[id='${sid}'] svg.map .pt`)];
      const op = p => +getComputedStyle(p).opacity;
      const on = pts.filter(p => p.classList.contains('on'));
      const off = pts.filter(p => !p.classList.contains('on'));
      return {on: on.map(p => +p.dataset.i), facets: [...new Set(on.map(p => +p.dataset.f))],
              on_opacity: on.length ? Math.min(...on.map(op)) : null,
              off_opacity: off.length ? Math.max(...off.map(op)) : null};
    }""", section_id)


@pytest.fixture(scope="session")
def report_browser() -> Callable[..., AbstractContextManager[ReportPage]]:
    """`open_report`: `with report_browser(index_html) as rp: rp.map_points(...)`."""
    return open_report


# ----------------------------------------------------------------------------- tiny runs
# The tiny network on small synthetic photos: its settings, the photos, and what two runs with
# the same settings must agree on. CLASSES names the photo folders "red thing" / "blue thing"
# as classes 0 and 2.

PRE = Preprocess(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)
CLASSES = ClassNames(("red thing", "green thing", "blue thing", "grey-ish thing", "dark"))
FAST = dict(facets=2, mean_of=3, steps=10, embedding="pca", progress=False, device="cpu",
            recipes=["paper-mean"])
SWEEP = dict(layers="conv1,conv2,fc", units=3, top_n=16, embedder="efficientnet_lite0",
             embedding="pca", mean_of=3, progress=False, device="cpu", scan_batch_size=4)


def tiny_net(seed: int = 0) -> TinyNet:
    """TinyNet with the weights of `seed`, in eval mode: every tiny run's network."""
    torch.manual_seed(seed)
    return TinyNet().eval()


class SlowNet(TinyNet):
    """TinyNet that waits `delay` seconds in each forward pass, so that each stage lasts long
    enough to be killed in; it computes what TinyNet computes."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return super().forward(x)


def make_images(root: Path, n: int = 20, seed: int = 0) -> Path:
    """n small photos in two labelled folders, red-ish and blue-ish."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = ("red thing", "blue thing")[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        arr[..., 0 if i % 2 == 0 else 2] = 250
        Image.fromarray(arr).save(root / label / f"img{i:03d}.png")
    return root


def _significant(value: Any, digits: int = 5) -> Any:
    """Floats to `digits` significant digits, in any nesting (float tolerance: the same images
    in batches of another size give activations that differ in the 7th digit)."""
    if isinstance(value, dict):
        return {k: _significant(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_significant(v, digits) for v in value]
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    return value


def comparable(results: dict) -> dict:
    """What two runs with the same settings must agree on (not times, dates or file names,
    which carry keys)."""
    out = []
    for t in results["targets"]:
        out.append({
            "spec": t["spec"], "slug": t["slug"], "k": t["k_chosen"],
            "facets": [(f["size"], f["members"], {r: round(v["activation"], 4)
                                                 for r, v in f["visualizations"].items()})
                       for f in t["facets"]],
            "baselines": {r: [round(b["activation"], 4) for b in bs]
                          for r, bs in t["baselines"].items()},
            "metrics": _significant(json.loads(json.dumps(t["metrics"], default=str))),
        })
    return {"targets": out, "stages": results["stages"], "status": results["status"]}


# ----------------------------------------------------------------------------- child processes
# Real processes for signals, locks and limits: `start(fork, log, work, *args)` runs `work` in a
# child from a forkserver that has imported mfv once (so each starts in a moment instead of
# importing torch again), `finish` waits for it and fails a child that hangs.

HANG_S = 60  # a child that takes longer than this is stuck (each needs a few seconds)


@pytest.fixture(scope="module")
def fork() -> multiprocessing.context.BaseContext:
    """A forkserver context that imports mfv's pipeline and command line once, for `start`."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mfv.runtime.pipeline", "mfv.cli"])
    return ctx


def _child_main(log: str, work: Callable[..., int | None], *args: Any) -> None:
    """In the child: its own process group (so a hung child is killed with its workers), output
    to `log`, exit status from `work`."""
    os.setpgrp()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = work(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code or 0)


def start(fork: multiprocessing.context.BaseContext, log: Path, work: Callable[..., int | None],
          *args: Any) -> multiprocessing.Process:
    proc = fork.Process(target=_child_main, args=(str(log), work, *args))
    proc.start()
    return proc


def finish(proc: multiprocessing.Process, log: Path, timeout: float = HANG_S) -> int:
    """The child's exit status; a child still running after `timeout` is killed and fails."""
    proc.join(timeout)
    if proc.is_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
        pytest.fail(f"the child did not finish within {timeout} s (hung):\n{log.read_text()}")
    return proc.exitcode


def cli_as(bound: bool, argv: list[str]) -> int:
    """`mfv ARGV` in a child (mfv is imported already); `bound`: bound by permission bits even
    as root (`_drop_dac_override`)."""
    if bound:
        _drop_dac_override()
    return main(argv)


def _drop_dac_override() -> None:
    """Take from this process root's power to ignore permission bits (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH, CAP_FOWNER; effective and permitted, so `os.access` agrees). It stays
    uid 0 and so still reads the checkout wherever that lies, even in a private folder, which
    another user could not (the reason this does not switch to an unprivileged user)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~0b1110 & 0xFFFFFFFF  # capabilities 1, 2 and 3
    data[0], data[1] = data[0] & keep, data[1] & keep
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def one_line_error(err: str) -> str:
    """The single `mfv: error:` line a command printed (no traceback, nothing else)."""
    assert err.startswith("mfv: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err.strip()


# ----------------------------------------------------------------------------- a command-line run
# `mfv run` on the tiny network exported to a file, in a folder every user may enter: `world`,
# `exported`, `command` (its arguments for a given --out) and `finished` (a complete run).


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A folder that every user may enter (tmp_path's parents are private to their owner)."""
    root = Path(tempfile.mkdtemp(prefix="mfv-robust-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def exported(world: Path) -> Path:
    """The tiny network as a torch.export file, for the command line."""
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    program = torch.export.export(tiny_net(), (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes=(dims,))
    torch.export.save(program, world / "tiny.pt2")
    return world / "tiny.pt2"


@pytest.fixture(scope="module")
def command(world: Path, exported: Path) -> Callable[[Path], list[str]]:
    """`mfv run` on the tiny exported network and 12 small photos, for a given --out."""
    images = make_images(world / "imgs", n=12)

    def argv(out: Path) -> list[str]:
        return ["run", "--model", str(exported), "--images", str(images), "--target", "fc:1",
                "--size", "32", "--facets", "2", "--mean-of", "3", "--steps", "10",
                "--embedding", "pca", "--judges", "none", "--workers", "0", "--quiet",
                "--out", str(out)]
    return argv


@pytest.fixture(scope="module")
def finished(world: Path, command: Callable[[Path], list[str]]) -> Path:
    """A complete run directory, made by `command`."""
    out = world / "finished"
    assert main(command(out)) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    return out

"""The tour notebook (docs/notebooks/tour.ipynb) runs on a real Jupyter kernel, this
environment's own (`ipykernel` on `sys.executable`): every cell without error, the facets and
the pictures displayed inline, the progress bars as notebook widgets. Its wall time is printed
in the test summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, WALL_TIMES, shared_data

TOUR = REPO / "docs" / "notebooks" / "tour.ipynb"
INLINE_PNG = '<img src="data:image/png;base64,'
WIDGET = "application/vnd.jupyter.widget-view+json"
CHECK_KERNEL = "import sys\nprint(sys.executable)"


def _kernelspec(folder: Path) -> Path:
    """A `python3` kernelspec that runs this interpreter (found first through JUPYTER_PATH, so
    no kernel installed elsewhere on the machine is used)."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mfv tests)", "language": "python"}))
    return folder


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
         ) -> dict[str, nbformat.NotebookNode]:
    """The notebook executed; its code cells by tag (untagged ones by index), the kernel check
    last."""
    root = tmp_path_factory.mktemp("tour")
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", str(_kernelspec(root / "jupyter")))
    patch.setenv("MFV_TOUR_OUT", str(root))
    patch.setenv("MFV_SHARED_DATA", str(shared_data()))
    nb = nbformat.read(TOUR, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_KERNEL))
    started = time.perf_counter()
    try:
        NotebookClient(nb, kernel_name="python3", timeout=600,
                       resources={"metadata": {"path": str(TOUR.parent)}}).execute()
    finally:
        patch.undo()
    request.config.stash.setdefault(WALL_TIMES, {})["tour notebook"] = \
        time.perf_counter() - started
    cells = [c for c in nb.cells if c.cell_type == "code"]
    return {(c.metadata.get("tags") or [str(i)])[0]: c for i, c in enumerate(cells)}


def _html(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(TOUR, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.slow
def test_every_cell_runs_on_this_environments_kernel(tour):
    for tag, cell in tour.items():
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {tag}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
        assert cell.execution_count is not None
    (printed,) = [o for o in list(tour.values())[-1].outputs if o.output_type == "stream"]
    assert Path(printed.text.strip()) == Path(sys.executable)


@pytest.mark.slow
def test_the_facets_and_pictures_show_inline(tour):
    own, target, facet = _html(tour["own-run"]), _html(tour["lite-target"]), \
        _html(tour["lite-facet"])
    assert 'class="mfv-results"' in own and own.count(INLINE_PNG) >= 2  # picture + mean image
    (shown,) = [o for o in tour["own-run"].outputs if o.output_type == "execute_result"]
    assert shown.data["text/plain"].startswith("Results(status='complete', root=")
    assert "fc:0 + fc:1" in own and "<svg" in own  # the target and its facet map
    assert 'class="mfv-target"' in target and "<svg" in target and INLINE_PNG in target
    assert target.count('class="mfv-facet"') == 2
    assert 'class="mfv-facet"' in facet and facet.count(INLINE_PNG) == 2
    assert "data:image/jpeg;base64," in facet  # its member photos
    pictures = _html(tour["visualize"])
    assert pictures.count(INLINE_PNG) == 2 and "activation" in pictures
    opened = _html(tour["open"])
    assert 'class="mfv-results"' in opened and INLINE_PNG in opened
    assert any(o.get("name") == "stdout" and "complete own" in o.get("text", "")
               for o in tour["open"].outputs)


@pytest.mark.slow
def test_progress_bars_are_widgets_in_the_notebook_and_progress_false_has_none(tour):
    assert any(WIDGET in o.get("data", {}) for o in tour["own-run"].outputs)
    assert not any(WIDGET in o.get("data", {}) or o.output_type == "stream"
                   for o in tour["lite-target"].outputs)  # progress=False: silent

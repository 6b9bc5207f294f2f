"""The report stage: RUN/index.html, a self-contained page that shows each target's facets.

`write_report(run, results)` renders whatever the results hold (a run with only facets and no
visualizations yet gives a report of the facets), makes thumbnails of the input images it shows
(in the run directory's thumbnail folder), and writes the page atomically. The page needs no
network: its CSS and script are inline and its images are files inside the run directory.

`write_layers_page(run, doc)` writes RUN/layers.html, the Layers page of `mfv sweep` (its
results, RUN/sweep/sweep.json), on the same terms.

Pages are Jinja2 templates on one base layout (`mfv.report.pages` says how to add one);
metric names and explanations live in the metric registry, `mfv.results.metrics`. The report
reads the typed results (`mfv.results.Results`); a dict is validated into them first.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfv.core.io import read_json
from mfv.core.layout import RunLayout
from mfv.report.layers_page import LayersPage, layers_thumb_paths, run_sections
from mfv.report.pages import KV, PAGES, Img, Links, PageSpec, render_page, write_page
from mfv.report.run_page import RunPage, thumb_paths
from mfv.report.thumbs import make_thumbs
from mfv.results.model import Results, Sweep

__all__ = ["KV", "PAGES", "Img", "Links", "PageSpec", "render_page", "write_layers_page",
           "write_page", "write_report"]


def write_report(run: RunLayout | str | Path, results: Results | Mapping[str, Any], *,
                 progress: bool = True) -> Path:
    """Write the run's report page for `results` and return its path."""
    run = run if isinstance(run, RunLayout) else RunLayout(run)
    if not isinstance(results, Results):
        results = Results.model_validate(results)
    base = results.data.base if results.data else None
    thumbs = make_thumbs(run.thumbs_dir, run.relative(run.thumbs_dir), thumb_paths(results),
                         base, progress=progress)
    context = RunPage(results, Links(run, PAGES["run"]), thumbs).context()
    return write_page(run, "run", context)


def write_layers_page(run: RunLayout | str | Path, doc: Sweep | Mapping[str, Any], *,
                      progress: bool = True) -> Path:
    """Write the Layers page for a sweep's results `doc` (format mfv.sweep/1) and return its
    path. Its example units link to their sections of the run page where the run page shows
    them (the units `--render` rendered); the run page, when there is one, is written again
    from results.json so that its navigation lists the new page."""
    run = run if isinstance(run, RunLayout) else RunLayout(run)
    doc = doc if isinstance(doc, Sweep) else Sweep.model_validate(doc)
    results = None
    if run.report_file.is_file() and run.results_file.is_file():
        try:
            results = Results.model_validate(read_json(run.results_file))
        except (OSError, ValueError):  # a broken results.json: no links, the run page as it is
            results = None
    links = Links(run, PAGES["layers"])
    rendered = run_sections(results, links.page(PAGES["run"])) if results else {}
    thumbs = make_thumbs(run.thumbs_dir, run.relative(run.thumbs_dir), layers_thumb_paths(doc),
                         doc.data.base if doc.data else None, progress=progress)
    page = write_page(run, "layers", LayersPage(doc, links, thumbs, rendered).context())
    if results is not None:
        write_report(run, results, progress=progress)
    return page

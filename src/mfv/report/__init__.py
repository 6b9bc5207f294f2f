"""The report stage: RUN/index.html, a self-contained page that shows each target's facets.

`write_report(run, results)` renders whatever the results hold (a run with only facets and no
visualizations yet gives a report of the facets), makes thumbnails of the input images it shows
(in the run directory's thumbnail folder), and writes the page atomically. The page needs no
network: its CSS and script are inline and its images are files inside the run directory.

Pages are Jinja2 templates on one base layout (`mfv.report.pages` says how to add one);
metric names and explanations live in `mfv.report.glossary`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfv.report.pages import KV, PAGES, Img, Links, PageSpec, render_page, write_page
from mfv.report.run_page import RunPage, thumb_paths
from mfv.report.thumbs import make_thumbs
from mfv.rundir import RunDir

__all__ = ["KV", "PAGES", "Img", "Links", "PageSpec", "render_page", "write_page",
           "write_report"]


def write_report(run: RunDir | str | Path, results: Mapping[str, Any], *,
                 progress: bool = True) -> Path:
    """Write the run's report page for `results` (schema mfv.results/2) and return its path."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    base = (results.get("data") or {}).get("base")
    thumbs = make_thumbs(run.thumbs_dir, run.relative(run.thumbs_dir), thumb_paths(results),
                         base, progress=progress)
    context = RunPage(results, Links(run, PAGES["run"]), thumbs).context()
    return write_page(run, "run", context)

"""The report stage: RUN/index.html, a self-contained page that shows each target's facets.

`write_report(run_dir, results)` renders whatever the results hold (a run with only facets
and no visualizations yet gives a report of the facets), makes thumbnails of the input images
it shows under RUN/report/thumbs, and writes the page atomically. The page needs no network:
its CSS and script are inline and its images are files inside the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfv.io import atomic_write_text
from mfv.report.page import Page, thumb_paths
from mfv.report.thumbs import make_thumbs

__all__ = ["write_report"]


def write_report(
    run_dir: str | Path, results: Mapping[str, Any], *, progress: bool = True
) -> Path:
    """Write RUN/index.html for `results` (schema mfv.results/1) and return its path."""
    run_dir = Path(run_dir)
    base = (results.get("data") or {}).get("base")
    thumbs = make_thumbs(run_dir, thumb_paths(results), base, progress=progress)
    page = Page(run_dir, results, thumbs).render()
    return atomic_write_text(run_dir / "index.html", page)

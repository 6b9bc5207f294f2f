"""`mfv.open(RUN)`: a finished run directory's results, typed and located, so that a notebook
shows them (`Results._repr_html_`) with their pictures."""

from __future__ import annotations

import os
from pathlib import Path

from mfv.core.errors import MfvError
from mfv.core.io import read_json
from mfv.core.layout import RunLayout
from mfv.results.model import Results


def open(run: str | os.PathLike) -> Results:
    """The results of the run directory `run` (what its `results.json` holds), located there.

    A run that stopped early (`until=`, an error) opens too; its `status` and `error` say how far
    it got. A folder without results.json is not a finished run: that is an `MfvError`."""
    layout = RunLayout(run)
    if not Path(run).is_dir():
        raise MfvError(f"{run}: no such run directory (make one with `mfv run --out {run}` "
                       "or `mfv.run(out=...)`)")
    if not layout.results_file.is_file():
        state = "its run has not finished yet" if layout.holds_a_run() else \
            "it is not an mfv run directory"
        raise MfvError(f"{run}: no results.json ({state}); run `mfv run --out {run}` "
                       "to finish it")
    try:
        doc = read_json(layout.results_file)
        results = Results.model_validate(doc)
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MfvError(f"{layout.results_file}: not readable as mfv results ({first}); run "
                       f"`mfv run --out {run}` again to rewrite it") from None
    return results.at(run)

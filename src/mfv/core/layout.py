"""Where things are in a run directory: every top-level path of `RUN/`, in one place, so that
every layer (a stage writing its store, the report writing its pages, the runtime pruning)
agrees on them. What lives inside a store is that store's business (`mfv.scan.store`,
`mfv.runtime.rundir`)."""

from __future__ import annotations

import os
from pathlib import Path


class RunLayout:
    """The paths of a run directory rooted at `root`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def scans_dir(self) -> Path:
        return self.root / "scan"

    @property
    def targets_dir(self) -> Path:
        return self.root / "targets"

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    @property
    def layers_page(self) -> Path:
        return self.root / "layers.html"

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    @property
    def report_file(self) -> Path:
        return self.root / "index.html"

    @property
    def thumbs_dir(self) -> Path:
        return self.root / "report" / "thumbs"

    @property
    def own_folders(self) -> tuple[Path, ...]:
        """The folders that hold what mfv made (never input: `mfv.data.sources` skips them)."""
        return self.scans_dir, self.targets_dir, self.sweep_dir, self.thumbs_dir.parent

    def holds_a_run(self) -> bool:
        """Whether `root` is a run directory: mfv's lock file beside its settings or stores."""
        return (self.root / ".lock").is_file() and any(
            p.exists() for p in (self.root / "settings.json", self.scans_dir, self.targets_dir))

    def relative(self, path: Path) -> str:
        """A path inside the run as results.json writes it (relative, with forward slashes)."""
        return path.relative_to(self.root).as_posix()

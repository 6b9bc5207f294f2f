"""A scan's folder: a manifest, finished chunks, and the merged arrays (all `.npy`), and how
the scan keeps its activations (`choose_mode`)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mfv.core.errors import MfvError
from mfv.core.io import atomic_save_npy, atomic_write_json, load_npy, read_json
from mfv.core.keys import KEY_CHARS
from mfv.core.layout import RunLayout

SCAN_MODES = ("auto", "full", "topn")  # how a scan stores activations (`choose_mode`)
FULL_LIMIT_BYTES = 2 * 1024**3  # above this, `auto` keeps a streaming top-N per target


def choose_mode(mode: str, n_images: int, n_targets: int) -> str:
    """`full` activation vectors (images × targets) when they fit in FULL_LIMIT_BYTES, else a
    streaming top-N per target (targets × N)."""
    if mode == "auto":
        return "full" if n_images * n_targets * 4 <= FULL_LIMIT_BYTES else "topn"
    if mode not in SCAN_MODES:
        raise MfvError(f"unknown scan mode {mode!r}: use {', '.join(SCAN_MODES)}")
    return mode


class ScanStore:
    """One scan's folder: a manifest, finished chunks, and the merged arrays (all `.npy`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def under(cls, run_root: str | Path, key: str) -> ScanStore:
        """The store of scan `key` in a run directory (`RUN/scan/<key>`)."""
        return cls(RunLayout(run_root).scans_dir / key[:KEY_CHARS])

    @property
    def key(self) -> str:
        return self.directory.name

    def manifest(self) -> dict | None:
        path = self.directory / "manifest.json"
        return read_json(path) if path.exists() else None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.directory / "manifest.json", manifest)

    def _chunk(self, c: int) -> Path:
        return self.directory / "chunks" / f"{c:06d}"

    def chunk_done(self, c: int) -> bool:
        return self._chunk(c).with_suffix(".json").exists()

    def write_chunk(self, c: int, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
        """Arrays first, then the record that says the chunk is done."""
        base = self._chunk(c)
        for name, array in arrays.items():
            atomic_save_npy(f"{base}.{name}.npy", array)
        atomic_write_json(base.with_suffix(".json"), {**meta, "arrays": sorted(arrays)})

    def read_chunk(self, c: int) -> tuple[dict[str, np.ndarray], dict]:
        base = self._chunk(c)
        meta = read_json(base.with_suffix(".json"))
        return {name: load_npy(f"{base}.{name}.npy") for name in meta["arrays"]}, meta

    def write_array(self, name: str, array: np.ndarray) -> None:
        atomic_save_npy(self.directory / f"{name}.npy", array)

    def has_array(self, name: str) -> bool:
        return (self.directory / f"{name}.npy").exists()

    def read_array(self, name: str, mmap: bool = False) -> np.ndarray:
        return load_npy(self.directory / f"{name}.npy", mmap=mmap)

    def drop_chunks(self) -> None:
        """Remove the chunks once their merge is complete (the arrays hold everything)."""
        shutil.rmtree(self.directory / "chunks", ignore_errors=True)

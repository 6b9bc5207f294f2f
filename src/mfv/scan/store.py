"""A scan's folder: a manifest, finished chunks, and the merged arrays (all `.npy`), and how
the scan keeps its activations (`choose_mode`).

A finished chunk's record and a finished scan's manifest stamp the arrays they name (size and
CRC-32, `mfv.core.io.stamp`); when they are reused, a damaged record or array is treated as never
written: the chunk, or the whole scan, is done again, with one warning.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mfv.core.errors import MfvError
from mfv.core.io import (
    Damaged,
    atomic_save_npy,
    atomic_write_json,
    check,
    load_json,
    load_npy,
    own_name,
    remove,
    reuse,
    stamp,
)
from mfv.core.keys import KEY_CHARS
from mfv.core.layout import RunLayout

SCAN_MODES = ("auto", "full", "topn")  # how a scan stores activations (`choose_mode`)
FULL_LIMIT_BYTES = 2 * 1024**3  # above this, `auto` keeps a streaming top-N per target
_FIELDS = ("key", "status", "images", "targets", "mode", "batch_size", "chunk_batches")
_COMPLETE = ("bad", "n_valid", "code_dim", "files")  # what a finished scan's manifest adds

log = logging.getLogger(__name__)


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

    @property
    def _manifest_file(self) -> Path:
        return self.directory / "manifest.json"

    def manifest(self) -> dict | None:
        """The scan's manifest; None when there is none, or when it or (for a finished scan)
        one of its arrays is damaged: then the scan is done again (one warning says so)."""
        return reuse(log, "the scan is done again", self._checked_manifest)

    def _checked_manifest(self) -> dict | None:
        doc = load_json(self._manifest_file)
        if doc is None:
            return None
        complete = doc.get("status") == "complete"
        if complete and "files" not in doc:
            raise Damaged(self._manifest_file, "no checksums: an older mfv wrote it")
        absent = [f for f in (*_FIELDS, *(_COMPLETE if complete else ())) if f not in doc]
        files = doc.get("files", {})
        if absent or not isinstance(files, dict) or not all(map(own_name, files)):
            raise Damaged(self._manifest_file, f"no {', '.join(absent) or 'files'} field")
        try:
            for name, recorded in doc.get("files", {}).items() if complete else ():
                check(self.directory / name, recorded)
        except Damaged:
            remove(self._manifest_file)  # its arrays are no longer whole: scan again
            raise
        return doc

    def write_manifest(self, manifest: dict) -> None:
        """Write the manifest; a finished scan's stamps the arrays it has merged."""
        if manifest.get("status") == "complete":
            manifest = {**manifest, "files": {p.name: stamp(p) for p in
                                              sorted(self.directory.glob("*.npy"))}}
        atomic_write_json(self._manifest_file, manifest, sealed=True)

    def _chunk(self, c: int) -> Path:
        return self.directory / "chunks" / f"{c:06d}"

    def chunk_done(self, c: int) -> bool:
        """Whether chunk `c` is finished and whole (a damaged one is removed, with a warning,
        and scanned again)."""
        return reuse(log, f"chunk {c} of the scan is done again",
                     lambda: self._chunk_record(c)) is not None

    def _chunk_record(self, c: int) -> dict | None:
        record = self._chunk(c).with_suffix(".json")
        meta = load_json(record)
        if meta is None:
            return None
        if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("bad"), list) \
                or set(meta["files"]) != {f"{self._chunk(c).name}.{a}.npy"
                                          for a in meta.get("arrays", ())}:
            raise Damaged(record, "not a chunk's record")
        try:
            for name, recorded in meta["files"].items():
                check(record.with_name(name), recorded)
        except Damaged:
            remove(record)  # the chunk is no longer whole: scan it again
            raise
        return meta

    def write_chunk(self, c: int, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
        """Arrays first, then the record that says the chunk is done (and stamps them)."""
        base = self._chunk(c)
        files = {}
        for name, array in arrays.items():
            path = atomic_save_npy(f"{base}.{name}.npy", array)
            files[path.name] = stamp(path)
        atomic_write_json(base.with_suffix(".json"),
                          {**meta, "arrays": sorted(arrays), "files": files}, sealed=True)

    def read_chunk(self, c: int) -> tuple[dict[str, np.ndarray], dict]:
        """A finished chunk's arrays and record (`Damaged` if it is no longer whole)."""
        meta = self._chunk_record(c)
        if meta is None:
            raise Damaged(self._chunk(c).with_suffix(".json"), "missing")
        base = self._chunk(c)
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

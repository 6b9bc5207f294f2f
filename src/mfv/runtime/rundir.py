"""The run directory, `RUN/`: the one module that knows its layout.

    RUN/
      settings.json  model.json  timings.json      the last run's settings, model, seconds
      scan/<key>/                                  one scan per key: manifest, chunks/, arrays
      targets/<slug>/                              one folder per target definition
        facets/<key>/                              one clustering per key, with its mean images
        render.json                                the index of the target's visualizations
        <kind><rank>_<recipe>_<key8>.png (+ _trace.npy, _alpha.png)
        evaluate.json                              metrics, with the key they were computed for
      results.json  index.html  report/thumbs/     the public face (see `mfv.runtime.results`)
      sweep/                                       `mfv sweep`'s layer study

Every file is checked when it is reused: an index (a clustering's `facets.json`, a target's
`render.json`, a scan's manifest) stamps the files it names with their size and CRC-32, and a
record that cannot be parsed, or a file that no longer matches its stamp, counts as never written —
what it held is computed again, with one warning naming the file (`mfv.core.io.reuse`).

Every stored result lives under a key: a digest of everything that determines it (settings that
matter, the model's weights, the image list, the target, the start image, the seed), so a rerun
reuses exactly what its settings would produce again and nothing else. A result is published
whole (arrays before the record that names them; a clustering's folder by one rename), and older
results stay on disk until the run that replaces them has finished (`prune`). One process writes
a run directory at a time (`mfv.runtime.lock.open_run`); a crashed holder's lock is released
by the system.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    save_png,
    stamp,
    write_error,
)
from mfv.core.keys import KEY_CHARS
from mfv.core.layout import RunLayout
from mfv.facets.find import Facet, FacetResult
from mfv.scan.store import ScanStore

FACETS_FORMAT = "mfv.facets/4"  # /4: facets.json stamps its files

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- render index
@dataclass(frozen=True)
class RenderEntry:
    """One stored visualization of a target: a facet's (`kind="facet"`) or a random start's."""

    kind: str  # "facet" or "random"
    rank: int  # the facet's rank, or the random start's number
    recipe: str
    key: str
    activation: float  # the target on the central view of the final image
    files: dict[str, str] = field(default_factory=dict)  # role → file in the target folder
    stamps: dict[str, dict] = field(default_factory=dict)  # file → its size and CRC-32

    @property
    def name(self) -> str:
        return f"{self.kind}{self.rank:02d}_{self.recipe}"

    @property
    def slot(self) -> tuple[str, int, str]:
        return self.kind, self.rank, self.recipe


# ------------------------------------------------------------------------------- a target
class TargetDir:
    """One target's folder: its clusterings (by key), its visualizations and their index, and
    its evaluation."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def slug(self) -> str:
        return self.directory.name

    # facets -----------------------------------------------------------------------------
    def _facets_dir(self, key: str) -> Path:
        return self.directory / "facets" / key[:KEY_CHARS]

    def load_facets(self, key: str) -> tuple[FacetResult, list[np.ndarray]] | None:
        """The clustering stored under `key` with its mean images, or None (also when any of
        its files is damaged: then it is computed again, with one warning)."""
        return reuse(log, f"the facets of {self.slug} are computed again",
                     lambda: self._load_facets(key))

    def _load_facets(self, key: str) -> tuple[FacetResult, list[np.ndarray]] | None:
        d = self._facets_dir(key)
        doc = load_json(d / "facets.json")
        if doc is None or doc.get("format") != FACETS_FORMAT or doc.get("key") != key:
            return None
        try:
            files = doc["files"]
            if not all(map(own_name, files)):
                raise TypeError("a file outside the clustering's folder")
            arrays = {name: load_npy(d / name, recorded=files[name]) for name in files
                      if name.endswith(".npy")}
            for name in files:
                if not name.endswith(".npy"):  # the mean images' pictures
                    check(d / name, files[name])
            selected, assignment = arrays["selected.npy"], arrays["assignment.npy"]
            centres = arrays["code_centres.npy"]
            facets = [Facet(rank=f["rank"], members=selected[assignment == f["rank"]],
                            representatives=np.asarray(f["representatives"], dtype=np.int64),
                            centre_2d=np.asarray(f["centre_2d"], dtype=np.float64),
                            code_centre=centres[f["rank"]], code_spread=f["code_spread"],
                            activation_mean=f["activation_mean"],
                            activation_max=f["activation_max"]) for f in doc["facets"]]
            result = FacetResult(facets=facets, coords_2d=arrays["coords_2d.npy"],
                                 selected=selected, assignment=assignment,
                                 k_requested=doc["k_requested"], k_chosen=doc["k_chosen"],
                                 settings=doc["settings"],
                                 scores={int(k): float(v) for k, v in doc["scores"].items()},
                                 timings=doc["timings"], boxes=arrays.get("boxes.npy"))
            means = [arrays[f"mean{f.rank:02d}.npy"] for f in facets]
        except Damaged:
            remove(d)  # the clustering is no longer whole: compute it again
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            remove(d)
            raise Damaged(d / "facets.json", f"unexpected content: {exc!r}") from None
        return result, means

    def save_facets(self, key: str, result: FacetResult, means: list[np.ndarray]) -> None:
        """Store a clustering and its mean images under `key`, published by one rename."""
        final = self._facets_dir(key)
        staging = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._stage_facets(staging, key, result, means)
            remove(final)  # an incomplete leftover of the same key, or a file in its place
            staging.rename(final)
        except OSError as exc:
            raise write_error(final, exc) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # what a failed write left

    def _stage_facets(self, staging: Path, key: str, result: FacetResult,
                      means: list[np.ndarray]) -> None:
        staging.mkdir(parents=True)
        atomic_save_npy(staging / "selected.npy", result.selected)
        atomic_save_npy(staging / "coords_2d.npy", result.coords_2d)
        atomic_save_npy(staging / "assignment.npy", result.assignment)
        if result.boxes is not None:  # patch facets: the crop of each selected image
            atomic_save_npy(staging / "boxes.npy", result.boxes)
        atomic_save_npy(staging / "code_centres.npy",
                        np.stack([f.code_centre for f in result.facets]))
        for facet, mean in zip(result.facets, means, strict=True):
            atomic_save_npy(staging / f"mean{facet.rank:02d}.npy", mean)
            save_png(staging / f"mean{facet.rank:02d}.png", mean)
        atomic_write_json(staging / "facets.json", {
            "format": FACETS_FORMAT, "key": key, "k_requested": result.k_requested,
            "k_chosen": result.k_chosen, "settings": _plain(result.settings),
            "scores": {str(k): v for k, v in result.scores.items()}, "timings": result.timings,
            "facets": [{"rank": f.rank, "size": f.size,
                        "representatives": f.representatives.tolist(),
                        "centre_2d": f.centre_2d.tolist(), "code_spread": f.code_spread,
                        "activation_mean": f.activation_mean,
                        "activation_max": f.activation_max} for f in result.facets],
            "files": {p.name: stamp(p) for p in sorted(staging.iterdir())}}, sealed=True)

    def mean_image_file(self, key: str, rank: int) -> Path:
        return self._facets_dir(key) / f"mean{rank:02d}.png"

    # visualizations ---------------------------------------------------------------------
    def render_index(self) -> dict[tuple[str, int, str], RenderEntry]:
        """Every stored visualization by its slot (kind, rank, recipe), each checked against its
        stamps: a damaged index, or an entry with a damaged file, is dropped from the index with
        one warning (and its pictures are rendered again)."""
        entries = reuse(log, f"the pictures of {self.slug} are rendered again",
                        self._entries) or []
        index = {e.slot: e for e in entries if reuse(
            log, f"{e.name} of {self.slug} is rendered again", functools.partial(
                self._check_entry, e))}
        if len(index) < len(entries):
            self._write_index(index)
        return index

    def _entries(self) -> list[RenderEntry]:
        path = self.directory / "render.json"
        doc = load_json(path) or {"entries": []}
        try:
            entries = [RenderEntry(**e) for e in doc["entries"]]
            if not all(_typed(e) for e in entries):
                raise TypeError("a field of the wrong type")
        except (KeyError, TypeError) as exc:
            raise Damaged(path, f"unexpected content: {exc}") from None
        return entries

    def _check_entry(self, entry: RenderEntry) -> bool:
        for name in entry.files.values():
            check(self.directory / name, entry.stamps.get(name))
        return True

    def write_visual(self, kind: str, rank: int, recipe: str, key: str, *, image: np.ndarray,
                     trace: np.ndarray, activation: float, alpha: np.ndarray | None = None
                     ) -> RenderEntry:
        """Store one visualization's files (not yet its index entry: `record`)."""
        stem = f"{kind}{rank:02d}_{recipe}_{key[:8]}"
        files = {"image": f"{stem}.png", "trace": f"{stem}_trace.npy"}
        save_png(self.directory / files["image"], image)
        atomic_save_npy(self.directory / files["trace"], trace.astype(np.float32))
        if alpha is not None:
            files["alpha"] = f"{stem}_alpha.png"
            save_png(self.directory / files["alpha"], np.repeat(alpha[..., None] * 255, 3, -1))
        return RenderEntry(kind, rank, recipe, key, float(activation), files,
                           {name: stamp(self.directory / name) for name in files.values()})

    def record(self, entries: list[RenderEntry]) -> None:
        """Add entries to the index (replacing their slots), then delete replaced files."""
        index = self.render_index()
        replaced = [index[e.slot] for e in entries if e.slot in index and index[e.slot] != e]
        index.update({e.slot: e for e in entries})
        self._write_index(index)
        keep = {f for e in index.values() for f in e.files.values()}
        for old in replaced:
            for name in old.files.values():
                if name not in keep:
                    (self.directory / name).unlink(missing_ok=True)

    def _write_index(self, index: Mapping[tuple[str, int, str], RenderEntry]) -> None:
        entries = sorted(index.values(), key=lambda e: (e.kind, e.rank, e.recipe))
        atomic_write_json(self.directory / "render.json",
                          {"entries": [asdict(e) for e in entries]}, sealed=True)

    def file(self, name: str) -> Path:
        return self.directory / name

    # evaluation -------------------------------------------------------------------------
    def load_evaluation(self, key: str) -> dict | None:
        """The metrics stored for `key`, or None (a damaged file: evaluated again)."""
        doc = reuse(log, f"{self.slug} is evaluated again",
                    lambda: load_json(self.directory / "evaluate.json"))
        if doc is None or doc.get("key") != key:
            return None
        return doc["metrics"] if isinstance(doc.get("metrics"), dict) else None

    def save_evaluation(self, key: str, metrics: dict) -> None:
        atomic_write_json(self.directory / "evaluate.json", {"key": key, "metrics": metrics},
                          sealed=True)

    # pruning ----------------------------------------------------------------------------
    def prune(self, facets_key: str | None, visuals: Mapping[tuple[str, int, str], str]) -> None:
        """Keep only the clustering `facets_key` and the visualizations whose slot maps to
        their key in `visuals`; delete everything else of this target."""
        keep_facets = facets_key[:KEY_CHARS] if facets_key else None
        for d in (self.directory / "facets").glob("*") if (self.directory / "facets").exists() \
                else []:
            if d.name != keep_facets:
                shutil.rmtree(d, ignore_errors=True)
        index = self.render_index()
        current = {s: e for s, e in index.items() if visuals.get(s) == e.key}
        if current != index:
            self._write_index(current)
        keep = {f for e in current.values() for f in e.files.values()} | {
            "render.json", "evaluate.json", "facets"}
        for path in self.directory.iterdir():
            if path.name not in keep:
                remove(path)


# ------------------------------------------------------------------------------ the sweep
class SweepStore:
    """`RUN/sweep/`: the layer sweep's results, per-unit measures (by key), the independent
    embedding's codes, example facets' mean images and the plot."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, name: str, doc: dict) -> None:
        atomic_write_json(self.directory / f"{name}.json", doc)

    def read(self, name: str) -> dict | None:
        """A stored document, or None (also when damaged: it is computed again)."""
        return reuse(log, "it is computed again",
                     lambda: load_json(self.directory / f"{name}.json"))

    def read_unit(self, key: str) -> dict | None:
        doc = reuse(log, "the unit's measures are computed again", lambda: load_json(
            self.directory / "units" / f"{key[:KEY_CHARS]}.json"))
        if doc is None or doc.get("key") != key:
            return None
        return doc["measures"] if isinstance(doc.get("measures"), dict) else None

    def write_unit(self, key: str, measures: dict) -> None:
        atomic_write_json(self.directory / "units" / f"{key[:KEY_CHARS]}.json",
                          {"key": key, "measures": measures}, sealed=True)

    def read_array(self, name: str) -> np.ndarray | None:
        path = self.directory / f"{name}.npy"
        return reuse(log, "it is computed again",
                     lambda: load_npy(path) if path.exists() else None)

    def write_array(self, name: str, array: np.ndarray) -> None:
        atomic_save_npy(self.directory / f"{name}.npy", array)

    def example_dir(self, layer_slug: str, unit: int) -> Path:
        return self.directory / "examples" / layer_slug / f"u{unit:05d}"

    def has_image(self, path: Path) -> bool:
        """Whether an example picture is stored whole (decoded to its last pixel); a damaged
        one is removed, with a warning, to be made again."""
        return path.exists() and bool(reuse(log, "it is made again",
                                            lambda: check(path) or True))

    def write_image(self, path: Path, image: np.ndarray) -> None:
        if not path.is_relative_to(self.directory):
            raise MfvError(f"{path} lies outside the sweep's folder")
        save_png(path, image)

    @property
    def plot_stem(self) -> Path:
        return self.directory / "measures"


# --------------------------------------------------------------------------------- the run
class RunDir(RunLayout):
    """A run directory: where each kind of result is stored, and which are current."""

    def scan(self, key: str) -> ScanStore:
        return ScanStore.under(self.root, key)

    def target(self, slug_name: str) -> TargetDir:
        return TargetDir(self.targets_dir / slug_name)

    @property
    def sweep(self) -> SweepStore:
        return SweepStore(self.sweep_dir)

    def write_record(self, name: str, data: Any) -> None:
        """`settings`, `model`: what the last run was asked to do, with what."""
        atomic_write_json(self.root / f"{name}.json", data)

    def read_record(self, name: str) -> Any:
        """A record the last run wrote (`settings`, `timings`, `results`...), or None (also when
        it is damaged: it is written again)."""
        redo = "the stages' times are recorded anew as they run" if name == "timings" else \
            "it is written again"
        return reuse(log, redo, lambda: load_json(self.root / f"{name}.json"))

    def prune(self, scan_keys: set[str], targets: Mapping[str, tuple[str | None, Mapping]]
              ) -> None:
        """Delete what the current settings no longer produce: other scans, other targets'
        folders, and within a target other clusterings and visualizations."""
        keep = {k[:KEY_CHARS] for k in scan_keys}
        for d in self.scans_dir.glob("*") if self.scans_dir.exists() else []:
            if d.name not in keep:
                remove(d)
        folders = self.targets_dir
        for d in folders.glob("*") if folders.exists() else []:
            if d.name in targets:
                facets_key, visuals = targets[d.name]
                self.target(d.name).prune(facets_key, visuals)
            else:
                remove(d)


def _typed(entry: RenderEntry) -> bool:
    """Whether an entry read from an index has its fields' types."""
    return (isinstance(entry.kind, str) and isinstance(entry.rank, int)
            and isinstance(entry.recipe, str) and isinstance(entry.key, str)
            and isinstance(entry.activation, (int, float)) and isinstance(entry.files, dict)
            and isinstance(entry.stamps, dict)
            and all(map(own_name, entry.files.values())))


def _plain(obj: Any) -> Any:
    """Plain JSON types for settings that may hold numpy scalars or tuples."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj

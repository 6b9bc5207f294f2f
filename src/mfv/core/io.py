"""Stored files, written whole and read with suspicion.

Writing: every file goes through a temporary file in the same folder and `os.replace`, so a reader
never sees a half-written file and a crash leaves the old one. A write that fails (a full disk, a
quota, `ulimit -f`, a permission taken away) raises `WriteError`, which names the file and the
cause; its temporary file is removed, so the folder stays as it was before the write.

Reading: what a run stored may since have been truncated, overwritten, deleted or replaced.
`stamp(path)` records a file's size and CRC-32 when it is written (the index that names the file
keeps it); `check(path, stamp)` compares them when the file is reused (without a stamp: it parses
the file whole). Readers raise `Damaged` for a file that cannot be used, and `reuse(log, redo,
read)` turns that into "missing": the damaged file is removed and one warning says what is redone,
so every store treats a damaged file like one it never wrote.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from mfv.core.errors import MfvError

T = TypeVar("T")
SEAL = "crc32"  # the key of a sealed JSON document's checksum (`atomic_write_json`)
_CHUNK = 8 << 20  # bytes read at a time for a checksum
_CAUSES = {  # what an errno means for the user, for a failed write
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit is reached (ulimit -f)",
    errno.EACCES: "permission denied", errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


class WriteError(MfvError):
    """A file could not be written; the message names it and the cause."""

    def __init__(self, path: str | os.PathLike, exc: OSError) -> None:
        cause = _CAUSES.get(exc.errno) or exc.strerror or str(exc)
        detail = f" ({exc.strerror})" if exc.errno in _CAUSES and exc.strerror else ""
        super().__init__(f"cannot write {os.fspath(path)}: {cause}{detail}; what was finished "
                         "is kept: fix this and run the same command to resume")
        self.path, self.errno = Path(path), exc.errno


class Damaged(MfvError):
    """A stored file that cannot be used: missing, unreadable, truncated, changed since it was
    written, or of the wrong kind. Readers raise it; `reuse` redoes what the file held."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)} is damaged ({reason}); delete it and run the same "
                         "command again")
        self.path, self.reason = Path(path), reason

    def discard(self) -> None:
        """Remove the damaged file (or whatever stands in its place), so it is written anew."""
        remove(self.path)


def remove(path: str | os.PathLike) -> None:
    """Delete a file, a link or a folder tree; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:  # one that cannot be deleted: the write that replaces it says why
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def own_name(name: Any) -> bool:
    """Whether an index names a file of its own folder (a plain, visible file name): an index
    that names another path is damaged, and nothing outside its folder is read or removed."""
    return isinstance(name, str) and name == Path(name).name and not name.startswith(".") \
        and name not in ("", "..")


def write_error(path: str | os.PathLike, exc: OSError) -> WriteError:
    """The `WriteError` for an `OSError` met while writing `path` (for writes that do not go
    through `atomic_write_bytes`: folders made, renamed)."""
    return WriteError(exc.filename or path, exc)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`; a
    folder standing where the file goes is replaced. Raises `WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(path, exc) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sealed: bool = False) -> Path:
    """Write `obj` as strict JSON (an undefined number — NaN, ±inf — is `null`, so any parser
    reads every file of a run); `sealed` (a dict): with a CRC-32 of its content (`SEAL`), which
    `load_json` checks, so an index that is edited or damaged but still parses is noticed."""
    text = json.dumps(finite_tree(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    if sealed:
        doc = json.loads(text)  # exactly what a reader will see
        text = json.dumps({**doc, SEAL: _crc_of(doc)}, indent=2, sort_keys=False) + "\n"
    return atomic_write_text(path, text)


def finite_tree(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, at any depth; numpy
    numbers and arrays become Python ones (what strict JSON can hold)."""
    if type(value).__module__ == "numpy":
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_tree(v) for v in value]
    return value


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def load_npy(path: str | os.PathLike, mmap: bool = False,
             recorded: Mapping[str, int] | None = None) -> np.ndarray:
    """Load an array without ever unpickling objects (memory-mapped if `mmap`), checked against
    its stamp `recorded` when given. Raises `Damaged` for a file that is missing, truncated,
    changed, holds pickled objects or is no array file."""
    if recorded is not None:
        check(path, recorded)
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as exc:
        raise Damaged(path, _reason(exc)) from None


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) image in 0..255 (any numeric dtype) as PNG bytes, rounded and clipped."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W, 3) image in 0..255 as PNG, atomically."""
    return atomic_write_bytes(path, png_bytes(image))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_json(path: str | os.PathLike, kind: type = dict) -> Any:
    """A stored JSON document of type `kind` (its seal checked and removed), or None when there
    is no file. Raises `Damaged` for a file that cannot be read or parsed, holds something
    else, or no longer matches its seal."""
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise Damaged(path, _reason(exc)) from None
    if not isinstance(doc, kind):
        raise Damaged(path, f"holds a {type(doc).__name__}, not a {kind.__name__}")
    if isinstance(doc, dict) and SEAL in doc and doc.pop(SEAL) != _crc_of(doc):
        raise Damaged(path, "its content changed since it was written")
    return doc


def _crc_of(doc: Any) -> int:
    return zlib.crc32(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def stamp(path: str | os.PathLike) -> dict[str, int]:
    """A file's size and CRC-32, as an index records them to `check` the file when reused."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
        size = f.tell()
    return {"size": size, "crc32": crc}


def check(path: str | os.PathLike, recorded: Mapping[str, int] | None = None) -> None:
    """Raise `Damaged` unless `path` is the file that was stamped `recorded` (the same size and
    CRC-32). Without a stamp (an index written before stamps), the file is parsed whole: a JSON
    document, an array, or a picture decoded to its last pixel."""
    path = Path(path)
    try:
        if not path.is_file():
            raise Damaged(path, "missing" if not path.exists() else "not a file")
        if not isinstance(recorded, Mapping):  # no stamp (or no stamp that can be read)
            _parse(path)
            return
        size = path.stat().st_size
        if size != recorded.get("size"):
            raise Damaged(path, f"{size} bytes instead of {recorded.get('size')}")
        if stamp(path)["crc32"] != recorded.get("crc32"):
            raise Damaged(path, "its content changed since it was written")
    except OSError as exc:
        raise Damaged(path, _reason(exc)) from None


def reuse(log: logging.Logger, redo: str, read: Callable[[], T]) -> T | None:
    """`read()`'s result, or None when it raises `Damaged`: then the damaged file is removed and
    one warning on `log` names it, the reason, and what is redone (`redo`)."""
    try:
        return read()
    except Damaged as exc:
        exc.discard()
        log.warning("%s is damaged (%s): %s", exc.path, exc.reason, redo)
        return None


def _parse(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".json":
        load_json(path, object)
    elif suffix == ".npy":
        load_npy(path)
    elif suffix in (".png", ".jpg", ".jpeg"):
        try:
            with Image.open(path) as im:
                im.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise Damaged(path, _reason(exc)) from None


def _reason(exc: BaseException) -> str:
    """An exception as a short reason: its message's first line."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:160]

"""One writer per run directory: `open_run` creates and locks `RUN/` for the duration of a
block (flock, so a killed holder never blocks the next run); `check_out` rejects an `--out` that
cannot become a run directory before anything is created."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from mfv.core.errors import MfvError
from mfv.core.io import Damaged, atomic_write_json, load_json, remove
from mfv.runtime.rundir import RunDir


def check_out(root: str | os.PathLike) -> None:
    """Reject an `--out` that cannot become a run directory, without creating anything."""
    root = Path(root)
    try:
        is_file = root.exists() and not root.is_dir()
        existing = next(p for p in (root, *root.absolute().parents) if p.exists())
    except OSError as exc:  # a folder on the way that this user may not enter
        raise MfvError(f"--out {root} cannot be reached ({exc.strerror}: {exc.filename}); "
                       "choose another directory") from None
    if is_file:
        raise MfvError(f"--out {root} is a file; give a directory for the run")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise MfvError(f"--out {root}: {existing} is not writable; choose another directory")


@contextlib.contextmanager
def open_run(root: str | os.PathLike) -> Iterator[RunDir]:
    """Create (if needed) and lock a run directory for writing, for the duration of the block.

    A second process on the same directory stops with a message naming the holder; the lock
    dies with its process (flock), so a killed run never blocks the next one.
    """
    root = Path(root)
    check_out(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MfvError(f"--out {root} is not writable ({exc.strerror}); choose another "
                       "directory") from None
    if (root / ".lock").is_dir() and not (root / ".lock").is_symlink():
        remove(root / ".lock")  # a folder where the lock file goes: no process can hold it
    lock = FileLock(root / ".lock", timeout=0)
    holder_file = root / ".lock.holder.json"
    try:
        lock.acquire()
    except Timeout:
        holder = {}
        with contextlib.suppress(Damaged):  # a broken holder's record: "another process"
            holder = load_json(holder_file) or {}
        who = (f"process {holder.get('pid')} on {holder.get('host')} since "
               f"{holder.get('since')}") if holder else "another process"
        raise MfvError(f"--out {root} is in use by {who}; wait for it to finish or choose "
                       "another --out") from None
    try:
        atomic_write_json(holder_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield RunDir(root)
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()

"""Keys: every stored result is filed under a digest of what determines it, so a rerun reuses
exactly what its settings would produce again."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

KEY_CHARS = 16  # a key's prefix that names its folder or file


def digest(*parts: Any) -> str:
    """A stable hex digest of JSON-like values and numpy arrays (by their bytes)."""
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        h.update(f"<array {array.dtype.str} {array.shape}>".encode())
        h.update(array.tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(json.dumps(str(k)).encode())
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(json.dumps(value, sort_keys=True, default=str).encode())
    h.update(b";")


def slug(spec: str, definition: Mapping[str, Any]) -> str:
    """A folder name for a target: readable, and unique per definition (two targets that
    read alike, such as `_fc:1 + _fc:2` and `_fc:1 - _fc:2`, get different folders)."""
    text = re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-").lower()[:40] or "target"
    return f"{text}-{digest(definition)[:8]}"

"""Small JPEG thumbnails of input images for the report, cached under RUN/report/thumbs.

Input images can live anywhere and be large; the report shows them through small square
thumbnails that sit inside the run directory, so the page stays light and self-contained.
A thumbnail is named by the SHA-1 of the image's resolved path and reused while it is newer
than the image.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from mfv.core.io import atomic_write_bytes
from mfv.data.images import BadImageError, load_rgb

THUMB_PX = 128


@dataclass(frozen=True)
class Thumb:
    """A thumbnail's URL relative to the run directory, or why the image could not be shown."""

    url: str | None
    reason: str | None = None


def resolve_input(path: str, base: str | None) -> Path:
    """An input path as given on input: absolute, or relative to `base` (the run's cwd)."""
    p = Path(path)
    if p.is_absolute() or not base:
        return p.absolute()
    return Path(base) / p


def make_thumbs(
    folder: Path, url_prefix: str, paths: Iterable[str], base: str | None, *,
    progress: bool = True,
) -> dict[str, Thumb]:
    """Thumbnails of `paths` (input paths as given) in `folder`, made in parallel, with URLs
    `url_prefix/<name>`; unreadable images give their reason instead of failing the report."""
    unique = list(dict.fromkeys(paths))
    if not unique:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1))
    out: dict[str, Thumb] = {}
    with ThreadPoolExecutor(workers) as pool, tqdm(
        total=len(unique), unit="img", desc="report thumbnails",
        disable=not progress or len(unique) < 200,
    ) as bar:
        for path, thumb in zip(
            unique, pool.map(lambda p: _thumb(folder, url_prefix, resolve_input(p, base)),
                              unique),
            strict=True,
        ):
            out[path] = thumb
            bar.update()
    return out


def _thumb(folder: Path, url_prefix: str, src: Path) -> Thumb:
    name = hashlib.sha1(os.fsencode(src)).hexdigest() + ".jpg"
    dest = folder / name
    url = f"{url_prefix}/{name}"
    try:
        if dest.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            return Thumb(url)
    except OSError:
        pass  # no thumbnail yet, or the image is missing: load_rgb says why
    try:
        im = load_rgb(src, min_side=THUMB_PX)
    except BadImageError as exc:
        return Thumb(None, exc.reason)
    im = ImageOps.fit(im, (THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, optimize=True)
    atomic_write_bytes(dest, buf.getvalue())
    return Thumb(url)

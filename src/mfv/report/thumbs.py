"""Small JPEG thumbnails of input images for the report, cached under RUN/report/thumbs.

Input images can live anywhere and be large; the report shows them through small square
thumbnails that sit inside the run directory, so the page stays light and self-contained.
A thumbnail is named by the SHA-1 of the image's resolved path and reused while it is newer
than the image. Patch facets (`--region patch`) show the part of a photo the unit saw: a key
made by `region_key` names the crop itself, or the whole scanned frame with the crop outlined.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from mfv.core.io import atomic_write_bytes, atomic_write_json, check, load_json, reuse, stamp
from mfv.data.images import BadImageError, load_rgb
from mfv.data.preprocess import Preprocess

THUMB_PX = 128
_REGION = re.compile(r"^(?P<path>.*)\|(?P<kind>crop|box):(?P<box>\d+,\d+,\d+,\d+)"
                     r"@(?P<resize>\d+)/(?P<size>\d+)$")

log = logging.getLogger(__name__)


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


def region_key(path: str, box: Sequence[int], frame: tuple[int, int], whole: bool = False
               ) -> str:
    """The thumbnail key of a crop (top, left, height, width) of the scanned frame of an input
    image (`frame`: the resize and input sizes of the model's centre crop); `whole`: the frame
    with the crop outlined."""
    return (f"{path}|{'box' if whole else 'crop'}:{','.join(str(int(v)) for v in box)}"
            f"@{int(frame[0])}/{int(frame[1])}")


def _region(im: Image.Image, match: re.Match) -> Image.Image:
    """The crop a `region_key` names (or the frame with it outlined), from the decoded image."""
    top, left, h, w = (int(v) for v in match["box"].split(","))
    size = int(match["size"])
    frame = Preprocess(input_size=size, resize_size=int(match["resize"])).resize(im, "crop")
    if match["kind"] == "crop":
        return frame.crop((left, top, left + w, top + h))
    ImageDraw.Draw(frame).rectangle((left, top, left + w - 1, top + h - 1), outline=(255, 220, 0),
                                    width=max(1, size // 112))
    return frame


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
    index = folder / "index.json"  # each thumbnail's size and CRC-32, checked when reused
    stamps = reuse(log, "the thumbnails are checked by decoding them", lambda: load_json(
        index)) or {}
    known = dict(stamps)
    with ThreadPoolExecutor(workers) as pool, tqdm(
        total=len(unique), unit="img", desc="report thumbnails",
        disable=not progress or len(unique) < 200,
    ) as bar:
        for path, thumb in zip(
            unique, pool.map(lambda p: _thumb(folder, url_prefix, p, base, stamps), unique),
            strict=True,
        ):
            out[path] = thumb
            bar.update()
    if stamps != known:
        atomic_write_json(index, stamps, sealed=True)
    return out


def _thumb(folder: Path, url_prefix: str, key: str, base: str | None,
           stamps: dict[str, dict]) -> Thumb:
    """One thumbnail (of an input image, or of a `region_key`), reused while it is newer than
    its image and matches its stamp (without one: decodes whole); made otherwise, and its stamp
    recorded in `stamps`."""
    region = _REGION.match(key)
    src = resolve_input(region["path"] if region else key, base)
    suffix = key[len(region["path"]):] if region else ""
    name = hashlib.sha1(os.fsencode(src) + suffix.encode()).hexdigest() + ".jpg"
    dest = folder / name
    url = f"{url_prefix}/{name}"
    try:
        if dest.stat().st_mtime_ns >= src.stat().st_mtime_ns and reuse(
                log, "the thumbnail is made again", lambda: check(dest, stamps.get(name)) or 1):
            stamps.setdefault(name, stamp(dest))
            return Thumb(url)  # a damaged thumbnail is made again
    except OSError:
        pass  # no thumbnail yet, or the image is missing: load_rgb says why
    try:
        im = load_rgb(src, min_side=int(region["resize"]) if region else THUMB_PX)
    except BadImageError as exc:
        return Thumb(None, exc.reason)
    if region:
        im = _region(im, region)
    if not region or region["kind"] == "crop":
        im = ImageOps.fit(im, (THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, optimize=True)
    atomic_write_bytes(dest, buf.getvalue())
    stamps[name] = stamp(dest)
    return Thumb(url)

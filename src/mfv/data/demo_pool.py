"""The embedded image pool: deterministic crops of the photos that scikit-image's wheel carries,
so a fresh offline machine has several hundred varied images to scan (`mfv demo`, `--images demo`).

It returns plain `(path, label)` pairs; `mfv.data.sources.open_images("demo")` wraps them in an
`ImageList` (this module does not import `mfv.data.sources`, so the two never import each other).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from mfv.core.io import atomic_write_bytes, atomic_write_json

# (label, skimage.data loader name): photos that ship inside the scikit-image wheel (no download).
_DEMO_PHOTOS = (
    ("astronaut", "astronaut"),
    ("brick", "brick"),
    ("camera", "camera"),
    ("chelsea", "chelsea"),
    ("clock", "clock"),
    ("coffee", "coffee"),
    ("coins", "coins"),
    ("grass", "grass"),
    ("hubble", "hubble_deep_field"),
    ("ihc", "immunohistochemistry"),
    ("motorcycle", "stereo_motorcycle"),
    ("rocket", "rocket"),
)
# (crop side as a fraction of the photo's shorter side, grid points per shorter side)
_DEMO_SCALES = ((1.0, 1), (0.75, 2), (0.5, 3), (1 / 3, 4))
_DEMO_SIZE = 256
_DEMO_JITTER = 0.08  # of the crop side
_DEMO_VERSION = 1


class DemoPool(NamedTuple):
    """The pool's files as `(path, label)` pairs, in order, and a description of where from."""

    files: tuple[tuple[str, str], ...]
    source: str


def _unit(key: str) -> float:
    """A deterministic number in [0, 1) from a string: machine- and library-version independent."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _demo_photo(loader: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, loader)()
    if loader == "stereo_motorcycle":
        img = img[0]
    return np.ascontiguousarray(img if img.ndim == 2 else img[..., :3])  # grey stays grey (L)


def _demo_crops(label: str, photo: np.ndarray) -> Iterator[tuple[str, Image.Image]]:
    """Square crops of one photo on a jittered grid at several scales, some mirrored."""
    h, w = photo.shape[:2]
    short = min(h, w)
    pil = Image.fromarray(photo)
    for frac, per_side in _DEMO_SCALES:
        side = int(round(frac * short))
        nx = max(1, math.floor(per_side * w / short + 0.5))
        ny = max(1, math.floor(per_side * h / short + 0.5))
        i = 0
        for gy in range(ny):
            for gx in range(nx):
                key = f"{label}/{frac:.3f}/{i}"
                x = (w - side) / 2 if nx == 1 else gx * (w - side) / (nx - 1)
                y = (h - side) / 2 if ny == 1 else gy * (h - side) / (ny - 1)
                x += (2 * _unit(key + "/x") - 1) * _DEMO_JITTER * side
                y += (2 * _unit(key + "/y") - 1) * _DEMO_JITTER * side
                x0 = int(round(min(max(x, 0), w - side)))
                y0 = int(round(min(max(y, 0), h - side)))
                crop = pil.crop((x0, y0, x0 + side, y0 + side))
                crop = crop.resize(
                    (_DEMO_SIZE, _DEMO_SIZE), Image.Resampling.BICUBIC, reducing_gap=3.0
                )
                if _unit(key + "/flip") < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                yield f"{label}_s{round(frac * 100):03d}_{i:02d}.png", crop
                i += 1


def _skimage_version() -> str:
    return importlib.metadata.version("scikit-image")


def _cached_demo(cache: Path, manifest: Path) -> DemoPool | None:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != _DEMO_VERSION or data.get("skimage") != _skimage_version():
        return None
    items = []
    for name, label, size in data.get("files", []):
        path = cache / name
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
        items.append((str(path), label))
    return DemoPool(tuple(items), data["source"]) if items else None


def _write_demo_photo(cache: Path, label: str, loader: str) -> list[tuple[str, str, int]]:
    """Crop one photo, write each crop as PNG unless identical bytes are there: (name, label,
    size) per crop."""
    files = []
    for name, crop in _demo_crops(label, _demo_photo(loader)):
        buf = io.BytesIO()
        crop.save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
        path = cache / name
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
        files.append((name, label, len(data)))
    return files


def demo_pool(cache_dir: str | os.PathLike) -> DemoPool:
    """The embedded image pool: 442 deterministic 256x256 crops of scikit-image's photos, as
    `(path, label)` pairs (`mfv.data.sources.open_images("demo")` gives them as an `ImageList`).

    Crops are written once as PNG under `cache_dir` (named `<photo>_s<scale%>_<i>.png`, labelled
    by photo) with a manifest written last; later calls reuse them while the manifest, the file
    count and the sizes match. Pixels depend only on the photos and Pillow's resampling, not on
    any random generator, so every machine builds the same pool.
    """
    cache = Path(cache_dir)
    manifest = cache / "manifest.json"
    cached = _cached_demo(cache, manifest)
    if cached is not None:
        return cached
    workers = min(4, os.cpu_count() or 1)  # Pillow releases the GIL while resizing/encoding
    with ThreadPoolExecutor(workers) as pool:
        per_photo = pool.map(lambda photo: _write_demo_photo(cache, *photo), _DEMO_PHOTOS)
        files = [entry for entries in per_photo for entry in entries]
    items = tuple((str(cache / name), label) for name, label, _ in files)
    source = f"demo: {len(items)} crops of scikit-image {_skimage_version()} photos"
    atomic_write_json(
        manifest,
        {"version": _DEMO_VERSION, "skimage": _skimage_version(), "source": source, "files": files},
    )
    return DemoPool(items, source)

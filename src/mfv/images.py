"""Image input: list a user's images, decode any of them robustly, feed them to a DataLoader.

Sources (all give an `ImageList` of `ImageItem(path, label)`):

- `from_folder(root)`: a folder tree; images under an immediate subfolder take its name as label
  (like torchvision's ImageFolder), images directly in `root` have no label;
- `from_list(txt)`: one path per line, optional `<TAB>label`, `#` comments;
- `from_paths(paths)`: a Python list of files and folders;
- `mfv.demo_pool.demo_pool(cache_dir)`: deterministic crops of the photos in scikit-image's wheel;
- `open_images(spec)`: picks one of the above from a command-line argument.

Decoding (`load_rgb`) never trusts a file: broken, truncated, non-image and oversized files raise
`BadImageError` with a short reason, and `ImageDataset` turns that into a per-item result so a
scan counts and reports bad files instead of stopping.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mfv.errors import MfvError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
DEFAULT_MAX_PIXELS = 100_000_000
# Transparent pixels are composited onto mid-grey: neutral for the usual input normalizations
# (it maps to ~0 for EfficientNet-Lite's mean 127.5 and close to 0 for ImageNet's mean/std).
ALPHA_BACKGROUND = (128, 128, 128)

# Leading bytes of formats we accept, to tell "broken image" from "not an image at all".
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),  # only when bytes 8..12 are "WEBP", see _not_an_image_reason
)


class BadImageError(MfvError):
    """A file that cannot be used as an image; `reason` is short and says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageItem:
    """One input image: its path exactly as given or found, and its label if the source has one."""

    path: str
    label: str | None = None


@dataclass(frozen=True)
class ImageList:
    """An ordered collection of images plus a human-readable description of where it came from."""

    items: tuple[ImageItem, ...]
    source: str

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ImageItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return self.items[index]

    @property
    def paths(self) -> list[str]:
        return [item.path for item in self.items]

    @property
    def labels(self) -> list[str | None]:
        return [item.label for item in self.items]

    def fingerprint(self) -> str:
        """sha256 over paths, labels, sizes and mtimes, in list order.

        Stable across runs while nothing changes; changes when any file is added, removed,
        reordered, relabelled or modified, so a resumed run can tell whether earlier work
        still applies. Missing files hash as size/mtime -1 (they are reported when decoded).
        """
        digest = hashlib.sha256()
        for item in self.items:
            try:
                st = os.stat(item.path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            line = f"{item.path}\t{item.label or ''}\t{size}\t{mtime}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
        return digest.hexdigest()


# --------------------------------------------------------------------------------- sources


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _walk_images(root: str) -> list[str]:
    """Relative paths of image files under `root`, recursively, skipping hidden entries."""
    found: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and _is_image_name(name):
                found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return sorted(found, key=lambda rel: Path(rel).parts)


def from_folder(root: str | os.PathLike) -> ImageList:
    """Images in a folder tree, sorted; an immediate subfolder's name labels everything under it.

    Only files with an image extension (case-insensitive) are listed; whether they really are
    images is found out when they are decoded. Paths are `root` joined with the relative path.
    """
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        raise MfvError(f"image folder not found: {root_s!r}")
    rels = _walk_images(root_s)
    if not rels:
        exts = " ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise MfvError(f"no image files in folder {root_s!r} (looked for extensions: {exts})")
    items = []
    for rel in rels:
        parts = Path(rel).parts
        items.append(ImageItem(os.path.join(root_s, rel), parts[0] if len(parts) > 1 else None))
    return ImageList(tuple(items), f"folder {root_s}")


def from_list(list_file: str | os.PathLike) -> ImageList:
    """Images named in a text file: one path per line, optionally `<TAB>label`.

    Relative paths are resolved against the list file's folder; blank lines and lines starting
    with `#` are ignored. Listed files are not checked here: missing or broken ones are reported
    when decoded, like every other bad image.
    """
    list_s = os.fspath(list_file)
    try:
        text = Path(list_s).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MfvError(f"image list file not found: {list_s!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MfvError(f"cannot read image list {list_s!r}: {exc}") from None
    base = os.path.dirname(list_s)
    items = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.partition("\t")
        path, label = path.strip(), label.strip()
        if not os.path.isabs(path):
            path = os.path.join(base, path)
        items.append(ImageItem(path, label or None))
    if not items:
        raise MfvError(f"image list {list_s!r} names no images")
    return ImageList(tuple(items), f"list {list_s}")


def from_paths(paths: Iterable[str | os.PathLike]) -> ImageList:
    """Images given one by one; a folder among them expands as `from_folder` (with its labels)."""
    items: list[ImageItem] = []
    for p in paths:
        p_s = os.fspath(p)
        if os.path.isdir(p_s):
            items.extend(from_folder(p_s).items)
        else:
            items.append(ImageItem(p_s, None))
    if not items:
        raise MfvError("no images given")
    return ImageList(tuple(items), f"{len(items)} paths")


def default_cache_dir() -> Path:
    """Cache root: `$MFV_CACHE_DIR`, else `$XDG_CACHE_HOME/mfv`, else `~/.cache/mfv`."""
    if os.environ.get("MFV_CACHE_DIR"):
        return Path(os.environ["MFV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mfv"


def open_images(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike | None = None,
) -> ImageList:
    """The image source a user named: a folder, a .txt/.lst list, one image file, a list of
    paths, or the string "demo" (the embedded pool; a folder called demo must be given as ./demo).
    """
    if not isinstance(spec, (str, os.PathLike)):
        return from_paths(spec)
    spec_s = os.fspath(spec)
    if spec_s == "demo":
        from mfv.demo_pool import demo_pool

        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return demo_pool(cache / "demo-pool")
    if os.path.isdir(spec_s):
        return from_folder(spec_s)
    if not os.path.exists(spec_s):
        raise MfvError(
            f"images not found: {spec_s!r} (give a folder, a .txt/.lst list of files, "
            "an image file, or 'demo')"
        )
    suffix = Path(spec_s).suffix.lower()
    if suffix in LIST_EXTENSIONS:
        return from_list(spec_s)
    if suffix in IMAGE_EXTENSIONS:
        return ImageList((ImageItem(spec_s, None),), f"file {spec_s}")
    raise MfvError(
        f"don't know how to read images from {spec_s!r}: expected a folder, a .txt/.lst list "
        "of image paths, or an image file"
    )


# -------------------------------------------------------------------------------- decoding


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _not_an_image_reason(head: bytes) -> str:
    for magic, fmt in _MAGIC:
        if head.startswith(magic) and (fmt != "WEBP" or head[8:12] == b"WEBP"):
            return f"corrupt or truncated {fmt} header"
    sample = head[:1024]
    if b"\x00" not in sample:
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = exc.start >= len(sample) - 3  # only a multibyte char cut at the end
        else:
            text = True
        if text:
            return "not an image: looks like a text file"
    return "not an image: unrecognised file format"


def _to_8bit(im: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits (I;16*, I, F) scaled to L by its depth, not clipped.

    I;16 is divided by 257 (65535 -> 255). For 32-bit I and F the depth is not declared, so the
    value range decides: within 0..255 kept, within 0..65535 (I) or 0..1 (F) scaled to 0..255,
    otherwise stretched from min..max.
    """
    a = np.asarray(im).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif im.mode == "I" and lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; alpha composited over `ALPHA_BACKGROUND`."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa") or (
        im.mode in ("L", "RGB") and "transparency" in im.info
    ):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, ALPHA_BACKGROUND)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def load_rgb(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> Image.Image:
    """Decode any image file to an 8-bit RGB Pillow image, upright by its EXIF orientation.

    Greyscale, palette, CMYK, 1-bit and 16-bit images are converted (16-bit scaled, not clipped);
    alpha is composited over mid-grey. Multi-frame files give their first frame. Images larger
    than `max_pixels` are refused before any pixel is decoded (Pillow's own decompression-bomb
    check, up to ~179 MP, is also reported as too large; Pillow's global settings are untouched).
    `min_side` lets JPEG decoding shrink the image by up to 8x as long as its shorter side stays
    >= min_side, which is much faster for large photos that will be resized anyway.

    Raises BadImageError(path, reason) for a missing, unreadable, empty, non-image, truncated,
    corrupt or oversized file.
    """
    p = os.fspath(path)

    def bad(reason: str) -> BadImageError:
        return BadImageError(p, reason)

    try:
        data = _read_file(p)
    except FileNotFoundError:
        raise bad("missing file") from None
    except PermissionError:
        raise bad("unreadable: permission denied") from None
    except IsADirectoryError:
        raise bad("not a file: a directory") from None
    except OSError as exc:
        raise bad(f"unreadable: {exc.strerror or exc}") from None
    if not data:
        raise bad("empty file (0 bytes)")

    with warnings.catch_warnings():
        # Our own max_pixels check governs; Pillow's hard DecompressionBombError still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise bad(f"too large: {exc}") from None
        except UnidentifiedImageError:
            raise bad(_not_an_image_reason(data)) from None
        except Exception as exc:  # Pillow's plugins raise many types on malformed headers
            raise bad(f"corrupt image header ({type(exc).__name__}: {exc})") from None
        w, h = im.size
        if w * h > max_pixels:
            raise bad(
                f"too large: {w}x{h} = {w * h / 1e6:.1f} megapixels "
                f"(limit {max_pixels / 1e6:.1f}, raise max_pixels to allow)"
            )
        if w < 1 or h < 1:
            raise bad(f"empty image: {w}x{h} pixels")
        if min_side is not None:  # a no-op for formats other than JPEG
            im.draft(im.mode, (min_side, min_side))
        try:
            im.load()
        except MemoryError:
            raise bad(f"too large to decode in memory: {w}x{h}") from None
        except OSError as exc:
            if "truncated" in str(exc).lower():
                raise bad("truncated file: image data ends early") from None
            raise bad(f"corrupt image data ({exc})") from None
        except Exception as exc:  # any other decoder failure means the data is corrupt
            raise bad(f"corrupt image data ({type(exc).__name__}: {exc})") from None
        # A broken EXIF block leaves the pixels usable as stored.
        with contextlib.suppress(Exception):
            im = ImageOps.exif_transpose(im)
        try:
            return _to_rgb(im)
        except ValueError as exc:
            raise bad(f"unsupported colour mode {im.mode} ({exc})") from None


# ------------------------------------------------------------------------- torch dataset


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, transformed images by index; bad files give their reason instead of raising.

    `__getitem__(i)` returns `(i, tensor)` or `(i, reason)`; use `collate_skip_bad` as the
    DataLoader's `collate_fn`. `transform` maps an RGB Pillow image to a tensor (the model's
    preprocessing); `min_side`, if given, lets large JPEGs decode at reduced size (see load_rgb).
    """

    def __init__(
        self,
        items: ImageList | Sequence[ImageItem],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int | None = None,
    ) -> None:
        self.items = tuple(items)
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            image = load_rgb(
                self.items[index].path, max_pixels=self.max_pixels, min_side=self.min_side
            )
        except BadImageError as exc:
            return index, exc.reason
        return index, self.transform(image)


def collate_skip_bad(
    batch: Sequence[tuple[int, torch.Tensor | str]],
) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Batch `ImageDataset` results: (indices of good images, their stacked tensors or None if
    there are none, [(index, reason)] for bad ones)."""
    good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
    bad = [(int(i), x) for i, x in batch if not isinstance(x, torch.Tensor)]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    stacked = torch.stack([x for _, x in good]) if good else None
    return indices, stacked, bad

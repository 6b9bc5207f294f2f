"""Image decoding: turn any listed file into an 8-bit RGB image, or say in a few words why not.

`load_rgb` never trusts a file: missing, special, oversized, broken, truncated, non-image, tiny
and degenerate files raise `BadImageError` with a short reason, and `ImageDataset` turns that
into a per-item result so a scan counts and reports bad files instead of stopping. Listing the
images is `mfv.data.sources`' job; this module needs nothing from it (an item is anything with a
`.path`).

Limits, and why:

- Only regular files are read (after following symlinks). A named pipe blocks its reader until a
  writer comes, and a device such as /dev/zero never ends, so `os.stat` refuses them before they
  are opened (opening a device can itself have effects); the file is then opened non-blocking
  and the open descriptor checked again, so a path swapped for a pipe in between cannot block.
- `max_bytes` (`DEFAULT_MAX_BYTES`, 512 MiB): a file whose size is over it is refused unread, and
  at most max_bytes + 1 bytes are ever read (procfs files and growing files report no or a stale
  size). 512 MiB admits any image within the default pixel limit even stored uncompressed
  (100 MP x 4 bytes of RGBA = 400 MB), while one strange file cannot fill memory.
- `max_pixels` (`DEFAULT_MAX_PIXELS`, 100 MP): checked from the header, before any pixel is
  decoded.
- Shorter side at least `MIN_USABLE_SIDE` = 8 px. Smaller images (1x1 tracking pixels, spacers,
  rules, bullets) hold a few dozen pixels at most and the models' preprocessing would upsample
  them over 32x to ~256 px, so whatever a unit responds to there is interpolation, not content.
  8 px still admits icon-sized datasets (16x16 icons, CIFAR's 32x32).
- Aspect ratio (long side / short side) at most `MAX_ASPECT_RATIO` = 20. The crop preprocessing
  scales the shorter side to ~256 px before the centre crop, so an image of aspect r becomes
  256 x 256r: a 1x5000 image would be 256 x 1,280,000 (~1 GB of RGB) in the resize. At 20:1 the
  resize stays at 1.3 MP and the crop still sees a twentieth of the image; panoramas (2:1 to
  about 10:1) pass, banners and strips beyond 20:1 do not.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mfv.core.errors import MfvError

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 512 * 2**20
MIN_USABLE_SIDE = 8
MAX_ASPECT_RATIO = 20
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
# Non-blocking so a pipe cannot stall open(); no controlling terminal from a tty; binary on Windows.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = os.O_RDONLY | _NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
_READ_CHUNK = 2**20
_SPECIAL_FILES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class BadImageError(MfvError):
    """A file that cannot be used as an image; `reason` is short and says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _HasPath(Protocol):
    @property
    def path(self) -> str: ...


def _not_regular_reason(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in _SPECIAL_FILES if is_kind(mode)), "a special file")
    return f"not a regular file ({kind})"


def _too_large_reason(max_bytes: int) -> str:
    limit = f"{max_bytes / 2**20:g} MiB" if max_bytes >= 2**20 else f"{max_bytes} bytes"
    return f"too large: file over {limit} (raise max_bytes to allow)"


def _read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, without blocking on anything else.

    Raises BadImageError for a file that is not regular or is too large, OSError when it cannot
    be read.
    """
    reason = _not_regular_reason(os.stat(path).st_mode)
    if reason:
        raise BadImageError(path, reason)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)  # what was opened: the path may have changed since the stat
        reason = _not_regular_reason(st.st_mode)
        if reason is None and st.st_size > max_bytes:
            reason = _too_large_reason(max_bytes)
        if reason:
            raise BadImageError(path, reason)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    with f:
        data = f.read(st.st_size + 1)
        if len(data) > st.st_size:  # longer than its stat said (procfs, still growing): bounded
            parts, total = [data], len(data)
            while total <= max_bytes:
                part = f.read(min(_READ_CHUNK, max_bytes + 1 - total))
                if not part:
                    break
                parts.append(part)
                total += len(part)
            data = b"".join(parts)
    if len(data) > max_bytes:
        raise BadImageError(path, _too_large_reason(max_bytes))
    return data


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
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_side: int | None = None,
) -> Image.Image:
    """Decode any image file to an 8-bit RGB Pillow image, upright by its EXIF orientation.

    Greyscale, palette, CMYK, 1-bit and 16-bit images are converted (16-bit scaled, not clipped);
    alpha is composited over mid-grey. Multi-frame files give their first frame. Images larger
    than `max_pixels` are refused before any pixel is decoded (Pillow's own decompression-bomb
    check, up to ~179 MP, is also reported as too large; Pillow's global settings are untouched).
    Files over `max_bytes` are refused unread, and so are pipes, sockets, devices and
    directories; images with a shorter side under `MIN_USABLE_SIDE` or an aspect ratio over
    `MAX_ASPECT_RATIO` are refused from the header (see the module docstring for why).
    `min_side` lets JPEG decoding shrink the image by up to 8x as long as its shorter side stays
    >= min_side, which is much faster for large photos that will be resized anyway.

    Raises BadImageError(path, reason) for a missing, unreadable, special, empty, non-image,
    truncated, corrupt, oversized, too small or too elongated file.
    """
    p = os.fspath(path)

    def bad(reason: str) -> BadImageError:
        return BadImageError(p, reason)

    try:
        data = _read_file(p, max_bytes)
    except FileNotFoundError:
        reason = "missing file (broken symbolic link)" if os.path.islink(p) else "missing file"
        raise bad(reason) from None
    except PermissionError:
        raise bad("unreadable: permission denied") from None
    except MemoryError:
        raise bad("too large to read into memory") from None
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
        if min(w, h) < MIN_USABLE_SIDE:
            raise bad(f"too small: {w}x{h} pixels (shorter side under {MIN_USABLE_SIDE} px)")
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise bad(
                f"too elongated: {w}x{h} pixels (aspect ratio {max(w, h) / min(w, h):.3g}:1, "
                f"limit {MAX_ASPECT_RATIO}:1)"
            )
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

    `items` are anything with a `.path` (an `mfv.data.sources.ImageList`, a list of `ImageItem`).
    `__getitem__(i)` returns `(i, tensor)` or `(i, reason)`; use `collate_skip_bad` as the
    DataLoader's `collate_fn`. `transform` maps an RGB Pillow image to a tensor (the model's
    preprocessing); `min_side`, if given, lets large JPEGs decode at reduced size, and
    `max_pixels` / `max_bytes` are load_rgb's limits.
    """

    def __init__(
        self,
        items: Iterable[_HasPath],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_side: int | None = None,
    ) -> None:
        self.items = tuple(items)
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            image = load_rgb(
                self.items[index].path,
                max_pixels=self.max_pixels,
                max_bytes=self.max_bytes,
                min_side=self.min_side,
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


def decoding_workers(device: torch.device) -> int:
    """How many workers (the scan's processes, `read_photos`' threads) decode images when the
    caller gives no number: none on the CPU, where the model's pass runs on every core and a
    decoder only takes cores from it (on 2 cores decoding in the scan's own process scans 1.3x
    faster than one worker, `benchmarks/scan.py`); with an accelerator, where decoding is what
    the loop waits for, the host's cores but one, at most 8."""
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))

"""Image sources: list a user's images as an `ImageList` of `ImageItem(path, label)`.

- `from_folder(root)`: a folder tree; images under an immediate subfolder take its name as label
  (like torchvision's ImageFolder), images directly in `root` have no label;
- `from_list(txt)`: one path per line, optional `<TAB>label`, `#` comments;
- `from_paths(paths)`: a Python list of files and folders;
- `open_images(spec)`: picks one of the above from a command-line argument, or the embedded demo
  pool (`mfv.data.demo_pool`) for the string "demo".

A run directory is never input: a folder walk leaves out the folders where a run directory (an
`--out` inside `--images`, or the same folder) keeps what mfv made, and says so in one warning.

Listing never opens an image: it only names files (and `ImageList.fingerprint` only stats them),
so a named pipe, a device or a huge file in the folder cannot block or fill memory here. Whether a
listed file is a usable image is decided when it is decoded (`mfv.data.images.load_rgb`), which
reports bad ones with a reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mfv.core.errors import MfvError
from mfv.core.layout import RunLayout
from mfv.data.demo_pool import demo_pool

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst"})

log = logging.getLogger(__name__)


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
        Files are only stat'ed, never opened, so pipes and devices cannot block it.
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


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _walk_images(root: str) -> list[str]:
    """Relative paths of image files under `root`, recursively, skipping hidden entries and the
    folders where a run directory keeps what mfv made (one warning names the run directories).

    Any non-directory entry with an image extension is listed (pipes and devices too, so that
    decoding reports them); directories are descended into whatever their name.
    """
    found: list[str] = []
    runs: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        run = RunLayout(dirpath)
        if run.holds_a_run():
            runs.append(dirpath)
            own = {p.name for p in run.own_folders}
            dirnames[:] = [d for d in dirnames if d not in own]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and _is_image_name(name):
                found.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    if runs:
        log.warning("images: left out what mfv made in the run director%s %s (a run's pictures "
                    "and thumbnails are never scanned as input)", "y" if len(runs) == 1 else
                    "ies", ", ".join(runs))
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

    Relative paths are resolved against the list file's folder (not the current directory: a
    list means the same wherever it is used from); one warning says so when relative paths are
    missing there but exist in the current directory. Blank lines and lines starting with `#`
    are ignored. Listed files are not checked here: missing or broken ones are reported when
    decoded, like every other bad image.
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
    elsewhere: list[str] = []  # relative paths found from the current directory, not the list's
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.partition("\t")
        path, label = path.strip(), label.strip()
        if not os.path.isabs(path):
            if base and not os.path.lexists(os.path.join(base, path)) and os.path.lexists(path):
                elsewhere.append(path)
            path = os.path.join(base, path)
        items.append(ImageItem(path, label or None))
    if not items:
        raise MfvError(f"image list {list_s!r} names no images")
    if elsewhere:
        log.warning("images: %d relative path(s) of %s (first: %s) are not in the list's folder "
                    "%s but are in the current directory; a list's relative paths are read from "
                    "its own folder: write them relative to it, or absolute", len(elsewhere),
                    list_s, elsewhere[0], base)
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
    paths, or the string "demo" (the embedded pool, built under `cache_dir/demo-pool`, default
    `default_cache_dir()`; a folder called demo must be given as ./demo).
    """
    if not isinstance(spec, (str, os.PathLike)):
        return from_paths(spec)
    spec_s = os.fspath(spec)
    if spec_s == "demo":
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        pool = demo_pool(cache / "demo-pool")
        return ImageList(tuple(ImageItem(path, label) for path, label in pool.files), pool.source)
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

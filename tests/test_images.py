"""Image input: sources, fingerprints, robust decoding, the dataset/collate pair, the demo pool."""

from __future__ import annotations

import ast
import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfv.core.errors import MfvError
from mfv.data import images
from mfv.data.demo_pool import demo_pool
from mfv.data.images import BadImageError, ImageDataset, collate_skip_bad, load_rgb
from mfv.data.sources import ImageItem, ImageList, from_folder, from_list, from_paths, open_images

RNG = np.random.default_rng(0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Trivial stand-in for the model's preprocessing: 8x8, CHW, [0, 1]."""
    arr = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_rgb(w: int = 40, h: int = 30) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------ sources


def test_sources_images_and_demo_pool_import_one_way_only():
    """sources -> demo_pool, and nothing back; decoding needs neither (no import cycle at all)."""
    from mfv.data import demo_pool as demo_pool_module
    from mfv.data import sources

    def imported(module) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):  # function level too
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        return {n for n in names if n.startswith("mfv.")}

    assert "mfv.data.demo_pool" in imported(sources)
    assert not imported(demo_pool_module) & {"mfv.data.sources", "mfv.data.images"}
    assert not imported(images) & {"mfv.data.sources", "mfv.data.demo_pool"}



def test_folder_labels_come_from_immediate_subfolders(tmp_path):
    png = encode(noise_rgb(), "PNG")
    for rel in [
        "b/z.PNG",
        "a/x.jpg",
        "a/deep/er/y.png",
        "top.jpeg",
        "a/.hidden.png",
        ".cache/q.png",
    ]:
        write(tmp_path / rel, png)
    write(tmp_path / "a" / "notes.txt", b"not listed")

    listed = from_folder(tmp_path)

    rels = [os.path.relpath(p, tmp_path) for p in listed.paths]
    assert rels == [
        os.path.join("a", "deep", "er", "y.png"),
        os.path.join("a", "x.jpg"),
        os.path.join("b", "z.PNG"),
        "top.jpeg",
    ]
    assert listed.labels == ["a", "a", "b", None]
    assert all(p.startswith(str(tmp_path)) for p in listed.paths)  # root as given, joined
    assert str(tmp_path) in listed.source


def test_flat_folder_has_no_labels_and_empty_folder_is_an_error(tmp_path):
    for name in ["2.png", "1.png", "10.png"]:
        write(tmp_path / "flat" / name, encode(noise_rgb(), "PNG"))
    flat = from_folder(tmp_path / "flat")
    assert [Path(p).name for p in flat.paths] == ["1.png", "10.png", "2.png"]
    assert flat.labels == [None, None, None]

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    write(tmp_path / "empty" / "readme.md", b"hi")
    with pytest.raises(MfvError, match="no image files"):
        from_folder(tmp_path / "empty")
    with pytest.raises(MfvError, match="not found"):
        from_folder(tmp_path / "nope")


def test_list_file_resolves_relative_paths_against_its_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write(data / "imgs" / "one.png", encode(noise_rgb(), "PNG"))
    write(data / "two.jpg", encode(noise_rgb(), "JPEG"))
    absolute = write(tmp_path / "elsewhere" / "three.png", encode(noise_rgb(), "PNG"))
    lst = data / "files.txt"
    lst.write_bytes(
        (
            "# my images\r\n"
            "imgs/one.png\tcat\r\n"
            "\r\n"
            "   \n"
            "two.jpg\n"
            f"{absolute}\tdog\n"
            "  # indented comment\n"
        ).encode()
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # resolution must not depend on the cwd

    listed = from_list(lst)

    assert listed.paths == [str(data / "imgs" / "one.png"), str(data / "two.jpg"), str(absolute)]
    assert listed.labels == ["cat", None, "dog"]
    results = [ImageDataset(listed, to_tensor)[i][1] for i in range(len(listed))]
    assert all(isinstance(r, torch.Tensor) for r in results)

    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    with pytest.raises(MfvError, match="names no images"):
        from_list(tmp_path / "comments.txt")
    with pytest.raises(MfvError, match="missing.txt"):
        from_list(tmp_path / "missing.txt")


def test_from_paths_keeps_paths_as_given_and_expands_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "single.png", encode(noise_rgb(), "PNG"))
    write(tmp_path / "tree" / "k" / "a.png", encode(noise_rgb(), "PNG"))
    listed = from_paths(["single.png", Path("tree"), "gone.png"])
    assert listed.items == (
        ImageItem("single.png", None),
        ImageItem(os.path.join("tree", "k", "a.png"), "k"),
        ImageItem("gone.png", None),  # reported when decoded, not when listed
    )
    with pytest.raises(MfvError):
        from_paths([])


def test_open_images_dispatches_and_names_missing_paths(tmp_path):
    write(tmp_path / "dir" / "a.png", encode(noise_rgb(), "PNG"))
    (tmp_path / "l.lst").write_text("dir/a.png\n")
    write(tmp_path / "one.webp", encode(noise_rgb(), "WEBP"))
    write(tmp_path / "table.csv", b"a,b\n")

    assert open_images(tmp_path / "dir").source.startswith("folder")
    assert open_images(str(tmp_path / "l.lst")).paths == [str(tmp_path / "dir" / "a.png")]
    assert open_images(tmp_path / "one.webp").paths == [str(tmp_path / "one.webp")]
    assert len(open_images([tmp_path / "one.webp", tmp_path / "dir"])) == 2
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(MfvError, match="no/such/folder"):
        open_images(missing)
    with pytest.raises(MfvError, match="table.csv"):
        open_images(tmp_path / "table.csv")


def test_fingerprint_is_stable_and_tracks_changes(tmp_path):
    a = write(tmp_path / "x" / "a.png", encode(noise_rgb(), "PNG"))
    write(tmp_path / "x" / "b.png", encode(noise_rgb(), "PNG"))
    first = from_folder(tmp_path).fingerprint()
    assert len(first) == 64
    assert from_folder(tmp_path).fingerprint() == first  # fresh listing, same files

    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same bytes
    touched = from_folder(tmp_path).fingerprint()
    assert touched != first

    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # back to the original stat ...
    assert from_folder(tmp_path).fingerprint() == first
    a.write_bytes(a.read_bytes() + b"\0")  # ... then the content (and size) changes
    assert from_folder(tmp_path).fingerprint() not in (first, touched)

    listed = from_folder(tmp_path)
    relabelled = ImageList(tuple(ImageItem(i.path, "other") for i in listed), "relabelled")
    reordered = ImageList(tuple(reversed(listed.items)), "reordered")
    assert len({listed.fingerprint(), relabelled.fingerprint(), reordered.fingerprint()}) == 3
    gone = ImageList((ImageItem(str(tmp_path / "gone.png")),), "missing")
    assert len(gone.fingerprint()) == 64  # a missing file does not stop fingerprinting


# ----------------------------------------------------------------------------- decoding


def test_dataset_yields_tensors_for_good_files_and_reasons_for_bad_ones(tmp_path):
    root = tmp_path / "zoo"
    jpeg = encode(noise_rgb(64, 48), "JPEG", quality=90)
    png = encode(noise_rgb(), "PNG")
    good = {
        "good.jpg": jpeg,
        "good.png": png,
        "grey.jpg": encode(Image.new("L", (20, 10), 77), "JPEG"),
        "palette.gif": encode(noise_rgb().convert("P"), "GIF"),
        "cmyk.jpg": encode(Image.new("CMYK", (9, 9), (0, 255, 255, 0)), "JPEG"),
        "deep.png": encode(Image.fromarray(np.full((9, 8), 40000, np.uint16)), "PNG"),
        "alpha.png": encode(noise_rgb().convert("RGBA"), "PNG"),
        "bilevel.bmp": encode(Image.new("1", (8, 8), 1), "BMP"),
        "wide.tif": encode(noise_rgb(300, 15), "TIFF"),  # exactly the 20:1 aspect limit
    }
    corrupt_png = bytearray(png)
    corrupt_png[len(png) // 2 : len(png) // 2 + 40] = RNG.integers(0, 256, 40, np.uint8).tobytes()
    bad = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "random.jpg": (RNG.integers(0, 256, 4096, np.uint8).tobytes(), "unrecognised"),
        "text.png": (b"<html><body>404 not found</body></html>\n" * 20, "text file"),
        "bomb.png": (png_header_only(12_000, 12_000), "too large"),
        "corrupt.png": (bytes(corrupt_png), "corrupt image data"),
        "header.png": (png[:8], "truncated PNG header"),
        "tiny.png": (encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "too small: 1x1"),
    }
    for name, data in good.items():
        write(root / name, data)
    for name, (data, _) in bad.items():
        write(root / name, data)
    listed = from_folder(root)
    loader = torch.utils.data.DataLoader(
        ImageDataset(listed, to_tensor), batch_size=4, collate_fn=collate_skip_bad
    )

    tensors, reasons = {}, {}
    for indices, batch, failures in loader:
        assert batch is None or batch.shape == (len(indices), 3, 8, 8)
        for k, i in enumerate(indices.tolist()):
            tensors[Path(listed[i].path).name] = batch[k]
        for i, reason in failures:
            reasons[Path(listed[i].path).name] = reason

    assert set(tensors) == set(good)
    assert set(reasons) == set(bad)
    for name, (_, expected) in bad.items():
        assert expected in reasons[name], (name, reasons[name])
        assert len(reasons[name]) < 160 and "BytesIO" not in reasons[name]
    assert len(set(reasons.values())) == len(bad)  # each failure says something different
    assert all(float(t.min()) >= 0.0 and float(t.max()) <= 1.0 for t in tensors.values())
    assert torch.allclose(tensors["cmyk.jpg"][:, 4, 4], torch.tensor([1.0, 0.0, 0.0]), atol=0.03)
    assert torch.allclose(tensors["deep.png"], torch.full((3, 8, 8), 156 / 255))  # 40000/257


def test_dataloader_with_workers_and_an_all_bad_batch(tmp_path):
    write(tmp_path / "ok.png", encode(noise_rgb(), "PNG"))
    write(tmp_path / "zero1.png", b"")
    write(tmp_path / "zero2.png", b"")
    listed = from_folder(tmp_path)
    loader = torch.utils.data.DataLoader(
        ImageDataset(listed, to_tensor), batch_size=2, num_workers=2, collate_fn=collate_skip_bad
    )
    batches = list(loader)
    assert batches[0][0].tolist() == [0] and batches[0][1].shape == (1, 3, 8, 8)
    indices, stacked, failures = batches[1]
    assert indices.dtype == torch.long and indices.numel() == 0 and stacked is None
    assert failures == [(2, "empty file (0 bytes)")]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))
    p16 = write(tmp_path / "ramp16.png", encode(Image.fromarray(ramp), "PNG"))
    assert Image.open(p16).mode.startswith("I;16")
    out = np.asarray(load_rgb(p16))[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0]) >= 0) and len(np.unique(out)) > 200  # a ramp, not a clip

    ramp32 = np.tile(np.linspace(0, 65535, 64).astype(np.int32), (8, 1))
    p32 = write(tmp_path / "ramp32.tif", encode(Image.fromarray(ramp32), "TIFF"))
    assert Image.open(p32).mode == "I"
    out32 = np.asarray(load_rgb(p32))[..., 1]
    assert out32.min() == 0 and out32.max() == 255 and out32[0, 32] == round(ramp32[0, 32] / 257)


def test_modes_orientation_and_alpha(tmp_path):
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): 40x20 stored -> 20x40 shown.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = load_rgb(write(tmp_path / "rot.jpg", encode(stored, "JPEG", exif=exif, quality=95)))
    assert rotated.size == (20, 40)
    r, g, b = rotated.getpixel((15, 4))  # top-left moved to the top-right
    assert r > 200 and b < 60

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    pal.putpixel((0, 0), 0)
    decoded = load_rgb(write(tmp_path / "pal.png", encode(pal, "PNG", transparency=0)))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == images.ALPHA_BACKGROUND  # transparent -> background
    assert decoded.getpixel((1, 1)) == (0, 255, 0)

    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    decoded = load_rgb(write(tmp_path / "rgba.png", encode(rgba, "PNG")))
    assert decoded.getpixel((0, 0)) == images.ALPHA_BACKGROUND
    assert decoded.getpixel((1, 0)) == (10, 20, 30)

    la = load_rgb(write(tmp_path / "la.png", encode(Image.new("LA", (8, 8), (200, 255)), "PNG")))
    assert la.getpixel((1, 1)) == (200, 200, 200)
    bilevel = load_rgb(write(tmp_path / "one.png", encode(Image.new("1", (8, 8), 1), "PNG")))
    assert bilevel.getpixel((0, 0)) == (255, 255, 255)


def test_pixel_limit_missing_unreadable_and_directory(tmp_path, monkeypatch):
    small = write(tmp_path / "small.png", encode(noise_rgb(40, 30), "PNG"))
    with pytest.raises(BadImageError, match="too large: 40x30") as info:
        load_rgb(small, max_pixels=1000)
    assert info.value.path == str(small) and str(small) in str(info.value)
    assert isinstance(info.value, MfvError)
    assert load_rgb(small, max_pixels=1200).size == (40, 30)

    # Far beyond Pillow's own bomb limit: refused from the header, nothing decoded.
    huge = write(tmp_path / "huge.png", png_header_only(30_000, 30_000))
    with pytest.raises(BadImageError, match="too large"):
        load_rgb(huge, max_pixels=10**12)

    with pytest.raises(BadImageError, match="missing file"):
        load_rgb(tmp_path / "absent.jpg")
    with pytest.raises(BadImageError, match="a directory"):
        load_rgb(tmp_path)

    def denied(path: str, max_bytes: int) -> bytes:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(images, "_read_file", denied)  # chmod does not stop root
    with pytest.raises(BadImageError, match="permission denied"):
        load_rgb(small)


def test_min_side_lets_large_jpegs_decode_smaller(tmp_path):
    big = write(tmp_path / "big.jpg", encode(noise_rgb(1024, 768), "JPEG"))
    assert load_rgb(big).size == (1024, 768)
    reduced = load_rgb(big, min_side=150)
    assert reduced.size == (256, 192)  # 1/4 scale: the smallest with the shorter side >= 150
    png = write(tmp_path / "big.png", encode(noise_rgb(300, 200), "PNG"))
    assert load_rgb(png, min_side=50).size == (300, 200)  # other formats decode in full


# ------------------------------------------------------------------ strange files (issue 15)

# Runs in a child process so that a regression fails instead of hanging or exhausting the shared
# machine: address space capped at what is mapped after the imports + 768 MiB, every decode
# bounded by SIGALRM (which interrupts a blocking open() of a pipe), and a wall-clock backstop.
GUARDED = textwrap.dedent("""
    import json, os, resource, signal, sys
    import torch
    from mfv.data.images import BadImageError, ImageDataset, collate_skip_bad, load_rgb
    from mfv.data.sources import from_folder

    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + 768 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard < 0 else min(cap, hard), hard))

    class Hung(BaseException):  # not an OSError, so load_rgb cannot turn it into a reason
        pass

    def on_alarm(signum, frame):
        raise Hung

    signal.signal(signal.SIGALRM, on_alarm)
    real_stat = os.stat

    def guarded(name, work):
        signal.alarm(10)
        try:
            out = work()
        except BadImageError as exc:
            out = exc.reason
        except (Hung, MemoryError) as exc:
            out = type(exc).__name__
        finally:
            signal.alarm(0)
        print(json.dumps([name, out]), flush=True)

    def decode(path, kwargs, stat_as):
        # stat_as: make the first os.stat see another file, as if `path` were swapped after it
        if stat_as:
            os.stat = lambda p, *a, **k: real_stat(stat_as if p == path else p, *a, **k)
        try:
            return "decoded %dx%d" % load_rgb(path, **kwargs).size
        finally:
            os.stat = real_stat

    def scan_folder(root):
        listed = from_folder(root)
        fingerprints = {listed.fingerprint(), from_folder(root).fingerprint()}
        loader = torch.utils.data.DataLoader(
            ImageDataset(listed, lambda im: torch.zeros(1)), batch_size=3,
            collate_fn=collate_skip_bad)
        good, bad = [], {}
        for indices, _, failures in loader:
            good += [os.path.relpath(listed[i].path, root) for i in indices.tolist()]
            bad.update((os.path.relpath(listed[i].path, root), r) for i, r in failures)
        return {"good": good, "bad": bad, "fingerprints": sorted(fingerprints)}

    task, arg = sys.argv[1], json.loads(sys.argv[2])
    if task == "decode":
        for name, path, kwargs, stat_as in arg:
            guarded(name, lambda: decode(path, kwargs, stat_as))
    else:
        guarded("folder", lambda: scan_folder(arg))
""")


def run_guarded(task: str, arg: object) -> dict[str, object]:
    """{name: result} from GUARDED; a hang or crash fails naming the case that did not finish."""
    cmd = [sys.executable, "-c", GUARDED, task, json.dumps(arg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"child hung after {out.splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(line) for line in proc.stdout.splitlines())


def make_strange_files(root: Path) -> dict[str, str]:
    """Files that are not usable images, each with (part of) the reason it must get."""
    root.mkdir(parents=True, exist_ok=True)
    os.mkfifo(root / "pipe.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock.png"))  # the socket file stays after close
    with open(root / "huge.png", "wb") as f:  # sparse: no disk used, nothing to read
        f.truncate(images.DEFAULT_MAX_BYTES + 1)
    write(root / "dot.png", encode(Image.new("RGB", (1, 1)), "PNG"))
    write(root / "line.png", encode(Image.new("RGB", (1, 5000)), "PNG"))
    write(root / "strip.png", encode(Image.new("RGB", (5000, 20)), "PNG"))
    write(root / "sliver.png", encode(Image.new("RGB", (161, 8)), "PNG"))
    return {
        "pipe.jpg": "not a regular file (a named pipe)",
        "zero.jpg": "not a regular file (a character device)",
        "gone.jpg": "missing file (broken symbolic link)",
        "sock.png": "not a regular file (a socket)",
        "huge.png": "too large: file over 512 MiB",
        "dot.png": "too small: 1x1 pixels (shorter side under 8 px)",
        "line.png": "too small: 1x5000 pixels",
        "strip.png": "too elongated: 5000x20 pixels (aspect ratio 250:1, limit 20:1)",
        "sliver.png": "too elongated: 161x8 pixels (aspect ratio 20.1:1",
    }


def test_strange_files_get_a_reason_without_blocking_or_reading_them(tmp_path):
    expected = make_strange_files(tmp_path)
    (tmp_path / "x.jpg").mkdir()
    expected["x.jpg"] = "not a regular file (a directory)"
    regular = write(tmp_path / "ok.png", encode(noise_rgb(), "PNG"))
    write(tmp_path / "edge.png", encode(Image.new("RGB", (160, 8)), "PNG"))
    write(tmp_path / "small.png", encode(noise_rgb(1500, 1000), "PNG"))
    cases = [[name, str(tmp_path / name), {}, None] for name in expected]
    cases += [
        ["edge.png", str(tmp_path / "edge.png"), {}, None],  # 8 px and 20:1: just usable
        # A pipe swapped in after the stat: the open must not block, fstat must catch it.
        ["race.jpg", str(tmp_path / "pipe.jpg"), {}, str(regular)],
        # The byte limit holds even when the stat says 0 bytes (procfs) ...
        ["proc.png", "/proc/self/status", {"max_bytes": 100}, None],
        ["proc-default.png", "/proc/self/status", {}, None],  # ... and such files are read
        ["small.png", str(tmp_path / "small.png"), {"max_bytes": 1000}, None],
    ]
    expected.update({
        "edge.png": "decoded 160x8",
        "race.jpg": "not a regular file (a named pipe)",
        "proc.png": "too large: file over 100 bytes (raise max_bytes to allow)",
        "proc-default.png": "not an image: looks like a text file",
        "small.png": "too large: file over 1000 bytes",
    })

    results = run_guarded("decode", cases)

    assert set(results) == set(expected)
    for name, reason in expected.items():
        assert str(results[name]).startswith(reason), (name, results[name])
    assert (tmp_path / "pipe.jpg").is_fifo() and (tmp_path / "huge.png").stat().st_blocks < 64


def test_folder_with_strange_files_lists_them_and_decodes_only_the_good_ones(tmp_path):
    root = tmp_path / "mixed"
    expected_bad = make_strange_files(root)
    good = ["a.png", "b.jpg", "x.jpg/inside.png", "z.png"]  # x.jpg is a folder, walked into
    for rel in good:
        write(root / rel, encode(noise_rgb(), "JPEG" if rel.endswith("jpg") else "PNG"))

    result = run_guarded("folder", str(root))["folder"]

    assert isinstance(result, dict), result  # a reason string, Hung or MemoryError otherwise
    assert sorted(result["good"]) == good
    assert set(result["bad"]) == set(expected_bad)  # listed and reported, not silently dropped
    for name, reason in expected_bad.items():
        assert result["bad"][name].startswith(reason), (name, result["bad"][name])
    assert len(result["fingerprints"]) == 1 and len(result["fingerprints"][0]) == 64


# ---------------------------------------------------------------------------- demo pool


def test_demo_pool_is_deterministic_cached_and_decodable(tmp_path):
    cache = tmp_path / "demo-pool"
    pool = demo_pool(cache)
    first = ImageList(tuple(ImageItem(path, label) for path, label in pool.files), pool.source)
    assert 300 <= len(first) <= 500
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(first.labels)
    names = [Path(p).name for p in first.paths]
    assert len(set(names)) == len(names)
    assert all(Path(p).parent == cache for p in first.paths)
    for name, label in zip(names, first.labels, strict=True):
        assert name.startswith(f"{label}_s") and name.endswith(".png")
    built = {p: Path(p).read_bytes() for p in first.paths}

    mtimes = [os.stat(p).st_mtime_ns for p in first.paths]
    assert demo_pool(cache) == pool  # reused: nothing rewritten
    assert open_images("demo", cache_dir=tmp_path) == first  # the CLI spelling, same cache
    assert [os.stat(p).st_mtime_ns for p in first.paths] == mtimes

    # A damaged cache is rebuilt from scratch; every crop comes out byte-identical again.
    Path(first.paths[5]).write_bytes(b"junk")
    (cache / "manifest.json").unlink()
    assert demo_pool(cache) == pool
    assert {p: Path(p).read_bytes() for p in first.paths} == built

    sample = load_rgb(first.paths[0])
    assert sample.mode == "RGB" and sample.size == (256, 256)
    full = [built[str(cache / n)] for n in names if n.startswith("chelsea_s100")]
    assert len(full) >= 2 and full[0] != full[1]  # shifted/mirrored views, not copies


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_preprocess_to_array_is_the_resized_crop_in_zero_to_one(mode):
    """(3, S, S) float32 C-contiguous, exactly the resized crop's 8-bit values / 255."""
    from mfv.data.preprocess import Preprocess

    pre = Preprocess(input_size=24, resize_size=28)
    image = noise_rgb(50, 37).convert(mode)
    out = pre.to_array(image)
    crop = np.asarray(pre.resize(image, "crop").convert("RGB"), dtype=np.float32)
    assert out.dtype == np.float32 and out.shape == (3, 24, 24) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, crop.transpose(2, 0, 1) / np.float32(255.0))

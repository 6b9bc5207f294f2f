"""A run directory that heals, write errors that say what and where, and inputs that are refused
or explained in one line (issue 23).

- A damaged run directory (each case the issue found, and a few more) is healed by the same
  command: exit 0, one warning line naming the damaged file, no traceback, the results of the
  undamaged run, and the damaged file whole again.
- Write errors (`ulimit -f`, a full disk, a permission taken away mid-run): exit 2, one line
  naming the file and the cause, no temporary file left, and the same command afterwards
  finishes with the results of an uninterrupted run.
- `--out` inside `--images` (or the same folder): the run directory's own files are left out
  of the listing, with one warning.
- Model files: a program exported with a fixed batch size, TorchScript named `.pt2`, a corrupt,
  cut or foreign `.pt2`: one line each, torch's own log silenced.
- A folder where nothing can be read names the first reasons and where all of them are (and they
  are there); relative paths in a `.txt` list that only exist from the current directory are
  pointed out.
- A t-SNE of very few codes logs nothing.

(Generated damage: tests/test_damage_hypothesis.py.)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_as, comparable, finish, make_images, one_line_error, start, tiny_net
from mfv.cli import main
from mfv.core.errors import MfvError
from mfv.core.io import Damaged, WriteError, atomic_write_bytes, load_json, load_npy, stamp
from mfv.scan.store import ScanStore

# from conftest.py, the fixtures `fork`, `world` (a world-readable folder), `exported` (the tiny
# network exported), `command` (`mfv run` on it) and `finished` (a finished run)


def results_of(out: Path) -> dict:
    return comparable(json.loads((out / "results.json").read_text()))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


# ------------------------------------------------------------------- 1. a damaged run directory
def _truncate(fraction: float) -> Callable[[Path], None]:
    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return cut


def _pickled(path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.array([{"rank": 0}], dtype=object), allow_pickle=True)


def _broken_json(path: Path) -> None:
    path.write_text(path.read_text()[:40])


def _edited_json(path: Path) -> None:
    """Still JSON, with one number changed: only the document's seal tells."""
    doc = json.loads(path.read_text())
    doc["facets"][0]["activation_mean"] += 1.0
    path.write_text(json.dumps(doc))


DAMAGED = {  # case: (file, damage)
    "results.json truncated": ("results.json", _truncate(0.5)),
    "activations truncated": ("scan/*/activations.npy", _truncate(0.5)),
    "assignment overwritten with pickled objects": ("targets/*/facets/*/assignment.npy",
                                                    _pickled),
    "render.json broken": ("targets/*/render.json", _broken_json),
    "picture truncated to a third": ("targets/*/facet00_*[0-9a-f].png", _truncate(1 / 3)),
    "scan manifest broken": ("scan/*/manifest.json", _broken_json),
    "facets.json edited": ("targets/*/facets/*/facets.json", _edited_json),
    "evaluation broken": ("targets/*/evaluate.json", _broken_json),
    "thumbnail truncated": ("report/thumbs/*.jpg", _truncate(1 / 3)),
    "timings broken": ("timings.json", _broken_json),
}


def summary(out: Path) -> tuple[str, ...]:
    """How the lines of a finished command's summary start (one per target, the report)."""
    results = json.loads((out / "results.json").read_text())
    return (*(f"{t['spec']}: " for t in results["targets"]), "report: ")


@pytest.fixture(scope="module")
def alone(command, world) -> tuple[Path, Callable[[Path], list[str]]]:
    """A finished run that renders each picture in a batch of its own, and its command: a
    picture made again is made as it was first made, to the byte (in a batch of another size,
    activations may differ in the 7th digit)."""
    def argv(out: Path) -> list[str]:
        return [*command(out), "--batch-size", "1"]
    out = world / "finished-alone"
    assert main(argv(out)) == 0
    return out, argv


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_file_is_redone_with_one_line(case, alone, tmp_path, capsys):
    (finished, command), (pattern, damage) = alone, DAMAGED[case]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    victim = sorted(out.glob(pattern))[0]
    before = victim.read_bytes()
    damage(victim)
    capsys.readouterr()
    assert main(command(out)) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    said = [line for line in lines(printed.out + printed.err)
            if not line.startswith(summary(out))]
    assert len(said) == 1 and "is damaged" in said[0], said
    assert str(victim) in said[0]
    assert results_of(out) == results_of(finished)
    if victim.suffix in (".npy", ".png", ".jpg"):  # made again, the same bytes
        assert victim.read_bytes() == before


def test_the_report_links_no_damaged_picture(alone, tmp_path, capsys):
    """A picture cut to a third was reused silently and linked in the report: now every
    picture results.json and the report name is whole."""
    finished, command = alone
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for picture in out.glob("targets/*/*[0-9a-f].png"):
        _truncate(1 / 3)(picture)
    assert main(command(out)) == 0
    results = json.loads((out / "results.json").read_text())
    shown = [v["path"] for t in results["targets"] for f in t["facets"]
             for v in f["visualizations"].values()]
    assert shown
    for path in shown:
        assert (out / path).read_bytes().endswith(b"IEND\xaeB`\x82")  # a PNG's last chunk
        assert path in (out / "index.html").read_text()


def test_arrays_never_unpickle(tmp_path):
    _pickled(tmp_path / "a.npy")
    with pytest.raises(Damaged, match="allow_pickle"):
        load_npy(tmp_path / "a.npy")


def test_a_damaged_chunk_is_scanned_again_with_one_warning(tmp_path, caplog):
    """A finished chunk whose array no longer matches its stamp is not done: its record goes,
    so the scan redoes that chunk (and only it)."""
    store = ScanStore(tmp_path / "scan")
    for c in (0, 1):
        store.write_chunk(c, {"acts": np.full((4, 2), c, np.float32)}, {"chunk": c, "bad": []})
    array = tmp_path / "scan" / "chunks" / "000001.acts.npy"
    size = array.stat().st_size
    array.write_bytes(array.read_bytes()[:-4])
    with caplog.at_level(logging.WARNING, logger="mfv"):
        assert store.chunk_done(0) and not store.chunk_done(1) and not store.chunk_done(1)
    assert [r.getMessage() for r in caplog.records] == [
        f"{array} is damaged ({size - 4} bytes instead of {size}): chunk 1 of the scan is done "
        "again"]
    assert not (tmp_path / "scan" / "chunks" / "000001.json").exists()
    assert store.read_chunk(0)[0]["acts"].tolist() == [[0, 0]] * 4


def test_a_stamp_notices_a_change_that_keeps_the_size(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros(8))
    recorded = stamp(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(Damaged, match="changed since it was written"):
        load_npy(path, recorded=recorded)


def test_a_sealed_document_that_still_parses_but_changed_is_damaged(tmp_path):
    from mfv.core.io import atomic_write_json

    atomic_write_json(tmp_path / "a.json", {"x": 1.5, "y": [1, 2]}, sealed=True)
    assert load_json(tmp_path / "a.json") == {"x": 1.5, "y": [1, 2]}
    (tmp_path / "a.json").write_text((tmp_path / "a.json").read_text().replace("1.5", "2.5"))
    with pytest.raises(Damaged, match="changed"):
        load_json(tmp_path / "a.json")


# ------------------------------------------------------------------------- 2. write errors
def _limited_cli(limit: int, argv: list[str]) -> int:
    """`mfv ARGV` in a child whose files may not grow past `limit` bytes (`ulimit -f`)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return main(argv)


def _temporary_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def test_a_file_size_limit_is_one_line_exit_2_and_the_rerun_completes(
        fork, world, command, finished, tmp_path, capsys):
    """`ulimit -f` at three sizes, one after the other on the same run directory: each run
    stops at a later file (the scan's manifest, a chunk, the report), in one line, and resumes
    what the one before finished; the last run, without a limit, completes."""
    out = world / "limited"
    stopped_at = []
    for n, limit in enumerate((1_000, 5_000, 20_000)):
        log = tmp_path / f"cli{n}.log"
        proc = start(fork, log, _limited_cli, limit, command(out))
        assert finish(proc, log) == 2, log.read_text()
        message = one_line_error(log.read_text())
        assert f"cannot write {out}/" in message and "file size limit" in message, message
        assert "run the same command to resume" in message
        assert _temporary_files(out) == []
        stopped_at.append(message.split("cannot write ")[1].split(":")[0])
    assert len(set(stopped_at)) == 3, stopped_at
    assert main(command(out)) == 0
    assert results_of(out) == results_of(finished)
    assert "Traceback" not in capsys.readouterr().err


def _without_pictures(finished: Path, out: Path) -> Path:
    """A copy of a finished run whose pictures are gone (the render must write them again)."""
    shutil.copytree(finished, out)
    for stored in [*out.glob("targets/*/*.png"), *out.glob("targets/*/render.json")]:
        stored.unlink()
    return out


def test_a_full_disk_in_the_render_is_one_line_and_the_rerun_completes(
        command, finished, tmp_path, capsys, monkeypatch):
    """The disk fills up while pictures are written (simulated: fsync fails with ENOSPC for
    files of the target's folder)."""
    out = _without_pictures(finished, tmp_path / "run")
    real = os.fsync

    def fsync(fd: int) -> None:
        if "/targets/" in os.readlink(f"/proc/self/fd/{fd}") and \
                not os.readlink(f"/proc/self/fd/{fd}").count("/facets/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(command(out)) == 2
    message = one_line_error(capsys.readouterr().err)
    assert "the disk is full" in message and f"cannot write {out}/targets/" in message
    assert _temporary_files(out) == []
    monkeypatch.setattr(os, "fsync", real)
    assert main(command(out)) == 0
    assert results_of(out) == results_of(finished)


def test_a_permission_lost_mid_run_is_one_line_and_the_rerun_completes(
        fork, world, command, finished, tmp_path):
    """The pictures are to be made again, and the target's folder has become read-only for the
    process that runs (as root, in CI, the child gives up root's power over permission
    bits)."""
    out = _without_pictures(finished, world / "lost-permission")
    folder = only(list(out.glob("targets/*")))
    folder.chmod(0o555)
    try:
        log = tmp_path / "cli.log"
        proc = start(fork, log, cli_as, os.geteuid() == 0, command(out))
        assert finish(proc, log) == 2, log.read_text()
        message = one_line_error(log.read_text())
        assert f"cannot write {folder}/" in message and "permission denied" in message
    finally:
        folder.chmod(0o755)
    assert main(command(out)) == 0
    assert results_of(out) == results_of(finished)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as caught:
        atomic_write_bytes(path, b"new")
    assert str(caught.value).startswith(f"cannot write {path}: the disk is full")
    assert isinstance(caught.value, MfvError)
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------- 4. --out inside --images
def _scan_argv(model: Path, images: Path, out: Path) -> list[str]:
    return ["scan", "--model", str(model), "--images", str(images), "--target", "fc:1",
            "--size", "32", "--workers", "0", "--quiet", "--out", str(out)]


@pytest.mark.parametrize("where", ["inside", "same"])
def test_a_run_directory_among_the_images_is_left_out_with_one_line(where, exported, tmp_path,
                                                                   capsys):
    images = make_images(tmp_path / "imgs", n=6)
    out = images / "run" if where == "inside" else images
    for rerun in (False, True):
        assert main(_scan_argv(exported, images, out)) == 0
        printed = capsys.readouterr()
        said = lines(printed.err + printed.out)
        manifest = json.loads(only(list(out.glob("scan/*/manifest.json"))).read_text())
        assert len(manifest["images"]) == 6  # the photos, never the run's own files
        assert [line for line in said if "left out" in line] == (
            [said[0]] if rerun else []), said
    assert str(out) in said[0] and "never scanned as input" in said[0]


# --------------------------------------------------------------------------- 9. model files
def _models(root: Path) -> dict[str, tuple[Path, str]]:
    """Model files that must be refused, each with what its one line must say."""
    root.mkdir(exist_ok=True)
    net = tiny_net()
    files = {}
    static = root / "static.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(1, 3, 32, 32),)), static)
    files["fixed batch"] = (static, "dynamic_shapes")
    script = root / "script.pt2"
    with warnings.catch_warnings():  # torch deprecates TorchScript, as mfv's message says
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), script)
    files["TorchScript named .pt2"] = (script, "TorchScript")
    corrupt = root / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(500))
    files["corrupt"] = (corrupt, "no complete zip archive")
    good = root / "good.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 32, 32),), dynamic_shapes=(
        {0: torch.export.Dim("batch")},)), good)
    cut = root / "cut.pt2"
    cut.write_bytes(good.read_bytes()[:-100])
    files["cut short"] = (cut, "no complete zip archive")
    broken = root / "broken.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:len(data) // 2] if name.endswith("model.json") else data)
    files["a damaged entry"] = (broken, "that this torch")
    saved = root / "saved.pt2"
    torch.save(net.state_dict(), saved)
    files["torch.save file"] = (saved, "torch.save file")
    return files


@pytest.fixture(scope="module")
def model_files(world) -> dict[str, tuple[Path, str]]:
    return _models(world / "models")


@pytest.mark.parametrize("case", ["fixed batch", "TorchScript named .pt2", "corrupt",
                                  "cut short", "a damaged entry", "torch.save file"])
def test_a_model_file_is_refused_in_one_line(case, model_files, command, tmp_path, capsys):
    path, says = model_files[case]
    argv = command(tmp_path / "run")
    argv[argv.index("--model") + 1] = str(path)
    assert main(argv) == 2
    printed = capsys.readouterr()
    message = one_line_error(printed.err)
    assert printed.out == ""
    assert f"--model {path}" in message and says in message, message
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 10. nothing can be read
def test_a_folder_where_nothing_can_be_read_names_the_reasons_and_where_they_are(
        exported, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        (images / f"photo{i}.jpg").write_text("not a picture")
    out = tmp_path / "run"
    assert main(_scan_argv(exported, images, out)) == 2
    message = one_line_error(capsys.readouterr().err)
    manifest = only(list(out.glob("scan/*/manifest.json")))
    assert f'"bad" in {manifest}' in message and "photo0.jpg: " in message
    assert "and 1 more" in message
    bad = load_json(manifest)["bad"]
    assert sorted(b["path"] for b in bad) == sorted(str(p) for p in images.iterdir())
    assert all(b["reason"] for b in bad)
    assert main(_scan_argv(exported, images, out)) == 2  # the same, again
    assert one_line_error(capsys.readouterr().err) == message


def test_relative_paths_of_a_list_that_exist_only_from_here_are_pointed_out(
        tmp_path, monkeypatch, caplog):
    from mfv.data.sources import open_images

    make_images(tmp_path / "imgs", n=4)
    (tmp_path / "lists").mkdir()
    names = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "imgs").rglob("*.png"))
    (tmp_path / "lists" / "from-here.txt").write_text("\n".join(names))
    (tmp_path / "lists" / "from-list.txt").write_text("\n".join(f"../{n}" for n in names))
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mfv"):
        listed = open_images("lists/from-here.txt")
    assert [item.path for item in listed] == [f"lists/{n}" for n in names]  # the rule
    (said,) = [r.getMessage() for r in caplog.records]
    assert "4 relative path(s) of lists/from-here.txt" in said and "current directory" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mfv"):
        open_images("lists/from-list.txt")
    assert caplog.records == []


# ------------------------------------------------------------------------------- also
def test_a_tsne_of_two_codes_logs_nothing(caplog, capfd):
    from mfv.facets.cluster import Embedding, cluster

    codes = np.random.default_rng(0).normal(size=(2, 6))
    with caplog.at_level(logging.DEBUG - 1):
        found = cluster(codes, 1, Embedding("tsne", 30, 50, None, 0, 1), (2, 4), "u")
    assert found.k_chosen == 1 and found.info["perplexity_used"] <= 1 / 3
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert capfd.readouterr().err == ""

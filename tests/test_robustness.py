"""Adversarial inputs, settings and interruptions (issue 15), each built in a temporary folder and
its outcome asserted, so that it stays fixed.

- Hostile files in a real scan (a named pipe, a link to /dev/zero, 1x1 / 1x5000 / 10x5000 images,
  a directory called x.jpg, a truncated JPEG) are listed as skipped with their reason, and the
  scan finishes: it runs in a child process under a time and memory limit, so a regression fails
  instead of hanging or filling memory.
- Every bad option of the issue through `mfv.cli.main`: exit 2, one line on stderr naming the
  option and what to do, no traceback, and the run directory untouched (a fresh `--out` is not
  created, a finished run keeps every byte and mtime); `--debug` / MFV_DEBUG=1 raise instead.
- Settings files with wrong types give the message the Python API gives for the same value.
- SIGKILL during the scan, the facets and the render: the same command resumes to the results
  of an uninterrupted run, and the killed holder of the run directory does not block it.
- Two writers on one run directory: one runs, the other is told which process holds it.

Child processes come from a forkserver that has imported mfv once, so each starts in a moment
instead of importing torch again (seconds on a shared CPU); they are real processes for signals
and locks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import socket
import time
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mfv
from conftest import (
    CLASSES,
    HANG_S,
    PRE,
    SlowNet,
    cli_as,
    comparable,
    finish,
    make_images,
    one_line_error,
    start,
    tiny_net,
)
from mfv.cli import build_parser, main
from mfv.core.errors import MfvError
from mfv.runtime.settings import flag_of

# child processes (`fork`, `start`, `finish`, `cli_as`) and the command-line run (`world`,
# `exported`, `command`, `finished`): conftest.py


def snapshot(folder: Path) -> dict[str, tuple[str | None, int]]:
    """Every entry of a folder: files by their bytes and mtime, folders by their mtime."""
    return {str(p.relative_to(folder)): (
        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in [folder, *folder.rglob("*")]}


# ----------------------------------------------------------------- 1. hostile files, real scan
def _hostile_folder(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """Good photos among hostile files; a list file naming them all; the reason expected for
    each hostile one (by file name)."""
    folder = make_images(root / "hostile", n=6)
    os.mkfifo(folder / "pipe.jpg")  # opened blocking, it waits for a writer forever
    (folder / "zero.jpg").symlink_to("/dev/zero")  # read whole, it never ends
    Image.new("RGB", (1, 1), "red").save(folder / "dot.png")
    Image.new("RGB", (1, 5000), "red").save(folder / "rule.png")
    Image.new("RGB", (10, 5000), "red").save(folder / "strip.png")
    (folder / "x.jpg").mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.jpg", quality=95)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])
    expected = {"pipe.jpg": "not a regular file (a named pipe)",
                "zero.jpg": "not a regular file (a character device)",
                "dot.png": "too small: 1x1 pixels", "rule.png": "too small: 1x5000 pixels",
                "strip.png": "too elongated: 10x5000 pixels",
                "cut.jpg": "truncated file", "x.jpg": "not a regular file (a directory)"}
    good = sorted(str(p.relative_to(root)) for p in folder.glob("*/*.png"))  # class folders
    listing = root / "hostile.txt"
    listing.write_text("".join(f"{name}\n" for name in [*good, *(f"hostile/{name}" for name in
                                                                  sorted(expected))]))
    return folder, listing, expected


def _scan_sources(outs: list[str], sources: list[str]) -> None:
    """In a child, under a memory limit: scan each source (with a decoding worker, as users do)."""
    status = Path("/proc/self/status").read_text().splitlines()
    size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = size_kb * 1024 + 3 * 2**30  # the address space now, and 3 GiB more
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for out, source in zip(outs, sources, strict=True):
        model = mfv.load_model(tiny_net(), preprocess=PRE, classes=CLASSES)
        mfv.run(model=model, images=source, targets=["fc:0"], out=out, until="scan",
                device="cpu", workers=1, scan_batch_size=4, progress=False)


def test_hostile_files_are_skipped_with_their_reason_and_the_scan_finishes(tmp_path, fork):
    folder, listing, expected = _hostile_folder(tmp_path)
    outs = [tmp_path / "from-folder", tmp_path / "from-list"]
    log = tmp_path / "scan.log"
    proc = start(fork, log, _scan_sources, [str(o) for o in outs], [str(folder), str(listing)])
    assert finish(proc, log) == 0, log.read_text()
    for out, hostile in zip(outs, [set(expected) - {"x.jpg"}, set(expected)], strict=True):
        data = json.loads((out / "results.json").read_text())["data"]
        skipped = {Path(s["path"]).name: s["reason"] for s in data["skipped"]}
        assert set(skipped) == hostile, skipped  # a directory in a folder is a folder
        for name, reason in skipped.items():
            assert reason.startswith(expected[name]), (name, reason)
        assert data["n_valid"] == 6 == data["n_images"] - len(hostile)


# -------------------------------------------------------------------- 2. bad options, CLI
def _missing_cuda() -> tuple[str, str]:
    """A CUDA device that is not there, and what the message says about it."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.device_count()}", f"only {torch.cuda.device_count()} CUDA"
    return "cuda", "CUDA is not available"


def _bad_options(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each bad option: the arguments, and what its message must say."""
    from safetensors.torch import save_file

    (root / "config.toml").mkdir(exist_ok=True)
    (root / "garbage.safetensors").write_bytes(b"\x00not a tensor file" * 8)
    (root / "garbage.pt").write_bytes(b"not a pickle, not a zip" * 8)
    save_file({"head.weight": torch.zeros(3)}, root / "wrong.safetensors")
    torch.save({"head.weight": torch.zeros(3)}, root / "wrong.pt")
    cuda, why = _missing_cuda()
    wrong_keys = ["missing 6 key(s) (conv1.bias, conv1.weight, conv2.bias and 3 more)",
                  "unexpected 1 key(s) (head.weight)"]
    return {
        "device-cuda": (["--device", cuda], [f"--device {cuda}", why, "use --device cpu"]),
        "device-banana": (["--device", "banana"], [
            "--device", "must be auto, cpu, cuda, cuda:N or mps", "(got 'banana')"]),
        "scan-batch-size-0": (["--scan-batch-size", "0"], [
            "--scan-batch-size", "must be at least 1 (got 0)"]),
        "scan-batch-size-neg": (["--scan-batch-size", "-1"], [
            "--scan-batch-size", "must be at least 1 (got -1)"]),
        "workers-neg": (["--workers", "-1"], ["--workers", "must be at least 0 (got -1)"]),
        "seed-neg": (["--seed", "-1"], ["--seed", "must be at least 0 (got -1)"]),
        "seed-huge": (["--seed", "99999999999"], ["--seed", "must be at most 4294967295"]),
        "config-directory": (["--config", str(root / "config.toml")], [
            f"--config {root / 'config.toml'} is a directory", "give a TOML settings file"]),
        "weights-garbage-safetensors": (["--weights", str(root / "garbage.safetensors")], [
            f"--weights {root / 'garbage.safetensors'}", "not a readable safetensors file"]),
        "weights-garbage-pt": (["--weights", str(root / "garbage.pt")], [
            f"--weights {root / 'garbage.pt'}", "state dict"]),
        "weights-wrong-keys-safetensors": (["--weights", str(root / "wrong.safetensors")], [
            f"--weights {root / 'wrong.safetensors'} does not fit", *wrong_keys]),
        "weights-wrong-keys-pt": (["--weights", str(root / "wrong.pt")], [
            f"--weights {root / 'wrong.pt'} does not fit", *wrong_keys]),
    }


BAD_OPTIONS = [  # the ids of `_bad_options`, for parametrize
    "device-cuda", "device-banana", "scan-batch-size-0", "scan-batch-size-neg", "workers-neg",
    "seed-neg", "seed-huge", "config-directory", "weights-garbage-safetensors",
    "weights-garbage-pt", "weights-wrong-keys-safetensors", "weights-wrong-keys-pt"]


@pytest.fixture(scope="module")
def bad_options(world) -> dict[str, tuple[list[str], list[str]]]:
    cases = _bad_options(world)
    assert sorted(cases) == sorted(BAD_OPTIONS)
    return cases


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_a_bad_option_is_one_line_exit_2_and_changes_nothing(case, bad_options, command,
                                                             finished, tmp_path, capsys):
    extra, says = bad_options[case]
    fresh = tmp_path / "fresh"
    assert main(command(fresh) + extra) == 2
    message = one_line_error(capsys.readouterr().err)
    for fragment in says:
        assert fragment in message, message
    assert not fresh.exists() and list(tmp_path.iterdir()) == []
    before = snapshot(finished)
    assert main(command(finished) + extra) == 2
    assert one_line_error(capsys.readouterr().err) == message.replace(str(fresh), str(finished))
    assert snapshot(finished) == before


def test_debug_and_mfv_debug_show_the_traceback(command, tmp_path, capsys, monkeypatch):
    argv = command(tmp_path / "run") + ["--seed", "-1"]
    with pytest.raises(MfvError, match=r"setting --seed \(seed\) must be at least 0"):
        main(argv + ["--debug"])
    monkeypatch.setenv("MFV_DEBUG", "1")
    with pytest.raises(MfvError, match=r"setting --seed \(seed\) must be at least 0"):
        main(argv)
    assert "mfv: error" not in capsys.readouterr().err  # raised for the traceback, not printed
    assert not (tmp_path / "run").exists()


def test_a_model_file_loads_without_extra_lines_on_stderr(bad_options, command, tmp_path,
                                                          capsys):
    """A rejected --weights with a .pt2 model prints its one line and nothing else: a warning
    that Python would print is a second line on the user's terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(command(tmp_path / "run") + bad_options["weights-wrong-keys-pt"][0])
    assert code == 2
    one_line_error(capsys.readouterr().err)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


@contextlib.contextmanager
def unwritable(world: Path, finished: Path) -> Iterator[tuple[bool, list[Path]]]:
    """Run directories this process's child cannot write: a finished run, a folder below a
    read-only one, and one below a folder it may not enter; and whether the child must drop
    root's power to ignore permission bits (as root, in CI) for them to stop it."""
    readonly, private = world / "readonly", world / "private"
    readonly.mkdir()
    private.mkdir()
    readonly.chmod(0o555)
    private.chmod(0o000)
    finished.chmod(0o555)
    try:
        yield os.geteuid() == 0, [finished, readonly / "new" / "run", private / "run"]
    finally:
        finished.chmod(0o755)
        readonly.chmod(0o755)
        private.chmod(0o755)


def test_an_unwritable_out_is_one_line_exit_2_and_changes_nothing(world, command, finished,
                                                                  fork, tmp_path):
    before = snapshot(finished)
    with unwritable(world, finished) as (bound, outs):
        for n, out in enumerate(outs):
            log = tmp_path / f"cli{n}.log"
            proc = start(fork, log, cli_as, bound, command(out))
            assert finish(proc, log) == 2, log.read_text()
            message = one_line_error(log.read_text())
            assert f"--out {out}" in message and "choose another directory" in message
    assert snapshot(finished) == before
    assert not (world / "readonly" / "new").exists() and not (world / "private" / "run").exists()


# ------------------------------------------------------------- 3. wrong types in a settings file
WRONG_TYPES = {  # setting: (as written in the TOML file, the same value from Python)
    "mean_of": ('"three"', "three"), "steps": ('"10"', "10"), "top_n": ('"5"', "5"),
    "size": ('"64"', "64"), "workers": ('"2"', "2"), "images": ("42", 42),
    "targets": ("[1, 2]", [1, 2]), "device": ("3", 3), "seed": ('"abc"', "abc"),
    "baseline": ('"no"', "no"), "facets": ('"three"', "three"),
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_a_wrong_type_in_a_settings_file_reads_like_the_python_api(name, tmp_path, capsys):
    written, value = WRONG_TYPES[name]
    config = tmp_path / "settings.toml"
    config.write_text(f"{name} = {written}\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 2
    message = one_line_error(capsys.readouterr().err).removeprefix("mfv: error: ")
    head = f"setting {name}" + (", entry 1" if name == "targets" else "") + f" in {config} "
    assert message.startswith(head), message
    problem = message.removeprefix(head)  # e.g. "must be a whole number (got 'three')"
    shown = value[0] if name == "targets" else value
    assert problem.startswith("must be ") and problem.endswith(f"(got {shown!r})")
    with pytest.raises(MfvError) as error:
        mfv.run(**{name: value}, out=str(out))
    label = f"{flag_of(name)} ({name})" + (", entry 1" if name == "targets" else "")
    assert str(error.value) == f"setting {label} {problem}"
    assert not out.exists()


@pytest.mark.parametrize("args, options", [
    (["--mean-of", "three"], {"mean_of": "three"}), (["--seed", "abc"], {"seed": "abc"}),
    (["--steps", "10.5"], {"steps": "10.5"}), (["--facets", "many"], {"facets": "many"}),
    (["--embedding", "umbrella"], {"embedding": "umbrella"}),
    (["--recipe", "fourier", "--recipe", "nope"], {"recipes": ["fourier", "nope"]})])
def test_a_bad_value_on_the_command_line_reads_like_the_python_api(args, options, tmp_path,
                                                                   capsys):
    out = tmp_path / "run"
    assert main(["run", *args, "--out", str(out), "--quiet"]) == 2
    message = one_line_error(capsys.readouterr().err)
    with pytest.raises(MfvError) as error:
        mfv.run(**options, out=str(out))
    assert message == f"mfv: error: {error.value}"
    assert message.startswith(f"mfv: error: setting {args[0]} ({next(iter(options))})")
    assert not out.exists()


def test_every_numeric_option_reads_its_number_from_the_command_line():
    from mfv.cli import _settings
    from mfv.runtime.settings import field_of, locations

    numeric = {name: kind for name in locations() for kind in (int, float)
               if flag_of(name) != name and kind in {field_of(name).annotation,
                                                     *typing.get_args(field_of(name).annotation)}}
    assert {"steps", "seed", "facets", "workers", "units", "top_n"} <= set(numeric)
    for name, kind in numeric.items():
        value = kind(40) if kind is int else 0.5  # within every range (size >= 32, steps >= 10)
        command = "sweep" if ("sweep", name) in locations()[name] else "run"
        extra = ["--backend", "ray"] if name == "ray_workers" else []
        settings = _settings(build_parser().parse_args([command, flag_of(name), str(value),
                                                        *extra]))
        assert settings.value(name) == value and type(settings.value(name)) is kind, name


def test_an_unknown_setting_names_the_file(tmp_path, capsys):
    config = tmp_path / "settings.toml"
    config.write_text("mean_of = 3\nmeanof = 3\n")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        f"mfv: error: unknown setting(s) in {config}: meanof (see `mfv run --help`)")
    with pytest.raises(MfvError, match=r"^unknown setting\(s\): meanof \(see `mfv run --help`\)$"):
        mfv.run(meanof=3, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 4. SIGKILL, then resume
KILLABLE = dict(targets=["fc:0 + fc:2", "conv2:3"], facets=2, mean_of=3, steps=10,
                embedding="pca", judges=(), scan_batch_size=1, batch_size=4, workers=0,
                progress=False, device="cpu")
KILL_POINTS = {  # stage: the file whose appearance says the stage is under way
    "scan": "scan/*/chunks/*.json", "facets": "targets/*/facets/[!.]*",
    "render": "targets/*/*.png"}


def killable_run(out: str, images: str, delay: float) -> dict:
    torch.manual_seed(0)
    model = mfv.load_model(SlowNet(delay).eval(), preprocess=PRE, classes=CLASSES)
    return mfv.run(model=model, images=images, out=out, **KILLABLE).to_dict()  # as the file


def _killable_child(out: str, images: str) -> None:
    killable_run(out, images, delay=0.03)


@pytest.fixture(scope="module")
def kill_images(world) -> Path:
    return make_images(world / "kill-imgs", n=24)


@pytest.fixture(scope="module")
def uninterrupted(world, kill_images) -> dict:
    return killable_run(str(world / "uninterrupted"), str(kill_images), delay=0.0)


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_a_run_killed_in_a_stage_resumes_to_the_uninterrupted_results(
        stage, fork, kill_images, uninterrupted, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "killed.log"
    proc = start(fork, log, _killable_child, str(out), str(kill_images))
    deadline = time.monotonic() + HANG_S
    while not list(out.glob(KILL_POINTS[stage])):
        assert proc.is_alive(), f"the run ended before its {stage} began:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {stage} within {HANG_S} s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not (out / "results.json").exists()  # killed before the end
    later = {"scan": "targets/*/facets/[!.]*", "facets": "targets/*/*.png"}.get(stage)
    if later:
        assert not list(out.glob(later)), f"killed after the {stage}"
    if stage == "scan":
        assert list(out.glob("scan/*/chunks"))  # not yet merged
    if stage == "render":  # 2 targets x (2 facets + 2 random starts), 4 at a time
        assert len(list(out.glob(KILL_POINTS["render"]))) < 8, "killed after the render"
    holder = json.loads((out / ".lock.holder.json").read_text())
    assert holder["pid"] == proc.pid  # the killed process held the directory ...
    log = tmp_path / "resumed.log"
    again = start(fork, log, _killable_child, str(out), str(kill_images))
    assert finish(again, log) == 0, log.read_text()  # ... and does not block the next run
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "complete"
    assert comparable(resumed) == comparable(uninterrupted)
    for ours, theirs in zip(resumed["targets"], uninterrupted["targets"], strict=True):
        assert [f["members"] for f in ours["facets"]] == [f["members"] for f in theirs["facets"]]
        np.testing.assert_allclose([p["activation"] for p in ours["map"]],
                                   [p["activation"] for p in theirs["map"]], rtol=1e-6)


# ------------------------------------------------------------------ 5. concurrent writers
def test_two_writers_one_runs_and_the_other_is_told_who_holds_the_directory(
        fork, command, tmp_path, capsys):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    first = start(fork, log, cli_as, False, command(out))
    try:
        deadline = time.monotonic() + HANG_S
        holder_file = out / ".lock.holder.json"
        while not (holder_file.exists() and holder_file.read_text()):
            assert first.is_alive(), log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)  # holds the directory for as long as the test likes
        assert json.loads(holder_file.read_text())["pid"] == first.pid
        assert main(command(out)) == 2
        message = one_line_error(capsys.readouterr().err)
        assert f"--out {out} is in use by process {first.pid} on {socket.gethostname()}" \
            in message and "wait for it to finish or choose another --out" in message
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert finish(first, log) == 0, log.read_text()
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert not holder_file.exists()


# ------------------------------------------------------------------------ 6. --device auto
def test_device_auto_is_the_default_and_picks_what_is_there(finished, exported):
    from mfv.cli import _settings
    from mfv.runtime.prepare import prepare_model
    from mfv.runtime.settings import Settings, make_settings

    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert Settings().device == "auto"
    assert _settings(build_parser().parse_args(["run"])).device == "auto"
    results = json.loads((finished / "results.json").read_text())
    assert results["settings"]["device"] == "auto"  # the finished run gave no --device
    model = prepare_model(make_settings(model=str(exported), size=32))
    assert model.device.type == expected
    assert {p.device.type for p in model.module.parameters()} == {expected}

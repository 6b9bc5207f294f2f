"""A library without process-wide side effects. `keep_freed_memory`: large blocks are reused
instead of mapped anew (fewer page faults), an allocator the user configured through the
environment is left alone, and only the command line (or a caller's explicit call) tunes it: a
library call leaves the process's allocator as it was. Messages: the library logs them
(`logging`), the command line prints them."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mfv
from conftest import make_tiny
from mfv.cli import main

CHILD = r"""
import ctypes, json, resource, sys
from mfv.core.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
if sys.argv[1] == "library":  # the whole pipeline, called from Python
    import mfv, numpy as np, tempfile
    from pathlib import Path
    from PIL import Image
    sys.path.insert(0, sys.argv[2])
    from conftest import make_tiny
    root = Path(tempfile.mkdtemp())
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)).save(
            root / f"img{i}.png")
    mfv.run(model=make_tiny(), images=str(root), targets=["fc:0"], out=str(root / "run"),
            facets=2, mean_of=3, steps=10, embedding="pca", recipes=["paper-mean"],
            progress=False, device="cpu")
    applied = (root / "run" / "results.json").is_file()
if sys.argv[1] == "cli":  # a command
    from mfv.cli import main
    applied = main(["layers", "efficientnet_lite0"]) == 0
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 64 * 2**20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # what a network's activation does every step: malloc, write, free
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults": after - before}))
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


def _child(variant: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(Path(__file__).parent)],
                         capture_output=True, text=True, env={**environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@glibc
def test_freed_blocks_are_reused_instead_of_mapped_anew():
    default, kept = _child("default"), _child("keep")
    assert kept["applied"] is True
    # 20 blocks of 16 k pages each: mapped anew every time unless kept
    assert default["faults"] > 20 * 16384 * 0.9
    assert kept["faults"] < default["faults"] / 5


@glibc
def test_an_allocator_configured_by_the_user_is_left_alone():
    assert _child("keep", MALLOC_ARENA_MAX="2")["applied"] is True  # not an allocator choice
    assert _child("keep", MALLOC_TRIM_THRESHOLD_="1000000")["applied"] is False
    assert _child("keep", GLIBC_TUNABLES="glibc.malloc.mmap_max=1")["applied"] is False


@pytest.mark.slow
@glibc
def test_a_library_call_leaves_the_allocator_alone_and_the_command_line_tunes_it():
    library, command = _child("library"), _child("cli")
    assert library["applied"] is True and command["applied"] is True  # both ran to the end
    assert library["faults"] > 20 * 16384 * 0.9  # blocks still mapped anew: glibc's default
    assert command["faults"] < library["faults"] / 5


@pytest.mark.slow
def test_the_library_logs_its_messages_and_the_command_line_prints_them(tmp_path, capsys,
                                                                        caplog):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8)).save(
            images / f"img{i}.png")
    with caplog.at_level(logging.INFO, logger="mfv"):
        mfv.run(model=make_tiny(), images=str(images), targets=["fc:0"], until="scan",
                out=str(tmp_path / "lib"), device="cpu", workers=0)
    assert "scan: 6 images, 6 read, 0 skipped" in caplog.text
    assert "scan:" not in capsys.readouterr().out  # a library prints nothing
    assert main(["scan", "--images", str(images), "--target", "_fc:1", "--size", "32",
                 "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "cli")]) == 0
    assert "scan: 6 images, 6 read, 0 skipped" in capsys.readouterr().out

"""`keep_freed_memory`: large blocks are reused instead of mapped anew (fewer page faults), and
an allocator the user configured through the environment is left alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, json, resource, sys
from mfv.core.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
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
    out = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True,
                         check=True, env={**environ, **env})
    return json.loads(out.stdout)


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

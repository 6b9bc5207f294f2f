"""Compiled numeric kernels: one way to compile them (numba), cached on disk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def jit(**options: Any) -> Callable[[Callable], Callable]:
    """numba.njit (nogil, numpy's division semantics) with `options`.

    Compiled code is cached on disk (next to the kernel's module, or in numba's user cache
    directory), so later processes load it; where no cache directory is writable, each process
    compiles on its first call instead."""
    def wrap(fn: Callable) -> Callable:
        settings = {**options, "nogil": True, "error_model": "numpy"}
        try:
            return numba.njit(cache=True, **settings)(fn)
        except RuntimeError:  # numba found no writable cache location
            return numba.njit(**settings)(fn)
    return wrap

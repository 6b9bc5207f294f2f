"""Lazy re-exports for a package's public surface: `import mfv.facets` stays cheap (no
scikit-learn, no torch) until a name is used, so light modules such as the settings can import
a stage's option types without loading its whole stack."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, loading `exports[name]` (a module path) on the
    first access to `name`."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__

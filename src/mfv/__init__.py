"""mfv: Multifaceted Feature Visualization for PyTorch vision models.

    import mfv
    results = mfv.run(model=my_module, preprocess=mfv.Preprocess(...), images="photos/",
                      targets=["_fc:0 + _fc:701"], facets="auto", out="runs/pair")

The names below load on first use, so `import mfv` (and the torch-free modules such as
`mfv.runtime.settings`) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "mfv.runtime.pipeline", "scan_images": "mfv.runtime.pipeline",
    "sweep": "mfv.study.layers",
    "Settings": "mfv.runtime.settings", "make_settings": "mfv.runtime.settings",
    "load_model": "mfv.models", "LoadedModel": "mfv.models", "Preprocess": "mfv.data.preprocess",
    "MfvError": "mfv.core.errors", "visualize": "mfv.api", "open": "mfv.results.read",
}
__all__ = sorted(set(_EXPORTS) - {"open"})  # `from mfv import *` keeps the builtin open


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mfv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

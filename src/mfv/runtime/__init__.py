"""Runs the stages: the pipeline, its tasks, the backends, the run directory and the results."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "run": "mfv.runtime.pipeline",
    "scan_images": "mfv.runtime.pipeline",
    "Settings": "mfv.runtime.settings",
    "make_settings": "mfv.runtime.settings",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Stage 1, scan: every image through the model once, keeping each target's activations and
each image's code."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "scan": "mfv.scan.scanner",
    "ScanResult": "mfv.scan.result",
    "scan_key": "mfv.scan.scanner",
    "ScanOptions": "mfv.scan.options",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

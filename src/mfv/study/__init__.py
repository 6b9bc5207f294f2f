"""The layer study (`mfv sweep`): how multifaceted the units of every layer are, with
chance levels."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "sweep": "mfv.study.layers",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Stage 4, evaluate: the facets and their pictures in numbers, read by the model and by
independent judges."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "Case": "mfv.evaluate.evaluation",
    "evaluate_target": "mfv.evaluate.evaluation",
    "networks": "mfv.evaluate.evaluation",
    "Network": "mfv.evaluate.evaluation",
    "Picture": "mfv.evaluate.evaluation",
    "summary": "mfv.evaluate.evaluation",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

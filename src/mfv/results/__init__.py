"""The typed results of a run (`results.json`) and the metric registry: a low layer that the
stages, the report and the runtime all read, importing nothing of mfv but `mfv.core`."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "Results": "mfv.results.model",
    "TargetResult": "mfv.results.model",
    "SCHEMA": "mfv.results.model",
    "METRICS": "mfv.results.metrics",
    "SWEEP_MEASURES": "mfv.results.metrics",
    "Metric": "mfv.results.metrics",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

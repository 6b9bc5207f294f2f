"""Stage 2, facets: the images that drive a target, clustered by their codes, each cluster's
mean image."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "find_facets": "mfv.facets.find",
    "facets_of_target": "mfv.facets.find",
    "facet_means": "mfv.facets.find",
    "Facet": "mfv.facets.find",
    "FacetResult": "mfv.facets.find",
    "FacetOptions": "mfv.facets.options",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""The facets stage's options (the `facets` section of a run's settings; no scikit-learn here)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from mfv.core.options import Options, count_or, internal, opt
from mfv.data.preprocess import RESIZE_POLICIES

POLICIES = ("class", "top", "auto")  # which images a target's facets come from
EMBEDDINGS = ("tsne", "pca", "umap")  # the 2-D maps that are clustered
REGIONS = ("auto", "patch", "image")  # what of each selected image is clustered
MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit


class FacetOptions(Options):
    """How a target's facets are found: which images, how many facets, and their mean images.
    The fields without a flag beyond `merge` tune the clustering (see `mfv.facets.find`)."""

    selection: Literal[POLICIES] = opt(
        "auto", "--selection", "which images a target's facets come from (auto: the class's "
        "images for class logits when labels exist, else the top-N)")
    top_n: int = opt(200, "--top-n", "N for the top-N selection (200)", ge=1)
    k: count_or("auto") = opt(10, "--facets", "number of facets k, or 'auto' (default 10, "
                                   "the paper's)", alias="facets", metavar="K|auto")
    region: Literal[REGIONS] = opt(
        "auto", "--region", "what of each selected image is clustered and averaged: patch (the "
        "crop around the unit's peak at its receptive field's size) or image (the whole "
        "photo); auto: patch for hidden units on spatial maps read at a place (--reduction "
        "center or max), image for logits, the penultimate, spatial means and other "
        "non-spatial targets")
    patch_size: count_or("auto") = opt(
        "auto", "--patch-size", "side of the patches in input pixels, or auto: the layer's "
        "effective receptive field (90 percent of the gradient) kept within 3/14 and 3/7 of the "
        "input (48-96 px at 224; measured on constructed texture units: docs/hidden-units.md)",
        metavar="PX|auto")
    m: int = opt(15, "--mean-of", "images per mean image (15)", ge=1, alias="mean_of")
    embedding: Literal[EMBEDDINGS] = opt("tsne", "--embedding", "2-D map that is clustered "
                                         "(tsne, the paper's)")
    min_size: int = opt(1, "--min-facet-size", "dissolve smaller facets", ge=1,
                        alias="min_facet_size")
    merge: bool | None = opt(None, None, "merge near-duplicate facets (default: on for "
                             "automatic k)")
    mean_resize: Literal[RESIZE_POLICIES] = opt(
        "crop", "--mean-resize", "how member images are resized for the mean image")
    seed: int = opt(0, "--seed", "seed of every random choice (0)", ge=0, le=MAX_SEED)
    merge_threshold: float = internal(0.5, ge=0)  # separation below which facets merge
    k_range: tuple[int, int] = internal((2, 10))  # where automatic k is looked for
    perplexity: float = internal(30.0, gt=0)
    pca_dims: int = internal(50, ge=2)
    tsne_iter: int | None = internal(None, ge=1)  # default: 1000, or 500 above 5,000 images

    @model_validator(mode="after")
    def _k_range(self) -> FacetOptions:
        low, high = self.k_range
        if not 2 <= low <= high:
            raise ValueError(f"k_range must be (low, high) with 2 <= low <= high, got "
                             f"{self.k_range}")
        return self

    def key(self) -> dict:
        """What the facets depend on (a run keys its stored facets by it): the settings, and
        the tuning knobs changed from their defaults."""
        named = set(self.flat_names().values()) - {"mean_resize"}
        return {k: v for k, v in self.model_dump().items()
                if k in named or v != type(self).model_fields[k].default}

"""The evaluation's options (the `evaluate` section of a run's settings; no torch here)."""

from __future__ import annotations

from mfv.core.options import Name, Names, Options, opt


class EvaluateOptions(Options):
    """Which independent networks judge whether the pictures transfer, which one observes the
    MIS task, and whether each target's negation (what it shuns) is made too."""

    judges: Names = opt(("efficientnet_lite1", "efficientnet_lite2"), "--judges",
                        "models that judge transferability, comma-separated, or 'none'",
                        judges=True)
    observer: Name = opt("auto", "--observer", "the MIS observer: a model name as --model "
                         "takes, 'auto' (efficientnet_lite2, or lite1 when lite2 is explained) "
                         "or 'none' (no MIS)")
    observer_layer: Name = opt("penultimate", "--observer-layer", "the observer's layer whose "
                               "output (averaged over positions) embeds an image (penultimate)")
    observer_weights: str | None = opt(None, "--observer-weights", "state dict (.safetensors "
                                       "/ .pt) for the observer network")
    negative: bool = opt(False, "--negative", "also make each target's negation, -1 x target "
                         "(what it shuns: facets of its least activating photos, pictures that "
                         "minimize it), shown beside it and used as the MIS task's negative "
                         "references")

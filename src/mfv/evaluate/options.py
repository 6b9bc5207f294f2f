"""The evaluation's options (the `evaluate` section of a run's settings; no torch here)."""

from __future__ import annotations

from mfv.core.options import Names, Options, opt


class EvaluateOptions(Options):
    """Which independent networks judge whether the pictures transfer."""

    judges: Names = opt(("efficientnet_lite1", "efficientnet_lite2"), "--judges",
                        "models that judge transferability, comma-separated, or 'none'",
                        judges=True)

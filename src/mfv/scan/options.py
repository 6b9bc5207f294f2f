"""The scan's options (the `scan` section of a run's settings; no torch here)."""

from __future__ import annotations

from typing import Literal

from mfv.core.options import Name, Options, internal, opt
from mfv.scan.store import SCAN_MODES


class ScanOptions(Options):
    """How the scan reads the images: which layer gives the codes, in what batches, and how
    each target's activations are kept."""

    code_layer: Name = opt("penultimate", "--code-layer", "layer whose outputs are clustered "
                           "(default penultimate, the paper's fc7)")
    batch_size: int = opt(32, "--scan-batch-size", "images per scan batch", ge=1,
                          alias="scan_batch_size")
    workers: int | None = opt(None, "--workers", "image decoding processes (default: none on "
                              "the CPU, whose cores the model's pass takes; up to 8 with an "
                              "accelerator)", ge=0)
    mode: Literal[SCAN_MODES] = opt("auto", "--scan-mode", "full activation vectors, a "
                                    "streaming top-N per target (topn), or auto (full when "
                                    "they fit in 2 GB)", alias="scan_mode")
    top_n: int = opt(200, "--top-n", "N: images per target kept by a topn scan and clustered "
                     "by the top-N selection (200)", ge=1)
    chunk_batches: int = internal(8, ge=1)  # batches per resumable chunk

"""`mfv demo`: the whole pipeline offline, on EfficientNet-Lite0 and scikit-image's photos.

The pool is several hundred crops of the photos in scikit-image's wheel. The demo scans it for
every class logit and every channel of a middle block, then picks neurons the pool can serve:
class logits that are the top-1 prediction of many crops (from different photos when possible),
and channels whose most activating crops come from several different photos (multifaceted
within this pool). Its preset is scaled down to finish in a few minutes on a laptop CPU; every
option the user gives wins over the preset, also when it equals mfv's general default.
"""

from __future__ import annotations

import logging

import numpy as np

from mfv.render.recipes import DEFAULT
from mfv.results.model import Results
from mfv.runtime.pipeline import run, scan_images
from mfv.runtime.settings import Settings, make_settings
from mfv.scan.scanner import ScanResult

PRESET = {
    "out": "mfv-demo", "model": "efficientnet_lite0", "images": "demo",
    "scan_targets": ("_fc:*", "_blocks.10:*"), "selection": "top", "top_n": 60, "facets": 3,
    "mean_of": 10, "steps": 48, "recipes": (DEFAULT,),
    # 24 pictures as 2 batches of 12: the render's autograd graph is the run's peak memory
    # (batch 24: 3.7 GB peak RSS), and on the CPU a picture costs the same at batch 12
    "batch_size": 12,
}
MIN_CROPS = 20
log = logging.getLogger(__name__)


def choose_targets(result: ScanResult, n_classes: int = 2, n_channels: int = 2,
                   top_n: int = PRESET["top_n"]) -> list[str]:
    """Class logits and mid-layer channels that the scanned pool serves well."""
    acts, valid = result.activations, result.valid
    specs = result.targets
    photos = np.array([label or "" for label in result.labels])
    logit_cols = [i for i, s in enumerate(specs) if s.startswith("_fc:")]
    top1 = np.array(logit_cols)[np.argmax(acts[:, logit_cols], axis=1)]
    top1 = np.where(valid, top1, -1)
    counts = {c: int(np.sum(top1 == c)) for c in set(top1.tolist()) if c >= 0}
    chosen, used_photos = [], set()
    for col in sorted(counts, key=lambda c: (-counts[c], c)):
        if counts[col] < MIN_CROPS or len(chosen) == n_classes:
            break
        labels, freq = np.unique(photos[top1 == col], return_counts=True)
        main_photo = labels[np.argmax(freq)]
        if main_photo in used_photos and len(counts) > n_classes:
            continue
        used_photos.add(main_photo)
        chosen.append(specs[col])
    channel_cols = [i for i, s in enumerate(specs) if not s.startswith("_fc:")]
    scored = []
    for col in channel_cols:
        values = np.where(valid, acts[:, col], -np.inf)
        top = np.argsort(-values, kind="stable")[:top_n]
        if np.sum(values[top] > 0) < top_n:
            continue
        _, freq = np.unique(photos[top], return_counts=True)
        p = freq / freq.sum()
        scored.append((float(-(p * np.log(p)).sum()), -col, specs[col]))
    chosen += [spec for _, _, spec in sorted(scored, reverse=True)[:n_channels]]
    return chosen


def demo_settings(settings: Settings | None = None) -> Settings:
    """The demo's preset, overridden by every option set in `settings` (`Settings.given`),
    whatever its value (targets excepted: the demo chooses them)."""
    given = {} if settings is None else {
        k: settings.value(k) for k in settings.given - {"targets", "scan_targets"}}
    return make_settings(**{**PRESET, **given})


def demo(settings: Settings | None = None) -> Results:
    """Run the demo (`demo_settings`): scan the pool, choose targets, run the pipeline."""
    preset = demo_settings(settings)
    chosen = choose_targets(scan_images(preset.updated(targets=())), top_n=preset.facets.top_n)
    log.info("demo targets: %s", ", ".join(chosen))
    return run(preset.updated(targets=tuple(chosen)))

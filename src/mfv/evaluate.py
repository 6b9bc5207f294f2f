"""Stage 4, evaluate: how far to trust one target's facets and pictures, in numbers.

The metrics themselves are pure functions in `mfv.metrics`; this module runs the networks they
need: the code of each picture's optimized view (its central input-size crop, the pixels whose
activation was recorded), the target on the centre and the corners, and independent judge
networks for transferability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mfv.activations import TargetBank, capture
from mfv.facets import FacetResult
from mfv.metrics import (
    activation_ratio,
    centre_dominance,
    class_rank,
    diversity,
    fidelity,
    recovery,
)
from mfv.models import LoadedModel, load_model
from mfv.models.base import to_tensor
from mfv.render.objective import central_box
from mfv.targets import LayerRef, Target


@dataclass(frozen=True)
class Picture:
    """One stored visualization as evaluate sees it."""

    kind: str  # "facet" or "random"
    rank: int
    recipe: str
    activation: float
    image: np.ndarray  # (H, W, 3) uint8, the whole canvas


def to_input(model: LoadedModel, images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images as the model's (B, 3, S, S) input in [0, 1], warped to S×S
    (the identity for views already at the input size)."""
    return torch.stack([to_tensor(model.preprocess, Image.fromarray(im), policy="squash")
                        for im in images]).to(model.device)


def optimized_view(image: np.ndarray, size: int) -> np.ndarray:
    """The central size×size crop of an (H, W, 3) canvas: the view the optimizer drove."""
    rows, cols = central_box(image.shape[0], image.shape[1], size)
    return image[rows, cols]


def codes_and_values(model: LoadedModel, code_ref: LayerRef, targets: Sequence[Target],
                     images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Codes (B, D) and every target's value (B, T) for a [0, 1] batch."""
    bank = TargetBank(targets)
    with capture(model, [*bank.layers, code_ref]) as store, torch.inference_mode():
        model(images)
        return (store[code_ref.key].flatten(1).float().cpu().numpy(),
                bank(store).float().cpu().numpy())


def load_judges(model: LoadedModel, names: Sequence[str]) -> list[LoadedModel]:
    """Independent classifiers for transferability (only for ImageNet-1k classifiers)."""
    if model.classes is None or len(model.classes) != 1000:
        return []
    return [load_model(name, device=model.device) for name in names if name != model.name]


def _centre_and_corners(image: np.ndarray, size: int) -> list[np.ndarray]:
    """The central half-size crop and the four corner crops of equal size, resized to `size`."""
    h, w = image.shape[:2]
    ch, cw = h // 2, w // 2
    boxes = [((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    return [np.asarray(Image.fromarray(image[t:t + ch, left:left + cw]).resize(
        (size, size), Image.Resampling.BICUBIC)) for t, left in boxes]


def _dominance(model: LoadedModel, code_ref: LayerRef, target: Target, image: np.ndarray
               ) -> float:
    crops = _centre_and_corners(image, model.preprocess.input_size)
    _, values = codes_and_values(model, code_ref, [target], to_input(model, crops))
    return centre_dominance(values[0, 0], values[1:, 0])


def _transfer(judges: Sequence[LoadedModel], target: Target, view: np.ndarray) -> dict:
    if target.class_index is None or not judges:
        return {}
    ranks = []
    for judge in judges:
        with torch.inference_mode():
            logits = judge(to_input(judge, [view])).float().cpu().numpy()
        ranks.append(int(class_rank(logits, target.class_index)[0]))
    return {"judge_ranks": ranks, "transfer_top1": float(np.mean([r == 1 for r in ranks])),
            "transfer_top5": float(np.mean([r <= 5 for r in ranks]))}


def _mean_transfer(transfers: list[dict]) -> dict:
    keys = ("transfer_top1", "transfer_top5")
    return {k: float(np.mean([t[k] for t in transfers])) for k in keys
            if transfers and all(k in t for t in transfers)}


def evaluate_target(model: LoadedModel, code_ref: LayerRef, target: Target,
                    facets: FacetResult, pictures: Sequence[Picture], real_max: float,
                    truth: np.ndarray | None, judges: Sequence[LoadedModel]) -> dict:
    """Every metric of one target: per facet and recipe, and for the target as a whole.

    `real_max` is the target's maximum over its selected real images; `truth` holds the true
    sub-type label of each selected image (for facet recovery), or None.
    """
    size = model.preprocess.input_size
    centres = np.stack([f.code_centre for f in facets.facets])
    entry: dict = {"facets": {}, "target": {"activation_max_real": real_max}}
    if truth is not None and len(np.unique(truth[truth >= 0])) >= 2:
        entry["target"]["recovery"] = recovery(facets.assignment, truth)
    for recipe in dict.fromkeys(p.recipe for p in pictures):
        group = [p for p in pictures if p.recipe == recipe]
        seeded = sorted((p for p in group if p.kind == "facet"), key=lambda p: p.rank)
        random = sorted((p for p in group if p.kind == "random"), key=lambda p: p.rank)
        if seeded:
            views = [optimized_view(p.image, size) for p in seeded]
            codes, _ = codes_and_values(model, code_ref, [target], to_input(model, views))
            ranks = [p.rank for p in seeded]
            complete = ranks == list(range(len(centres)))
            ok, margin = fidelity(codes, centres) if complete else (
                np.full(len(ranks), np.nan), np.full(len(ranks), np.nan))
            for i, picture in enumerate(seeded):
                metrics = {
                    "activation_ratio": activation_ratio(picture.activation, real_max),
                    "activation_ratio_facet": activation_ratio(
                        picture.activation, facets.facets[picture.rank].activation_max),
                    "fidelity": None if np.isnan(margin[i]) else bool(ok[i]),
                    "fidelity_margin": None if np.isnan(margin[i]) else float(margin[i]),
                    "centre_dominance": _dominance(model, code_ref, target, picture.image),
                    **_transfer(judges, target, views[i])}
                entry["facets"].setdefault(f"facet{picture.rank:02d}", {})[recipe] = metrics
            entry["target"].setdefault("diversity", {})[recipe] = diversity(codes)
        if random:
            views = [optimized_view(p.image, size) for p in random]
            codes, _ = codes_and_values(model, code_ref, [target], to_input(model, views))
            entry["target"].setdefault("diversity_random", {})[recipe] = diversity(codes)
            entry["target"].setdefault("random", {})[recipe] = {
                "activation_ratio": float(np.mean([activation_ratio(p.activation, real_max)
                                                   for p in random])),
                "centre_dominance": float(np.mean([_dominance(model, code_ref, target, p.image)
                                                   for p in random])),
                **_mean_transfer([_transfer(judges, target, v) for v in views])}
    return entry


def summary(per_target: dict[str, dict]) -> dict:
    """Means over all facets of all targets, per recipe, for the report's headline."""
    rows: dict[str, dict[str, list]] = {}
    for entry in per_target.values():
        for metrics in entry["facets"].values():
            for recipe, m in metrics.items():
                for key, value in m.items():
                    if isinstance(value, (int, float, bool)) and value is not None:
                        rows.setdefault(recipe, {}).setdefault(key, []).append(float(value))
    return {recipe: {k: float(np.nanmean(v)) for k, v in metrics.items()}
            for recipe, metrics in rows.items()}

"""Stage 4, evaluate: how far to trust the pictures, in numbers.

Metric functions work on arrays (unit-testable on cases with known answers); `evaluate_run`
applies them to a run directory and writes `RUN/evaluate.json`:

- activation ratio: the target on a visualization over its maximum on real images;
- facet fidelity: a visualization's code is nearest its own facet's centre (and by what margin);
- diversity: mean pairwise cosine distance of a target's visualizations' codes, against the
  random-start visualizations';
- transferability: rank of the target class when independent networks classify a visualization;
- centre dominance: the target on the central crop against crops of its corners;
- facet recovery: ARI / NMI / purity of the facets against known sub-type labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from mfv.io import atomic_write_json, read_json
from mfv.models import LoadedModel, load_model
from mfv.models.base import to_tensor
from mfv.activations import TargetBank, capture
from mfv.targets import LayerRef, Target, resolve_layer

if TYPE_CHECKING:
    from mfv.pipeline import Run


# ----------------------------------------------------------------------------- metrics
def activation_ratio(value: float, real_max: float) -> float:
    """Activation on the visualization over the maximum over real images."""
    return float(value / real_max) if real_max not in (0, None) else float("nan")


def fidelity(codes: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For visualization i of facet i: is centre i the nearest (bool) and the margin.

    Margin: (distance to the nearest other centre − distance to its own) / distance to its own
    centre's nearest other centre; positive means correct, in units of the facets' separation.
    """
    codes, centres = np.asarray(codes, np.float64), np.asarray(centres, np.float64)
    dist = np.linalg.norm(codes[:, None] - centres[None], axis=2)
    own = np.diag(dist)
    if len(centres) == 1:
        return np.ones(1, bool), np.full(1, np.nan)
    others = dist + np.diag(np.full(len(centres), np.inf))
    nearest_other = others.min(axis=1)
    between = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    between += np.diag(np.full(len(centres), np.inf))
    scale = between.min(axis=1)
    return own < nearest_other, (nearest_other - own) / np.where(scale > 0, scale, 1)


def diversity(codes: np.ndarray) -> float:
    """Mean pairwise cosine distance between codes (0 for identical images).

    Two all-zero codes (e.g. a dead post-ReLU layer) count as identical (distance 0), a zero
    and a non-zero code as unrelated (distance 1).
    """
    codes = np.asarray(codes, np.float64)
    if len(codes) < 2:
        return float("nan")
    norms = np.linalg.norm(codes, axis=1)
    unit = codes / np.where(norms > 0, norms, 1.0)[:, None]
    zero = norms == 0
    sims = np.where(zero[:, None] & zero[None], 1.0, unit @ unit.T)
    upper = np.triu_indices(len(codes), 1)
    return float(np.mean(1 - sims[upper]))


def centre_dominance(center: float, borders: Sequence[float]) -> float:
    """(centre − mean border) / (|centre| + |mean border|): 1 = only the centre drives the target,
    0 = centre and borders alike, −1 = only the borders."""
    border = float(np.mean(borders))
    denominator = abs(center) + abs(border)
    return float((center - border) / denominator) if denominator > 0 else 0.0


def recovery(assignment: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Adjusted Rand index, NMI and purity of a clustering against true labels."""
    assignment, truth = np.asarray(assignment), np.asarray(truth)
    purity = sum(np.bincount(np.unique(truth, return_inverse=True)[1][assignment == c]).max()
                 for c in np.unique(assignment)) / len(truth)
    return {"ari": float(adjusted_rand_score(truth, assignment)),
            "nmi": float(normalized_mutual_info_score(truth, assignment)),
            "purity": float(purity)}


def class_rank(logits: np.ndarray, class_index: int) -> np.ndarray:
    """1-based rank of a class in each row of logits."""
    logits = np.asarray(logits)
    return 1 + np.sum(logits > logits[:, [class_index]], axis=1)


# ----------------------------------------------------------------------------- model helpers
def _to_input(model: LoadedModel, images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images as the model's (B, 3, S, S) input in [0, 1], warped to S×S
    (the identity for views already at the input size)."""
    return torch.stack([to_tensor(model.preprocess, Image.fromarray(im), policy="squash")
                        for im in images]).to(model.device)


def optimized_view(image: np.ndarray, size: int) -> np.ndarray:
    """The central size×size crop of a canvas: the view the optimizer drove and `activation`
    was measured on, so codes, fidelity and transfer judge the same pixels (no rescaling)."""
    h, w = image.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[top:top + size, left:left + size]


def codes_and_values(model: LoadedModel, code_ref: LayerRef, targets: Sequence[Target],
                     images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Codes (B, D) and every target's value (B, T) for a [0, 1] batch."""
    bank = TargetBank(targets)
    with capture(model, [*bank.layers, code_ref]) as store, torch.inference_mode():
        model(images)
        return (store[code_ref.key].flatten(1).float().cpu().numpy(),
                bank(store).float().cpu().numpy())


def _centre_and_corners(image: np.ndarray, size: int) -> list[np.ndarray]:
    """The central half-size crop and the four corner crops of equal size, resized to `size`."""
    h, w = image.shape[:2]
    ch, cw = h // 2, w // 2
    boxes = [((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    return [np.asarray(Image.fromarray(image[t:t + ch, left:left + cw]).resize(
        (size, size), Image.Resampling.BICUBIC)) for t, left in boxes]


# ----------------------------------------------------------------------------- the stage
def evaluate_run(run: Run) -> dict:
    """Compute every metric for every target of a rendered run; write RUN/evaluate.json."""
    from mfv.facets import load_facets
    from mfv.scan import ScanResult

    model = run.model
    scan = ScanResult.load(run.dir / "scan")
    code_ref = resolve_layer(model, run.settings.code_layer)
    labels = run.class_labels(scan)
    judges = _judges(run)
    out: dict = {}
    for t_index, (target, slug) in enumerate(zip(run.targets, run.slugs, strict=True)):
        facets = load_facets(run.dir / "facets" / slug)
        rendered_path = run.dir / "targets" / slug / "render.json"
        rendered = read_json(rendered_path) if rendered_path.exists() else {}
        col = scan.target_index(target.spec)
        real = scan.activation_of(col, facets.selected)
        real_max = float(np.nanmax(real))
        centres = np.stack([f.code_centre for f in facets.facets])
        entry: dict = {"facets": {}, "target": {}}
        by_recipe: dict[str, dict[str, list]] = {}
        for name in sorted(rendered):
            stem, recipe = name.split("_", 1)  # render.json holds only the current facets
            image = np.asarray(Image.open(run.dir / "targets" / slug / rendered[name]["path"])
                               .convert("RGB"))  # the whole canvas
            group = by_recipe.setdefault(recipe, {"facet": [], "random": []})
            group["facet" if stem.startswith("facet") else "random"].append((stem, image))
        for recipe, group in by_recipe.items():
            _evaluate_recipe(model, code_ref, target, t_index, recipe, group, facets, centres,
                             real_max, rendered, judges, entry, run)
        if labels is not None:
            truth = labels[facets.selected]
            if len(np.unique(truth[truth >= 0])) >= 2:
                entry["target"]["recovery"] = recovery(facets.assignment, truth)
        entry["target"]["activation_max_real"] = real_max
        out[slug] = entry
    out["_summary"] = _summary(out)
    atomic_write_json(run.dir / "evaluate.json", out)
    return out


def _dominance(model: LoadedModel, code_ref: LayerRef, target: Target, image: np.ndarray
               ) -> float:
    crops = _centre_and_corners(image, model.preprocess.input_size)
    _, values = codes_and_values(model, code_ref, [target], _to_input(model, crops))
    return centre_dominance(values[0, 0], values[1:, 0])


def _judges(run: Run) -> list[LoadedModel]:
    if run.model.classes is None or len(run.model.classes) != 1000:
        return []
    return [load_model(name, device=run.settings.device) for name in run.settings.judges
            if name != run.model.name]


def _evaluate_recipe(model, code_ref, target, t_index, recipe, group, facets, centres, real_max,
                     rendered, judges, entry, run) -> None:
    size = model.preprocess.input_size
    stems = [s for s, _ in group["facet"]]
    views = [optimized_view(im, size) for _, im in group["facet"]]
    if views:
        codes, _ = codes_and_values(model, code_ref, [target], _to_input(model, views))
        ranks = [int(s[5:]) for s in stems]
        ok, margin = fidelity(codes, centres[ranks]) if len(ranks) == len(centres) else (
            np.full(len(ranks), np.nan), np.full(len(ranks), np.nan))
        for i, (stem, image) in enumerate(group["facet"]):
            activation = rendered[f"{stem}_{recipe}"]["activation"]
            metrics = {"activation_ratio": activation_ratio(activation, real_max),
                       "activation_ratio_facet": activation_ratio(
                           activation, facets.facets[ranks[i]].activation_max),
                       "fidelity": None if np.isnan(margin[i]) else bool(ok[i]),
                       "fidelity_margin": None if np.isnan(margin[i]) else float(margin[i]),
                       "centre_dominance": _dominance(model, code_ref, target, image)}
            metrics.update(_transfer(judges, target, views[i]))
            entry["facets"].setdefault(stem, {})[recipe] = metrics
        entry["target"].setdefault("diversity", {})[recipe] = diversity(codes)
    if group["random"]:
        rand_views = [optimized_view(im, size) for _, im in group["random"]]
        rand_codes, _ = codes_and_values(model, code_ref, [target], _to_input(model, rand_views))
        entry["target"].setdefault("diversity_random", {})[recipe] = diversity(rand_codes)
        ratios, doms, transfers = [], [], []
        for (stem, image), view in zip(group["random"], rand_views, strict=True):
            ratios.append(activation_ratio(rendered[f"{stem}_{recipe}"]["activation"], real_max))
            doms.append(_dominance(model, code_ref, target, image))
            transfers.append(_transfer(judges, target, view))
        entry["target"].setdefault("random", {})[recipe] = {
            "activation_ratio": float(np.mean(ratios)), "centre_dominance": float(np.mean(doms)),
            **_mean_transfer(transfers)}


def _transfer(judges: list[LoadedModel], target: Target, image: np.ndarray) -> dict:
    if target.class_index is None or not judges:
        return {}
    ranks = []
    for judge in judges:
        with torch.inference_mode():
            logits = judge(_to_input(judge, [image])).float().cpu().numpy()
        ranks.append(int(class_rank(logits, target.class_index)[0]))
    return {"judge_ranks": ranks, "transfer_top1": float(np.mean([r == 1 for r in ranks])),
            "transfer_top5": float(np.mean([r <= 5 for r in ranks]))}


def _mean_transfer(transfers: list[dict]) -> dict:
    keys = ("transfer_top1", "transfer_top5")
    return {k: float(np.mean([t[k] for t in transfers])) for k in keys
            if transfers and all(k in t for t in transfers)}


def _summary(per_target: dict) -> dict:
    """Means over all facets of all targets, per recipe, for the report's headline."""
    rows: dict[str, dict[str, list]] = {}
    for slug, entry in per_target.items():
        if slug.startswith("_"):
            continue
        for metrics in entry["facets"].values():
            for recipe, m in metrics.items():
                for key, value in m.items():
                    if isinstance(value, (int, float, bool)) and value is not None:
                        rows.setdefault(recipe, {}).setdefault(key, []).append(float(value))
    return {recipe: {k: float(np.nanmean(v)) for k, v in metrics.items()}
            for recipe, metrics in rows.items()}

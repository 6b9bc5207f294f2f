"""Quality metrics as pure functions of arrays, each checkable on cases with a known answer.

- activation ratio: the target on a visualization over its maximum on real images;
- facet fidelity: a visualization's code is nearest its own facet's centre (and by what margin);
- diversity: mean pairwise cosine distance of a target's visualizations' codes;
- centre dominance: the target on the central crop against crops of its corners;
- facet recovery: ARI / NMI / purity of the facets against known sub-type labels;
- class rank: where a class lands when a network classifies a picture (transferability);
- coverage: the share of a target's classes that get a picture classified as them;
- plausibility (MACO's): how close a picture is to real images of its facet in a network's
  feature space;
- path similarity ("Don't trust your eyes", Geirhos et al. 2023): whether a picture takes the
  same activation path through the network's layers as its facet's photos.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


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


def coverage(logits: np.ndarray, classes: Sequence[int]) -> float:
    """Share of `classes` for which some picture (a row of logits) is classified as that class
    among `classes` — the pair rule for a neuron built from several class logits (which of its
    classes does each picture show?); for one class, whether any picture's top-1 is it."""
    logits = np.asarray(logits)
    classes = list(classes)
    if len(classes) == 1:
        return float(np.any(logits.argmax(1) == classes[0]))
    shown = {classes[i] for i in logits[:, classes].argmax(1)}
    return len(shown) / len(classes)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def plausibility(code: np.ndarray, references: np.ndarray, top: int = 5) -> float:
    """Mean cosine similarity of a picture's code to its `top` most similar reference codes
    (real images of its facet, embedded by an independent network): 1 = as close as a near
    duplicate of a real photo. After MACO's plausibility (similarity to the nearest natural
    images of the class in a network's feature space)."""
    sims = _unit(references) @ _unit(code)
    return float(np.sort(sims)[::-1][:top].mean())


def path_similarity(picture: Sequence[np.ndarray], photos: Sequence[np.ndarray]) -> list[float]:
    """Per layer along the network's depth: the cosine similarity of the picture's channel means
    with the mean channel means of its facet's photos. A picture that drives the target through
    other internal features than real images of its facet (Geirhos et al. 2023) scores low in
    the layers where the paths part."""
    return [float(_unit(a) @ _unit(b)) for a, b in zip(picture, photos, strict=True)]

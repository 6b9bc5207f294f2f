"""Stage 4, evaluate: how far to trust one target's facets and pictures, in numbers.

The metrics themselves are pure functions in `mfv.evaluate.metrics`; this module runs the networks
they need. Every picture is judged twice:

- **as seen**: the saved image file, resized and centre-cropped the way the network's own
  preprocessing treats a photo — what a user looking at the file would show the network;
- **central**: the central input-size window of the canvas at its own scale, the pixels the
  optimizer drove and whose activation the renderer recorded (`*_central` keys).

Independent judge networks (not the one that was optimized) classify class-logit pictures and
embed every picture, so coverage, transferability and plausibility cannot be passed by fooling
the optimized network alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mfv.data.images import BadImageError, load_rgb
from mfv.evaluate.metrics import (
    activation_ratio,
    centre_dominance,
    class_rank,
    coverage,
    diversity,
    fidelity,
    path_similarity,
    plausibility,
    recovery,
)
from mfv.facets.find import FacetResult
from mfv.models import LoadedModel, load_model
from mfv.models.activations import TargetBank, capture
from mfv.models.base import to_tensor
from mfv.models.passes import inference, laid_out
from mfv.models.targets import LayerRef, Target, resolve_layer
from mfv.render.anchor import depth_layers
from mfv.render.objective import central_box

PLAUSIBILITY_MEMBERS = 32  # facet members a picture is compared with (a seeded sample)
PATH_LAYERS = 5  # layers along the depth where the activation path is compared
READ_BATCH = 64  # photos per pass when reading facet members


@dataclass(frozen=True)
class Picture:
    """One stored visualization as evaluate sees it."""

    kind: str  # "facet" or "random"
    rank: int
    recipe: str
    activation: float  # recorded by the renderer on the central view
    image: np.ndarray  # (H, W, 3) uint8, the whole canvas


def to_input(model: LoadedModel, images: Sequence[np.ndarray], policy: str = "squash"
             ) -> torch.Tensor:
    """uint8 (H, W, 3) images as the model's (B, 3, S, S) input in [0, 1]: `squash` warps to
    S×S (the identity for views already at the input size), `crop` is a photo's treatment."""
    return torch.stack([to_tensor(model.preprocess, Image.fromarray(im), policy=policy)
                        for im in images]).to(model.device)


def optimized_view(image: np.ndarray, size: int) -> np.ndarray:
    """The central size×size crop of an (H, W, 3) canvas: the view the optimizer drove."""
    rows, cols = central_box(image.shape[0], image.shape[1], size)
    return image[rows, cols]


@dataclass(frozen=True)
class Network:
    """A network evaluate runs, with the layers it reads: its code (penultimate) and the layers
    of its activation path."""

    model: LoadedModel
    code: LayerRef
    path: tuple[LayerRef, ...] = ()

    def read(self, images: torch.Tensor, targets: Sequence[Target] = ()) -> dict[str, np.ndarray]:
        """For a [0, 1] batch: logits (if a classifier), codes, channel means along the path,
        and the targets' values."""
        bank = TargetBank(targets) if targets else None
        logits_ref = LayerRef(self.model.logits_layer) if self.model.logits_layer else None
        layers = [self.code, *self.path, *(bank.layers if bank else []),
                  *([logits_ref] if logits_ref else [])]
        with capture(self.model, layers) as store, inference(self.model) as forward:
            forward(images)
            out = {"code": store[self.code.key].flatten(1).float().cpu().numpy(),
                   "path": [_channel_means(store[ref.key]) for ref in self.path]}
            if logits_ref is not None:
                out["logits"] = store[logits_ref.key].float().cpu().numpy()
            if bank is not None:
                out["values"] = bank(store).float().cpu().numpy()
        return out


def _channel_means(acts: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) or tokens (B, N, C) → (B, C): each channel's mean over positions."""
    acts = acts.float()
    if acts.dim() == 4:
        return acts.mean(dim=(2, 3)).cpu().numpy()
    return (acts.mean(dim=1) if acts.dim() == 3 else acts).cpu().numpy()


def networks(model: LoadedModel, code_ref: LayerRef, judge_names: Sequence[str]
             ) -> tuple[Network, list[Network]]:
    """The optimized network and the independent judges (only for ImageNet-1k classifiers)."""
    own = Network(model, code_ref, tuple(resolve_layer(model, p)
                                         for p in depth_layers(model, PATH_LAYERS)))
    if model.classes is None or len(model.classes) != 1000:
        return own, []
    judges = [load_model(name, device=model.device) for name in judge_names
              if name != model.name]
    return own, [Network(j, resolve_layer(j, "penultimate")) for j in judges]


def _centre_and_corners(image: np.ndarray, size: int) -> list[np.ndarray]:
    """The central half-size crop and the four corner crops of equal size, resized to `size`."""
    h, w = image.shape[:2]
    ch, cw = h // 2, w // 2
    boxes = [((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    return [np.asarray(Image.fromarray(image[t:t + ch, left:left + cw]).resize(
        (size, size), Image.Resampling.BICUBIC)) for t, left in boxes]


def _photos(paths: Sequence[str], net: LoadedModel) -> tuple[torch.Tensor | None, np.ndarray]:
    """Real photos as a network's input (its own photo preprocessing), and the indices of
    `paths` they are: unreadable ones are skipped."""
    tensors, kept = [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(to_tensor(net.preprocess, load_rgb(path)))
        except BadImageError:
            continue
        kept.append(i)
    return (torch.stack(tensors).to(net.device) if tensors else None), np.array(kept, dtype=int)


class _Judgement:
    """What the networks make of a group of pictures, as seen and centrally."""

    def __init__(self, own: Network, judges: Sequence[Network], target: Target,
                 pictures: Sequence[Picture]) -> None:
        size = own.model.preprocess.input_size
        canvases = [p.image for p in pictures]
        central = [optimized_view(im, size) for im in canvases]
        self.seen = own.read(to_input(own.model, canvases, "crop"), [target])
        self.central = own.read(to_input(own.model, central), [target])
        self.judges_seen = [j.read(to_input(j.model, canvases, "crop")) for j in judges]
        self.judges_central = [j.read(to_input(j.model, central)) for j in judges]


def evaluate_target(own: Network, judges: Sequence[Network], target: Target,
                    facets: FacetResult, pictures: Sequence[Picture],
                    members: Sequence[Sequence[str]], real_max: float,
                    truth: np.ndarray | None, seed: int = 0) -> dict:
    """Every metric of one target: per facet and recipe, and for the target as a whole.

    `members[r]` are the paths of facet r's member photos, `real_max` the target's maximum over
    its selected photos, `truth` the true sub-type label of each selected photo (for facet
    recovery), or None.
    """
    with contextlib.ExitStack() as stack:  # every network's weights laid out once, not per read
        for net in (own, *judges):
            stack.enter_context(laid_out(net.model))
        centres = np.stack([f.code_centre for f in facets.facets])
        entry: dict = {"facets": {}, "target": {"activation_max_real": real_max}}
        if truth is not None and len(np.unique(truth[truth >= 0])) >= 2:
            entry["target"]["recovery"] = recovery(facets.assignment, truth)
        reference = _references(own, judges, members, seed)
        for recipe in dict.fromkeys(p.recipe for p in pictures):
            for kind in ("facet", "random"):
                group = sorted((p for p in pictures if p.recipe == recipe and p.kind == kind),
                               key=lambda p: p.rank)
                if group:
                    _evaluate_group(entry, own, judges, target, facets, centres, group, recipe,
                                    kind, real_max, reference)
        return entry


def _references(own: Network, judges: Sequence[Network], members: Sequence[Sequence[str]],
                seed: int) -> list[dict]:
    """Per facet: a seeded sample of its members as the own network and the last judge see
    them (path channel means, judge codes); each network reads every facet's sample in one
    pass."""
    rng = np.random.default_rng(seed)
    chosen = [[paths[i] for i in sorted(rng.choice(len(paths), min(len(paths),
                                                                PLAUSIBILITY_MEMBERS),
                                                   replace=False))] for paths in members]
    out: list[dict] = [{} for _ in members]
    if own.path:
        for ref, read in zip(out, _read_groups(own, chosen), strict=True):
            if read is not None:
                ref["path"] = [p.mean(0) for p in read["path"]]
    if judges:
        for ref, read in zip(out, _read_groups(judges[-1], chosen), strict=True):
            if read is not None:
                ref["judge_codes"] = read["code"]
    return out


def _read_groups(net: Network, groups: Sequence[Sequence[str]]) -> list[dict | None]:
    """`net.read` of several groups of photos in one pass, split back per group (None for a
    group none of whose photos could be read)."""
    photos, owner = _photos([p for group in groups for p in group], net.model)
    if photos is None:
        return [None] * len(groups)
    parts = [net.read(photos[s:s + READ_BATCH]) for s in range(0, len(photos), READ_BATCH)]
    read = {"code": np.concatenate([r["code"] for r in parts]),
            "path": [np.concatenate(layer)
                     for layer in zip(*(r["path"] for r in parts), strict=True)]}
    group_of = np.repeat(np.arange(len(groups)), [len(g) for g in groups])[owner]
    out: list[dict | None] = []
    for g in range(len(groups)):
        rows = np.flatnonzero(group_of == g)
        out.append({"code": read["code"][rows], "path": [p[rows] for p in read["path"]]}
                   if len(rows) else None)
    return out


def _evaluate_group(entry: dict, own: Network, judges: Sequence[Network], target: Target,
                    facets: FacetResult, centres: np.ndarray, group: Sequence[Picture],
                    recipe: str, kind: str, real_max: float, reference: list[dict]) -> None:
    seen = _Judgement(own, judges, target, group)
    per: list[dict] = []
    dominance = _dominance(own, target, [p.image for p in group])
    for i, picture in enumerate(group):
        facet = facets.facets[picture.rank] if picture.rank < len(facets.facets) else None
        m: dict = {}
        for view, data in (("", seen.seen), ("_central", seen.central)):
            value = float(data["values"][i, 0])
            m[f"activation{view}"] = value
            m[f"activation_ratio{view}"] = activation_ratio(value, real_max)
            if facet is not None:
                m[f"activation_ratio_facet{view}"] = activation_ratio(value, facet.activation_max)
        m["centre_dominance"] = dominance[i]
        if kind == "facet" and facet is not None:
            ref = reference[picture.rank]
            if "path" in ref:
                layers = path_similarity([p[i] for p in seen.seen["path"]], ref["path"])
                m["path_similarity"] = float(np.mean(layers))
                m["path_similarity_layers"] = layers
            if "judge_codes" in ref:
                m["plausibility"] = plausibility(seen.judges_seen[-1]["code"][i],
                                                 ref["judge_codes"])
        if target.class_index is not None and judges:
            for view, data in (("", seen.judges_seen), ("_central", seen.judges_central)):
                ranks = [int(class_rank(d["logits"][i:i + 1], target.class_index)[0])
                         for d in data]
                m[f"judge_ranks{view}"] = ranks
                m[f"transfer_top1{view}"] = float(np.mean([r == 1 for r in ranks]))
                m[f"transfer_top5{view}"] = float(np.mean([r <= 5 for r in ranks]))
        per.append(m)
    if kind == "facet" and [p.rank for p in group] == list(range(len(centres))):
        for view, data in (("", seen.seen), ("_central", seen.central)):
            ok, margin = fidelity(data["code"], centres)
            for m, o, g in zip(per, ok, margin, strict=True):
                m[f"fidelity{view}"] = None if np.isnan(g) else bool(o)
                m[f"fidelity_margin{view}"] = None if np.isnan(g) else float(g)
    if kind == "facet":
        for picture, m in zip(group, per, strict=True):
            entry["facets"].setdefault(f"facet{picture.rank:02d}", {})[recipe] = m
    stats = _means(per) if kind == "random" else {}
    stats["diversity"] = diversity(seen.seen["code"])
    stats["diversity_central"] = diversity(seen.central["code"])
    if target.classes:
        nets = [(own.model.name, seen.seen.get("logits"))] + [
            (j.model.name, d.get("logits")) for j, d in zip(judges, seen.judges_seen, strict=True)]
        stats["coverage"] = {name: coverage(logits, target.classes) for name, logits in nets
                             if logits is not None}
    entry["target"].setdefault(kind, {})[recipe] = stats


def _means(per: Sequence[dict]) -> dict:
    """Means of the numeric metrics of several pictures (random starts)."""
    keys = [k for k in per[0] if isinstance(per[0][k], (int, float)) and
            not isinstance(per[0][k], bool)]
    return {k: float(np.mean([m[k] for m in per if m.get(k) is not None])) for k in keys}


def _dominance(own: Network, target: Target, images: Sequence[np.ndarray]) -> list[float]:
    """Centre dominance of each image (its centre crop against its four corners), in one pass."""
    size = own.model.preprocess.input_size
    crops = [crop for image in images for crop in _centre_and_corners(image, size)]
    values = own.read(to_input(own.model, crops), [target])["values"][:, 0].reshape(-1, 5)
    return [centre_dominance(v[0], v[1:]) for v in values]


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

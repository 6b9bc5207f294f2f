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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mfv.evaluate import mis
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
from mfv.evaluate.observer import Observer
from mfv.facets.find import FacetResult
from mfv.facets.patches import load_crops
from mfv.models import LoadedModel, load_model
from mfv.models.activations import TargetBank, capture
from mfv.models.base import to_tensor
from mfv.models.passes import inference, laid_out
from mfv.models.read import channel_means, read_photos
from mfv.models.targets import LayerRef, Target, resolve_layer
from mfv.render.anchor import depth_layers
from mfv.render.objective import central_box, unit_view
from mfv.results.metrics import means
from mfv.scan.result import ScanResult

PLAUSIBILITY_MEMBERS = 32  # facet members a picture is compared with (a seeded sample)
PATH_LAYERS = 5  # layers along the depth where the activation path is compared
READ_BATCH = 16  # images per pass when reading facet members and crops (a judge's pass at 64
# images was the demo's peak memory; docs/benchmarks.md)


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
        with capture(self.model, layers, stop=True) as store, \
                inference(self.model) as forward:
            forward(images)
            out = {"code": store[self.code.key].flatten(1).float().cpu().numpy(),
                   "path": [channel_means(store[ref.key].float()).cpu().numpy()
                            for ref in self.path]}
            if logits_ref is not None:
                out["logits"] = store[logits_ref.key].float().cpu().numpy()
            if bank is not None:
                out["values"] = bank(store).float().cpu().numpy()
        return out


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


class _Judgement:
    """What the networks make of a group of pictures, as seen and centrally."""

    def __init__(self, own: Network, judges: Sequence[Network], target: Target,
                 pictures: Sequence[Picture], view: int | None = None) -> None:
        size = own.model.preprocess.input_size
        canvases = [p.image for p in pictures]
        central = [optimized_view(im, size) for im in canvases]
        seen, middle = to_input(own.model, canvases, "crop"), to_input(own.model, central)
        self.seen = own.read(seen, [target])
        self.central = own.read(middle, [target])
        if view is not None:  # the target reads the pictures as the unit saw its crops
            for data, x in ((self.seen, seen), (self.central, middle)):
                scaled = unit_view(x * 255, [view] * len(x), size) / 255
                data["values"] = own.read(scaled, [target])["values"]
        self.judges_seen = [j.read(to_input(j.model, canvases, "crop")) for j in judges]
        self.judges_central = [j.read(to_input(j.model, central)) for j in judges]


@dataclass(frozen=True)
class Case:
    """One target as evaluate judges it: its facets and pictures, each facet's member photos
    (`members[r]`: paths), the target's maximum over its selected photos (`real_max`), and the
    true sub-type label of each selected photo (`truth`, for facet recovery) or None."""

    target: Target
    facets: FacetResult
    pictures: Sequence[Picture]
    members: Sequence[Sequence[str]]
    real_max: float
    truth: np.ndarray | None = None
    ranking: np.ndarray | None = None  # for MIS: photo indices, most activating first
    photos: Sequence[str] = ()  # the scan's photos `ranking` indexes
    shunned: Sequence[Picture] = ()  # the pictures of the target's negation (--negative)
    # patch facets: each facet's members' crops (`members[r][j]`'s box), and the side the
    # unit reads pictures at (`mfv.render.objective.unit_view`; None: as they are)
    boxes: Sequence[Sequence[tuple[int, int, int, int]]] | None = None
    view: int | None = None


def mis_ranking(scan: ScanResult, spec: str, negation: str | None = None) -> np.ndarray:
    """The scan's valid photos by the target's activation, most activating first: all of
    them from a full scan; from a top-N scan its top, then (when the negation was scanned)
    the negation's top — the target's least activating photos — reversed, at the end."""
    t = scan.target_index(spec)
    if scan.activations is not None:
        return mis.ranked(scan.activations_of(t))
    top = scan.top(t, len(scan.paths))[0]
    if negation is None or negation not in scan.targets:
        return top
    bottom = scan.top(scan.target_index(negation), len(scan.paths))[0]
    bottom = bottom[~np.isin(bottom, top)]
    return np.concatenate([top, bottom[::-1]]).astype(np.int64)


def evaluate_target(own: Network, judges: Sequence[Network], case: Case, seed: int = 0,
                    observer: Observer | None = None) -> dict:
    """Every metric of one target: per facet and recipe, and for the target as a whole (with
    an observer and a ranking, its MIS)."""
    with contextlib.ExitStack() as stack:  # every network's weights laid out once, not per read
        for net in (own, *judges):
            stack.enter_context(laid_out(net.model))
        entry: dict = {"facets": {}, "target": {"activation_max_real": case.real_max}}
        truth = case.truth
        if truth is not None and len(np.unique(truth[truth >= 0])) >= 2:
            entry["target"]["recovery"] = recovery(case.facets.assignment, truth)
        reference = _references(own, judges, case.members, seed, case.boxes,
                                _shared_photos(judges, observer))
        for recipe in dict.fromkeys(p.recipe for p in case.pictures):
            for kind in ("facet", "random"):
                group = sorted((p for p in case.pictures if p.recipe == recipe and p.kind == kind),
                               key=lambda p: p.rank)
                if group:
                    _evaluate_group(entry, own, judges, case, group, reference)
        if observer is not None and case.ranking is not None:  # a typed part, no table metric
            entry["target"].update(mis=unit_mis(observer, case))  # (results.model.MisResult)
        return entry


def unit_mis(observer: Observer, case: Case) -> dict:
    """The MIS task for one target (`mfv.evaluate.mis`) with every reference set: the natural
    exemplars, and per recipe its facet pictures and its random starts (the negative side:
    the negation's pictures of the same kind when the run made them, else the natural
    negative references). Queries are the 20 most and 20 least activating photos."""
    order = np.asarray(case.ranking)
    k = mis.fitting_references(len(order))
    out: dict = {"observer": observer.label, "alpha": mis.ALPHA, "trials": mis.N_TRIALS,
                 "references": k}
    if k < 1:
        out["skipped"] = mis.too_few(len(order))
        return out
    natural = mis.natural_trials(order, mis.N_TRIALS, k)
    used = natural.images()
    row = np.full(len(case.photos), -1, np.int64)
    row[used] = np.arange(len(used))
    natural = mis.Trials(row[natural.query_pos], row[natural.query_neg],
                         row[natural.refs_pos], row[natural.refs_neg])
    pictures = [*case.pictures, *case.shunned]
    table = observer.photos([case.photos[i] for i in used])
    if pictures:
        table = np.vstack([table, observer.pictures([p.image for p in pictures])])
    where = {id(p): len(used) + i for i, p in enumerate(pictures)}
    out["natural"] = {**mis.evaluate(table, natural), "references": k}
    for kind in ("facet", "random"):
        for recipe in dict.fromkeys(p.recipe for p in case.pictures if p.kind == kind):
            def rows(group: Sequence[Picture], kind: str = kind, recipe: str = recipe
                     ) -> np.ndarray:
                return np.array([where[id(p)] for p in group
                                 if p.kind == kind and p.recipe == recipe], np.int64)
            pos, neg = rows(case.pictures), rows(case.shunned)
            trials = mis.with_references(natural, pos, neg if len(neg) else None)
            out.setdefault(kind, {})[recipe] = {
                **mis.evaluate(table, trials), "references": int(len(pos)),
                "negative": "pictures" if len(neg) else "photos"}
    first = next(iter(out.get("facet", {})), None)
    out["verdict"] = mis.verdict(
        out["natural"]["mis"], out["facet"][first]["mis"] if first else None,
        (out.get("random", {}).get(first) or {}).get("mis"), first or "")
    return out


def _shared_photos(judges: Sequence[Network], observer: Observer | None
                   ) -> Callable[[Sequence[str]], np.ndarray] | None:
    """The observer's photo embeddings when they are the last judge's codes (the same network
    and layer, as by default: Lite2's penultimate), so that a photo both need is read once."""
    if observer is None or not judges:
        return None
    judge = judges[-1]
    return observer.photos if (observer.model is judge.model
                               and observer.layer == judge.code) else None


def _references(own: Network, judges: Sequence[Network], members: Sequence[Sequence[str]],
                seed: int, boxes: Sequence[Sequence[tuple[int, int, int, int]]] | None = None,
                judge_photos: Callable[[Sequence[str]], np.ndarray] | None = None
                ) -> list[dict]:
    """Per facet: a seeded sample of its members as the own network and the last judge see
    them (path channel means, judge codes): the photos, or for patch facets (`boxes`) their
    crops, as the facets were made of them; each network reads every facet's sample in one
    pass (`mfv.models.read`), or the judge's codes of photos come from `judge_photos` (rows of
    NaN for photos it could not read: `Observer.photos`)."""
    rng = np.random.default_rng(seed)
    picks = [sorted(rng.choice(len(paths), min(len(paths), PLAUSIBILITY_MEMBERS),
                               replace=False)) for paths in members]
    chosen = [[paths[i] for i in rows] for paths, rows in zip(members, picks, strict=True)]
    paths = [p for group in chosen for p in group]
    group_of = np.repeat(np.arange(len(chosen)), [len(g) for g in chosen])
    out: list[dict] = [{} for _ in members]
    if boxes is not None:  # patch facets: their crops, as the facets saw them
        crops = load_crops(own.model, paths, np.arange(len(paths)), np.array(
            [boxes[g][i] for g, rows in enumerate(picks) for i in rows]).reshape(-1, 4))
        if own.path:
            path = _read_all(own, crops, "path")
            for ref, rows in _by_group(out, group_of):
                ref["path"] = [layer[rows].mean(0) for layer in path]
        if judges:
            codes = _read_all(judges[-1], crops, "code")
            for ref, rows in _by_group(out, group_of):
                ref["judge_codes"] = codes[rows]
        return out
    if own.path:
        read = read_photos(own.model, paths, own.path, channel_means, batch_size=READ_BATCH)
        for ref, rows in _by_group(out, group_of[read.kept]):
            ref["path"] = [layer[rows].mean(0) for layer in read.outputs]
    if judges and judge_photos is not None:
        codes = judge_photos(paths)
        kept = np.flatnonzero(~np.isnan(codes).any(axis=1) & (codes.shape[1] > 0))
        for ref, rows in _by_group(out, group_of[kept]):
            ref["judge_codes"] = codes[kept][rows]
    elif judges:
        read = read_photos(judges[-1].model, paths, [judges[-1].code], batch_size=READ_BATCH)
        for ref, rows in _by_group(out, group_of[read.kept]):
            ref["judge_codes"] = read.outputs[0][rows]
    return out


def _read_all(net: Network, images: Sequence[np.ndarray], what: str,
              targets: Sequence[Target] = ()) -> np.ndarray | list[np.ndarray]:
    """`net`'s codes (`what="code"`), the targets' values ("values") or path channel means
    ("path", one array per layer) of (S, S, 3) uint8 images, read `READ_BATCH` at a time."""
    parts = [net.read(to_input(net.model, list(images[i:i + READ_BATCH])), targets)[what]
             for i in range(0, len(images), READ_BATCH)]
    if what != "path":
        return np.concatenate(parts)
    return [np.concatenate([part[j] for part in parts]) for j in range(len(net.path))]


def _by_group(out: list[dict], owner: np.ndarray) -> Iterator[tuple[dict, np.ndarray]]:
    """Each group's entry and its rows of a reading (groups none of whose photos could be read
    are left out)."""
    for g, entry in enumerate(out):
        rows = np.flatnonzero(owner == g)
        if len(rows):
            yield entry, rows


def _evaluate_group(entry: dict, own: Network, judges: Sequence[Network], case: Case,
                    group: Sequence[Picture], reference: list[dict]) -> None:
    """The metrics of one recipe's pictures of one kind (facet or random starts)."""
    target, facets, recipe, kind = case.target, case.facets, group[0].recipe, group[0].kind
    centres = np.stack([f.code_centre for f in facets.facets])
    seen = _Judgement(own, judges, target, group, case.view)
    per: list[dict] = []
    dominance = _dominance(own, target, [p.image for p in group])
    for i, picture in enumerate(group):
        facet = facets.facets[picture.rank] if picture.rank < len(facets.facets) else None
        m: dict = {}
        for view, data in (("", seen.seen), ("_central", seen.central)):
            value = float(data["values"][i, 0])
            m[f"activation{view}"] = value
            m[f"activation_ratio{view}"] = activation_ratio(value, case.real_max)
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
    stats = means(per) if kind == "random" else {}
    stats["diversity"] = diversity(seen.seen["code"])
    stats["diversity_central"] = diversity(seen.central["code"])
    if target.classes:
        nets = [(own.model.name, seen.seen.get("logits"))] + [
            (j.model.name, d.get("logits")) for j, d in zip(judges, seen.judges_seen, strict=True)]
        stats["coverage"] = {name: coverage(logits, target.classes) for name, logits in nets
                             if logits is not None}
    entry["target"].setdefault(kind, {})[recipe] = stats


def _dominance(own: Network, target: Target, images: Sequence[np.ndarray]) -> list[float]:
    """Centre dominance of each image (its centre crop against its four corners)."""
    size = own.model.preprocess.input_size
    crops = [crop for image in images for crop in _centre_and_corners(image, size)]
    values = _read_all(own, crops, "values", [target])[:, 0].reshape(-1, 5)
    return [centre_dominance(v[0], v[1:]) for v in values]


def summary(per_target: dict[str, dict]) -> dict:
    """Per recipe, every scalar metric averaged over all facets of all targets (by its rule in
    `mfv.results.metrics`), for the report's headline."""
    pictures: dict[str, list[dict]] = {}
    for entry in per_target.values():
        for metrics in entry["facets"].values():
            for recipe, m in metrics.items():
                pictures.setdefault(recipe, []).append(m)
    return {recipe: means(group) for recipe, group in pictures.items()}

"""Constructed hidden units (issue 22): do facets of the patch a unit sees recover its kind?

Usage: python benchmarks/constructed_units.py [--photos 80] [--natural 200] [--top-n 60]
       [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14] [--units 1] [--crop-scales 1]
       [--crop-px 64 96] [--lite2] [--seed 0] [--out benchmarks/results/constructed-units.md]

Two textures (grass, masonry) are cut from real photos by a fixed rule (`texture_crops`) and
pasted (64-128 px, random place and flip) on photos of other Imagenette classes. Per block of
EfficientNet-Lite0, two texture units, chosen on selection composites: `a + w*b` with a, b the
channels most selective for patches of A (resp. B) (`patch_selectivity`), and the same with a
linear probe's direction per texture (`probe`); w equalises the halves' 90th percentiles. On a
fresh pool (new composites, backgrounds and crops, plus plain photos) a unit's top-N images by
the max of its combined map are clustered (k = 2) with several codes: the whole photo's Lite0
penultimate code (mfv today), the Lite0 (--lite2: and Lite2) penultimate code of the square
crop around the peak (sides: multiples of the layer's effective receptive field, or fixed
pixels), and the layer's channel vector at the peak; ARI against the pasted texture. Natural
units: two channels with nearly disjoint top images on one photo pool, evaluated on another;
truth = the larger scaled channel max (fuzzy: reported). Control: "_fc:A + _fc:B" over photos
of A and B with whole-photo codes. Writes a markdown report.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score

from mfv.core.io import atomic_write_text
from mfv.data.images import load_rgb
from mfv.data.preprocess import Preprocess
from mfv.facets.cluster import Embedding, cluster
from mfv.models.activations import capture
from mfv.models.loading import load_model
from mfv.models.receptive import theoretical_rf
from mfv.models.targets import LayerRef

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MFV_SHARED_DATA", ROOT.parent / "shared" / "data"))
SIZE = 224  # Imagenette photos are 224 x 224; Lite0's input size
PENULT = LayerRef("_fc", use_input=True)
# Texture sources: (name, Imagenette folder, colour rule on a crop's mean r, g, b). The folders
# are kept out of every background and pool, so composites are on unrelated photos.
TEXTURES = (("grass", "n03445777", lambda r, g, b: (g - r > 0.03) & (g - b > 0.08)),
            ("masonry", "n03028079", lambda r, g, b: (r - g > 0.04) & (r - b > 0.12)))
CONTROL = (("n01440764", "n03888257", 0, 701), ("n03028079", "n03445777", 497, 574))


def load_images(paths: list[Path]) -> torch.Tensor:
    """Photos as a (N, 3, 224, 224) [0, 1] batch (squashed; Imagenette is already 224 px)."""
    pre = Preprocess(input_size=SIZE)
    return torch.from_numpy(np.stack([pre.to_array(load_rgb(p), "squash") for p in paths]))


def texture_crops(images: torch.Tensor, rule, side: int, count: int) -> torch.Tensor:
    """The texture rule: every side x side crop on a grid (stride side/4) that is homogeneous
    (mean over RGB of the std of its 4 x 4 sub-block means < 0.08) and passes the colour `rule`
    on its mean (r, g, b), ranked by detail (mean |Laplacian| of grey); the best crop of each
    photo, the `count` best photos."""
    step = side // 4
    means = F.avg_pool2d(images, side, step)  # (N, 3, gh, gw)
    sub = F.avg_pool2d(images, step, step).unfold(2, 4, 1).unfold(3, 4, 1)
    even = sub.flatten(-2).std(-1).mean(1) < 0.08
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    detail = F.avg_pool2d(F.conv2d(images.mean(1, keepdim=True), lap, padding=1).abs(), side, step)
    score = torch.where(even & rule(*means.unbind(1)), detail[:, 0], -1.0).flatten(1)
    best, cell = score.max(1)
    photos = [int(i) for i in torch.argsort(best, descending=True)[:count] if best[i] > 0]
    gw = means.shape[-1]
    return torch.stack([images[i, :, (int(cell[i]) // gw) * step:][:, :side,
                               (int(cell[i]) % gw) * step:][:, :, :side] for i in photos])


def paste(backgrounds: torch.Tensor, crops: torch.Tensor, rng: np.random.Generator, lo: int,
          hi: int, distinct: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Composites: a random crop (randomly flipped), resized to s in [lo, hi], pasted at a random
    place of each background; with `distinct`, every background gets a crop of its own (needs
    as many crops). Returns the images and the boxes (top, left, side)."""
    if distinct and len(crops) < len(backgrounds):
        raise ValueError(f"{len(crops)} texture crops for {len(backgrounds)} distinct pastes")
    order = rng.permutation(len(crops)) if distinct else None
    out, boxes = backgrounds.clone(), []
    for i in range(len(out)):
        s = int(rng.integers(lo, hi + 1))
        top, left = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))
        crop = crops[int(order[i]) if distinct else int(rng.integers(len(crops)))]
        crop = crop.flip(-1) if rng.random() < 0.5 else crop
        patch = F.interpolate(crop[None], size=(s, s), mode="bilinear", antialias=True)[0]
        out[i, :, top:top + s, left:left + s] = patch.clamp(0, 1)
        boxes.append((top, left, s))
    return out, np.array(boxes)


@torch.inference_mode()
def forward(model, images: torch.Tensor, refs: list[LayerRef], batch: int
            ) -> dict[str, torch.Tensor]:
    """The given layers' activations for every image, on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {r.key: [] for r in refs}
    with capture(model, refs) as store:
        for i in range(0, len(images), batch):
            model(images[i:i + batch].to(model.device))
            for r in refs:
                parts[r.key].append(store[r.key].float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def effective_rf(model, ref: LayerRef, images: torch.Tensor, masses: tuple[float, ...]
                 ) -> list[int]:
    """Sides of the centred squares holding each of `masses` of |d(sum of the layer's channels
    at the centre position)/d input| (summed over RGB, averaged over the images): the effective
    receptive field of Luo et al. 2016."""
    x = images.clone().to(model.device).requires_grad_(True)
    with capture(model, [ref]) as store:
        model(x)
        act = store[ref.key]
        h, w = act.shape[-2:]
        act[:, :, h // 2, w // 2].sum().backward()
    g = x.grad.abs().sum(1).mean(0).cpu()
    cy, cx = (h // 2 + 0.5) * SIZE / h, (w // 2 + 0.5) * SIZE / w
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dist = torch.maximum((yy - cy).abs(), (xx - cx).abs()).flatten()
    order = torch.argsort(dist)
    cum = torch.cumsum(g.flatten()[order], 0)
    idx = torch.searchsorted(cum, torch.tensor(masses, dtype=cum.dtype) * cum[-1])
    return [int(min(2 * float(dist[order][int(i)]), SIZE)) for i in idx]


def in_box(boxes: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) mask of the feature-map cells whose centre lies in each image's pasted box
    (top, left, side); all False for a photo without one (side -1)."""
    cy = (torch.arange(grid[0]) + 0.5) * SIZE / grid[0]
    cx = (torch.arange(grid[1]) + 0.5) * SIZE / grid[1]
    t, left, s = (torch.as_tensor(boxes[:, i], dtype=torch.float32)[:, None] for i in range(3))
    rows = (cy[None] >= t) & (cy[None] < t + s)
    cols = (cx[None] >= left) & (cx[None] < left + s)
    return rows[:, :, None] & cols[:, None, :]


def patch_selectivity(maps: torch.Tensor, mask: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per channel, d' of its max inside the pasted patch of the `own` composites against its
    max on every other image (whole) and outside the patch on its own: high when the channel
    fires on the texture itself, more than on anything else in the photos."""
    inside = maps.masked_fill(~mask[:, None], -torch.inf).amax((2, 3))
    outside = maps.masked_fill(mask[:, None], -torch.inf).amax((2, 3))
    return dprime(inside[own], torch.cat([outside[own], maps[~own].amax((2, 3))]))


def dprime(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-channel separation of two sets of values: mean difference over pooled std."""
    return (pos.mean(0) - neg.mean(0)) / ((pos.var(0) + neg.var(0)) / 2 + 1e-8).sqrt()


def crop_boxes(peaks: torch.Tensor, grid: tuple[int, int], side: int) -> np.ndarray:
    """Boxes (top, left, side) of `side` px centred on feature-map positions `peaks` (row, col)
    of a grid, shifted to stay inside the photo: what the unit saw at its peak."""
    centre = (peaks.numpy() + 0.5) * SIZE / np.asarray(grid)
    corner = np.clip(np.round(centre - side / 2), 0, SIZE - side).astype(int)
    return np.column_stack([corner, np.full(len(corner), side)])


def crops_at(images: torch.Tensor, boxes: np.ndarray, out: int) -> torch.Tensor:
    """The boxes' pixels, resized to out x out."""
    side = int(boxes[0, 2])
    crops = torch.stack([img[:, t:t + side, le:le + side]
                         for img, (t, le, _) in zip(images, boxes.tolist(), strict=True)])
    return F.interpolate(crops, size=(out, out), mode="bilinear", antialias=side > out)


def probe(maps: torch.Tensor, positive: torch.Tensor, rng: np.random.Generator,
          n: int = 20000, background: torch.Tensor | None = None, rounds: int = 0,
          per_image: int = 4) -> tuple[torch.Tensor, float]:
    """A linear probe: logistic regression of 'this cell lies in a pasted patch of the texture'
    on the layer's channel vector there (balanced subsample of cells). Its weights and bias, in
    the layer's own units, are a direction unit (Lucent's `direction` objective).

    With `rounds` > 0 it is refitted that many times with hard negatives, for a unit read at
    its map's maximum: each round adds, per selection image, its `per_image` best-scoring cells
    of `background` ((N, H, W): outside every pasted patch) to the negatives. A plain probe
    ranks cells well on average, but an image's maximum is its one best cell, so a few
    background cells that score high decide where the unit peaks."""
    x = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).numpy()
    y = positive.reshape(-1).numpy()
    take = np.concatenate([rng.choice(np.flatnonzero(y == v), min(n // 2, int((y == v).sum())),
                                      replace=False) for v in (True, False)])
    mu, sd = x[take].mean(0), x[take].std(0) + 1e-6
    hard = np.zeros(0, np.int64)
    for _ in range(rounds + 1):
        lr = LogisticRegression(max_iter=1000).fit((x[np.r_[take, hard]] - mu) / sd,
                                                   y[np.r_[take, hard]])
        if background is None:
            break
        cells = background[0].numel()
        score = np.where(background.reshape(len(maps), cells).numpy(),
                         (((x - mu) / sd) @ lr.coef_[0]).reshape(len(maps), cells), -np.inf)
        best = np.argsort(-score, axis=1)[:, :per_image]
        found = (best + np.arange(len(maps))[:, None] * cells).ravel()
        hard = np.union1d(hard, found[np.isfinite(score.ravel()[found])])
    w = lr.coef_[0] / sd
    return torch.as_tensor(w, dtype=torch.float32), float(lr.intercept_[0] - (mu * w).sum())


def unit_map(maps: torch.Tensor, vec: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
    """A unit's map over the layer's grid: a direction (one-hot for a channel) plus a bias."""
    return torch.einsum("nchw,c->nhw", maps, vec) + bias


def onehot(c: int, n: int) -> torch.Tensor:
    return torch.zeros(n).index_fill_(0, torch.tensor([c]), 1.0)


def aris(codes: np.ndarray, truth: np.ndarray, subsets: list[np.ndarray], seed: int,
         seeds: int) -> list[tuple[float, float]]:
    """ARI (k=2) on each subset of PCA->t-SNE->k-means (mean over `seeds` t-SNE seeds) and of
    PCA->k-means (the 50-D PCA codes), clustering all the codes once per seed."""
    def labels(kind: str, s: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cluster(codes, 2, Embedding(kind, 30.0, 50, None, s, 1), (2, 10), "u").labels
    tsne = [labels("tsne", seed + i) for i in range(seeds)]
    pca = labels("pca", seed)

    def ari(lab: np.ndarray, m: np.ndarray) -> float:
        ok = m.sum() >= 4 and len(set(truth[m])) == 2
        return adjusted_rand_score(truth[m], lab[m]) if ok else float("nan")
    return [(float(np.mean([ari(t, m) for t in tsne])), ari(pca, m)) for m in subsets]


def top_and_peaks(comb: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n images where the unit's map peaks highest, and the (row, col) of each peak."""
    vals, arg = comb.flatten(1).max(1)
    top = torch.argsort(vals, descending=True)[:n]
    return top, torch.stack([arg[top] // comb.shape[2], arg[top] % comb.shape[2]], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=80, help="photos per texture group")
    ap.add_argument("--natural", type=int, default=200, help="photos per natural-unit pool")
    ap.add_argument("--texture-photos", type=int, default=300, help="photos to cut textures")
    ap.add_argument("--texture-count", type=int, default=24, help="crops per texture")
    ap.add_argument("--top-n", type=int, default=60)
    ap.add_argument("--blocks", nargs="+", default=["_blocks.2", "_blocks.5", "_blocks.10",
                                                    "_blocks.14"])
    ap.add_argument("--units", type=int, default=1, help="units per block and kind")
    ap.add_argument("--crop-scales", type=float, nargs="*", default=[1.0],
                    help="crop sides as multiples of the ERF size")
    ap.add_argument("--crop-px", type=int, nargs="*", default=[64, 96],
                    help="crop sides in pixels, whatever the layer")
    ap.add_argument("--lite2", action="store_true", help="also code crops with Lite2")
    ap.add_argument("--control", type=int, default=40, help="photos per class, logit control")
    ap.add_argument("--erf-images", type=int, default=8)
    ap.add_argument("--erf-mass", type=float, default=0.9)
    ap.add_argument("--tsne-seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA / "imagenette-train")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/constructed-units.md")
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    paths = sorted(args.data.glob("*/*.JPEG"))
    paths = [paths[i] for i in rng.permutation(len(paths))]
    tex = {name: [p for p in paths if p.parent.name == folder][:args.texture_photos]
           for name, folder, _ in TEXTURES}
    crops = {name: texture_crops(load_images(tex[name]), rule, 96, 2 * args.texture_count)
             for name, _, rule in TEXTURES}
    kinds = list(crops)
    others = [p for p in paths if p.parent.name not in {f for _, f, _ in TEXTURES}]
    counts = np.cumsum([0] + [args.photos] * 6 + [args.natural] * 2)
    groups = [others[i:j] for i, j in zip(counts[:-1], counts[1:], strict=True)]
    used = {p for g in [*groups, *tex.values()] for p in g}
    rest = [p for p in paths if p not in used]  # for the class-logit control

    def texture_set(a_paths, b_paths, plain, crop_half):
        """Composites of texture A and B on the given photos, plus plain photos: the images,
        each image's kind (0, 1, -1 for plain) and its box (top, left, side)."""
        (ca, ba), (cb, bb) = (paste(load_images(ps), crops[k][crop_half::2], rng, 64, 128)
                              for ps, k in ((a_paths, kinds[0]), (b_paths, kinds[1])))
        kind = np.repeat([0, 1, -1], [len(a_paths), len(b_paths), len(plain)])
        return (torch.cat([ca, cb, load_images(plain)]), kind,
                np.concatenate([ba, bb, -np.ones((len(plain), 3), int)]))
    sel, sel_kind, sel_boxes = texture_set(*groups[0:3], 0)
    pool, truth, boxes = texture_set(*groups[3:6], 1)
    nat_pick, nat_pool = load_images(groups[6]), load_images(groups[7])
    model = load_model("efficientnet_lite0")
    lite2 = load_model("efficientnet_lite2") if args.lite2 else None
    refs = [LayerRef(b) for b in args.blocks] + [PENULT]
    sel_acts = forward(model, sel, refs[:-1], args.batch)
    pool_acts = forward(model, pool, refs, args.batch)
    pick_acts = forward(model, nat_pick, refs[:-1], args.batch)
    nat_acts = forward(model, nat_pool, refs, args.batch)

    def codes_of(images, acts, block, comb, erf):
        """The unit's top images, their peaks, and every code of them."""
        top, peaks = top_and_peaks(comb, args.top_n)
        grid = comb.shape[1:]
        codes = {"image": acts[PENULT.key][top].numpy()}
        sizes = [(f"x{s:g}", s * erf) for s in args.crop_scales]
        for label, side in sizes + [(f"{px}px", px) for px in args.crop_px]:
            side = max(16, min(SIZE, round(side)))
            coders = [("crop", model)] + ([("lite2 crop", lite2)] if lite2 else [])
            for name, m in coders:
                c = crops_at(images[top], crop_boxes(peaks, grid, side), m.preprocess.input_size)
                codes[f"{name} {label}"] = forward(m, c, [PENULT], args.batch)[
                    PENULT.key].numpy()
        maps = acts[block][top]
        vec = maps[torch.arange(len(top)), :, peaks[:, 0], peaks[:, 1]]
        codes["layer at peak"] = F.normalize(vec, dim=1).numpy()
        cells = in_box(crop_boxes(peaks, grid, 64), grid)[:, None]  # the 64 px around the peak
        pooled = (maps * cells).sum((2, 3)) / cells.sum((2, 3)).clamp(min=1)
        codes["layer mean 64px"] = F.normalize(pooled, dim=1).numpy()
        return top, peaks, codes

    rows, rf_rows, controls = [], [], []
    for block in args.blocks:
        erf50, erf = effective_rf(model, LayerRef(block), nat_pick[:args.erf_images],
                                  (0.5, args.erf_mass))
        grid = tuple(pool_acts[block].shape[-2:])
        rf_rows.append((block, grid, *theoretical_rf(model.module, block)[::-1], erf50, erf))
        maps, n_ch = sel_acts[block], sel_acts[block].shape[1]
        mask = in_box(sel_boxes, grid)
        own = [torch.as_tensor(sel_kind == k) for k in (0, 1)]
        order = [torch.argsort(patch_selectivity(maps, mask, o), descending=True).tolist()
                 for o in own]
        halves = {"texture channels": [], "texture direction": []}
        for r in range(args.units):
            a = order[0][r]
            halves["texture channels"].append(
                ((onehot(a, n_ch), 0.0), (onehot([c for c in order[1] if c != a][r], n_ch), 0.0)))
        halves["texture direction"] = [tuple(probe(maps, mask & o[:, None, None], rng)
                                             for o in own)]
        for kind, units in halves.items():
            for (va, ba), (vb, bb) in units:
                qa = unit_map(maps[own[0]], va, ba).amax((1, 2)).quantile(0.9)
                qb = unit_map(maps[own[1]], vb, bb).amax((1, 2)).quantile(0.9)
                w = float(qa / qb) if qa > 0 and qb > 0 else 1.0
                comb = unit_map(pool_acts[block], va + w * vb, ba + w * bb)
                top, peaks, codes = codes_of(pool, pool_acts, block, comb, erf)
                t = truth[top.numpy()]
                hit = in_box(boxes[top.numpy()], grid)[torch.arange(len(top)), peaks[:, 0],
                                                      peaks[:, 1]].numpy()
                name = (f"{int(va.argmax())}+{w:.2f}*{int(vb.argmax())}"
                        if kind.endswith("channels") else f"probe A + {w:.2f}*probe B")
                rows.append((block, kind, name, {
                    "n": len(top), "known": int((t >= 0).sum()), "seen": int(hit.sum()),
                    "split": f"{(t == 0).sum()}/{(t == 1).sum()}",
                    "extra": f"{hit[t >= 0].mean():.2f}" if (t >= 0).any() else "n/a",
                    "ari": {k: aris(v, t, [t >= 0, hit], args.seed, args.tsne_seeds)
                            for k, v in codes.items()}}))
        pick = pick_acts[block].amax((2, 3))
        live = [c for c in range(pick.shape[1]) if pick[:, c].max() > 0]
        tops = {c: set(torch.argsort(pick[:, c], descending=True)[:args.top_n].tolist())
                for c in live}
        corr = np.corrcoef(pick.T.numpy())
        for a in rng.choice(live, size=min(args.units, len(live)), replace=False).tolist():
            b = min((c for c in live if c != a),
                    key=lambda c, a=a: (len(tops[a] & tops[c]), corr[a, c]))
            ta, tb = (pick[:, c].sort(descending=True)[0][:args.top_n].mean() for c in (a, b))
            w = float(ta / tb)
            nmaps = nat_acts[block]
            comb = unit_map(nmaps, onehot(a, n_ch) + w * onehot(b, n_ch))
            top, _, codes = codes_of(nat_pool, nat_acts, block, comb, erf)
            va, vb = nmaps[top, a].amax((1, 2)), w * nmaps[top, b].amax((1, 2))
            hi, lo = torch.maximum(va, vb), torch.minimum(va, vb)
            t = (vb > va).long().numpy()
            rows.append((block, "natural channels", f"{a}+{w:.2f}*{b}", {
                "n": len(top), "known": len(top), "split": f"{(t == 0).sum()}/{(t == 1).sum()}",
                "extra": f"{((lo >= 0.8 * hi) & (hi > 0)).float().mean():.2f} "
                         f"(overlap {len(tops[a] & tops[b])})",
                "ari": {k: aris(v, t, [t >= 0], args.seed, args.tsne_seeds)
                        for k, v in codes.items()}}))
        print(f"{block}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for fa, fb, ia, ib in CONTROL:
        ps = [p for p in rest if p.parent.name == fa][:args.control] + \
             [p for p in rest if p.parent.name == fb][:args.control]
        acts = forward(model, load_images(ps), [PENULT, LayerRef("_fc")], args.batch)
        top = torch.argsort(acts["_fc"][:, ia] + acts["_fc"][:, ib], descending=True)
        top = top[:args.top_n].numpy()
        t = np.array([p.parent.name == fb for p in ps], int)[top]
        ari = aris(acts[PENULT.key][top].numpy(), t, [t >= 0], args.seed, args.tsne_seeds)[0]
        controls.append((f"_fc:{ia} + _fc:{ib}", len(top), ari))
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    write(args, rows, rf_rows, controls, kinds, wall, (load0, load1))


def write(args, rows, rf_rows, controls, kinds, wall, loads) -> None:
    """The markdown report: command, machine, receptive fields, unit tables, control."""
    cmd = "python benchmarks/constructed_units.py " + " ".join(sys.argv[1:])
    codes = list(dict.fromkeys(k for *_, r in rows for k in r["ari"]))

    def cell(v: tuple[float, float]) -> str:
        return f"{v[0]:.2f} / {v[1]:.2f}" if not np.isnan(v[0]) else "n/a"
    lines = [
        "# Constructed hidden units: facets of the patch a unit sees (issue 22)", "",
        f"`{cmd.strip()}` on {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), load avg {loads[0]:.1f} at "
        f"start / {loads[1]:.1f} at end, {wall / 60:.1f} min.", "",
        f"Textures: A = {kinds[0]}, B = {kinds[1]}, crops cut by `texture_crops`' rule from "
        f"{args.texture_photos} photos of each source class (half the crops for choosing the "
        f"units, half for the pool); {args.photos} composites per texture and {args.photos} "
        f"plain photos choose the units, as many others (new backgrounds) form the pool. "
        f"Natural units: channels chosen on {args.natural} photos, evaluated on {args.natural} "
        f"others. Top-N = {args.top_n}; a unit's value is the max of its combined map.", "",
        "## Receptive fields (EfficientNet-Lite0, 224 px input)", "",
        "| block | grid | stride | theoretical RF (px) | ERF 50% (px) | "
        f"ERF {args.erf_mass:.0%} (px) |", "|---|---|---|---|---|---|",
        *[f"| {b} | {g[0]}x{g[1]} | {s} | {t} | {h} | {e} |" for b, g, s, t, h, e in rf_rows],
        "",
        f"## ARI (k = 2) against the known kind: t-SNE (mean of {args.tsne_seeds} seeds) / "
        "PCA->k-means", "",
        "Codes: `image` = whole photo, Lite0 penultimate (mfv today); `crop xS` = the square of "
        "S x ERF around the peak (`crop Ppx`: of P px), resized to the input, Lite0 "
        "penultimate; `lite2 crop` = the "
        "same crop coded by Lite2; `layer at peak` = the block's channel vector at the peak, "
        "L2-normalised. n (known) = top images (of them composites); A/B = the split; last "
        "column before the codes: texture units, the fraction of top composites whose peak is "
        "inside the pasted patch; natural units, the fraction whose two scaled channel maxima "
        "are within 20 % (fuzzy truth), and the overlap of the channels' top images when chosen.",
        "", "| block | unit kind | unit | n (known) | A/B | in patch / fuzzy | "
        + " | ".join(codes) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(codes)]
    for block, kind, unit, r in rows:
        lines.append(f"| {block} | {kind} | {unit} | {r['n']} ({r['known']}) | {r['split']} | "
                     f"{r['extra']} | " + " | ".join(cell(r["ari"][c][0]) for c in codes) + " |")
    lines += ["", "## Texture units, only the top composites whose peak is inside the patch", "",
              "What the codes do when the unit did see the texture (unit quality set aside).", "",
              "| block | unit kind | seen | " + " | ".join(codes) + " |",
              "|---|---|---|" + "---|" * len(codes)]
    for block, kind, _, r in rows:
        if "seen" in r:
            lines.append(f"| {block} | {kind} | {r['seen']} | "
                         + " | ".join(cell(r["ari"][c][1]) for c in codes) + " |")
    lines += ["", "## Control: class-logit pairs, whole-photo codes", "",
              "| target | n | ARI t-SNE / PCA |", "|---|---|---|",
              *[f"| {t} | {n} | {cell(a)} |" for t, n, a in controls], ""]
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

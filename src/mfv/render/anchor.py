"""Anchors: what keeps a facet's picture in its facet while the target is maximized.

Maximizing a target alone from a facet's mean image lets the picture drift to whatever raises the
target fastest — for a neuron that answers to two kinds of images, often the other kind (see
`benchmarks/diagnose.py`). An anchor adds to each sample's objective two dimensionless terms,
in the spirit of Feature Accentuation (a seed image's latent activations kept close) and VITAL
(the distribution of intermediate activations matched to real images):

    maximize   target / a_f  −  w · |φ(x) − μ_f|² / s_f  −  v · Σ_l SW_l(x, facet)

- `a_f`: the target's maximum over the facet's real images, so the first term is the picture's
  activation in units of its facet's best photo (1 = as strong as the best photo);
- `φ` the code layer (the space the facets were found in), `μ_f` the facet's mean code and `s_f`
  the mean squared distance of its members' codes to it: the pull is 1 for a picture as far from
  the centre as a typical member, so `w = 1` (the default) trades one facet radius² for one
  best-photo's worth of activation;
- `SW_l`: per channel of layer l, the squared distance between the sorted activations of the
  picture and the quantiles of the facet's reference images' activations (a 1-D Wasserstein
  distance, VITAL's sort-matching), divided by the references' variance of that channel and
  averaged over channels — again 1 for a difference as large as the facets' own spread.
  A layer with more than `AnchorSettings.match_positions` positions is matched on a grid of
  every s-th row and column (s the smallest that fits), its offset moving by one cell each step,
  so that every position is matched once every s² steps: a 56×56 layer costs a quarter of its
  sort, and a quarter of the positions estimate the same distribution. With
  `AnchorSettings.match_every` = k the layers are matched on every k-th step only, at k times
  the weight (the same term on average over the steps), and the grid moves once per match.

Samples without an anchor (random starts) maximize the target alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfv.models import LoadedModel
from mfv.models.activations import capture
from mfv.models.targets import LayerRef
from mfv.render.objective import Objective


@dataclass(frozen=True)
class AnchorSettings:
    """Weights of the anchored objective's terms (dimensionless, module doc) and the layers
    whose activation distributions are matched (empty: chosen along the depth)."""

    code_weight: float = 1.0
    match_weight: float = 1.0
    match_layers: tuple[str, ...] = ()
    # at most this many positions per channel a step (0: all); the grid changed no column of
    # the faithful-facets quality table beyond its noise (benchmarks/results/quality-k2-grid*)
    match_positions: int = 1024
    # match on every k-th optimization step (at k times the weight): the steps between cost
    # what the Fourier recipe's do
    match_every: int = 1


@dataclass(frozen=True)
class Anchor:
    """A facet, as the anchored objective needs it."""

    centre: np.ndarray  # (D,) the facet's mean code
    spread: float  # mean squared distance of its members' codes to the centre
    scale: float  # the target's maximum over the facet's real images
    references: np.ndarray | None = None  # (m, 3, S, S) 0..255: images of the facet's members


class AnchoredObjective:
    """`Objective` plus each sample's anchor terms (module doc); `maximize` gives what the
    optimizer ascends and the target's own value (what traces and reports show)."""

    def __init__(self, base: Objective, anchors: Sequence[Anchor | None], code: LayerRef,
                 settings: AnchorSettings, match: Sequence[LayerRef] = ()) -> None:
        self.base, self.model, self.code, self.settings = base, base.model, code, settings
        device = base.model.device
        anchored = [a is not None for a in anchors]
        # the anchor's terms are computed for these samples only: random starts in the same
        # batch (the baselines) need no code, and no second pass where the target has its own
        self.rows = torch.tensor([b for b, a in enumerate(anchored) if a], dtype=torch.long,
                                 device=device)
        self.every_sample = all(anchored)
        kept = [a for a in anchors if a is not None]
        self.centres = torch.stack([torch.as_tensor(a.centre, dtype=torch.float32)
                                    for a in kept]).to(device) if kept else None
        self.spreads = torch.tensor([max(a.spread, 1e-12) for a in kept], device=device)
        self.scales = torch.tensor([a.scale if a.scale > 0 else 1.0 for a in kept],
                                   device=device)
        self.match = list(match) if settings.match_weight > 0 else []
        self.strides: dict[str, int] = {}  # per matched layer: its grid's stride (module doc)
        self.quantiles = self._reference_quantiles(kept) if self.match and kept else {}

    @torch.no_grad()
    def _reference_quantiles(self, anchors: Sequence[Anchor]
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per matched layer: (A, C, N) sorted reference values of the A anchors at the N
        positions a step matches (`match_positions`), and (A, C, 1) their variance (zeros and
        ones for anchors without references). Sets `strides`."""
        out: dict[str, list] = {ref.key: [] for ref in self.match}
        size = self.model.preprocess.input_size
        blank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # anchors without refs
        for anchor in anchors:
            refs = anchor.references
            if refs is None and blank:
                for ref in self.match:
                    out[ref.key].append(blank[ref.key])
                continue
            pixels = torch.zeros(1, 3, size, size, device=self.model.device) if refs is None \
                else torch.as_tensor(refs, dtype=torch.float32, device=self.model.device)
            with capture(self.model, self.match, stop=True) as store:
                self.base.forward(self.model, pixels)  # the pictures' pass settings
            for ref in self.match:
                acts = store[ref.key].float()  # (m, C, H, W) or (m, N, C)
                values = _per_channel(acts)  # (C, m * N)
                stride = _grid_stride(acts.shape, self.settings.match_positions)
                self.strides[ref.key] = stride
                n = _grid_positions(acts[:1], stride, 0).shape[2]
                if refs is None:  # only the shapes count
                    blank[ref.key] = (values.new_zeros(len(values), n),
                                      values.new_ones(len(values), 1))
                    out[ref.key].append(blank[ref.key])
                    continue
                ordered = values.sort(dim=1).values
                picks = torch.linspace(0, ordered.shape[1] - 1, n, device=ordered.device).round()
                quant = ordered[:, picks.long()]
                var = values.var(dim=1, keepdim=True).clamp(min=1e-8)
                out[ref.key].append((quant, var))
        return {k: (torch.stack([q for q, _ in v]), torch.stack([s for _, s in v]))
                for k, v in out.items()}

    def __call__(self, images: torch.Tensor, kind: str = "target") -> torch.Tensor:
        return self.base(images, kind)

    def exact(self) -> Objective:
        """What `measure` reports: the target alone, with a float32 pass."""
        return self.base.exact()

    def maximize(self, images: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(what to ascend, the target's value) per sample of a (B, 3, S, S) 0..255 batch at
        optimization step `step`, which sets the matching grid's offset: the same step gives
        the same terms however the samples were batched, split or resumed."""
        if not len(self.rows):  # random starts only: the target alone
            target = self.base(images)
            return target, target
        # a target read at a unit's scale sees another view of the canvas: its own pass
        target = self.base(images) if self.base.at_unit_scale else None
        every = max(1, self.settings.match_every)
        match = self.match if step % every == 0 else []
        layers = [*([] if target is not None else self.base.layers), self.code, *match]
        # a pass of the anchor's own (the target read in another) needs the anchored samples
        # alone; a pass shared with the target sees every sample, of which the anchored are read
        own_pass, some = target is not None, not self.every_sample
        with capture(self.model, layers, stop=True) as store:
            self.base.forward(self.model, images[self.rows] if own_pass and some else images)
            if target is None:
                target = self.base.values(store, len(images))

            def anchored(key: str) -> torch.Tensor:
                return store[key][self.rows] if some and not own_pass else store[key]

            code = anchored(self.code.key).flatten(1).float()
            pull = ((code - self.centres) ** 2).sum(1) / self.spreads
            own = target if self.every_sample else target[self.rows]
            total = own / self.scales - self.settings.code_weight * pull
            for ref in match:
                quant, var = self.quantiles[ref.key]
                grid = _grid_positions(anchored(ref.key).float(), self.strides[ref.key],
                                       step // every)
                total = total - every * self.settings.match_weight * quantile_match(
                    grid, quant, var)
        if self.every_sample:
            return total, target
        return target.index_copy(0, self.rows, total), target


def default_match_layers(model: LoadedModel) -> tuple[str, ...]:
    """Three layers at a quarter, a half and three quarters of the network's depth (among its
    blocks: see `depth_layers`)."""
    layers = depth_layers(model, 5)
    return layers[1:-1] if len(layers) == 5 else layers


def depth_layers(model: LoadedModel, count: int) -> tuple[str, ...]:
    """`count` layers evenly spaced along a network's depth: among the modules at most two
    levels deep (blocks and stages, not their inner convolutions) whose output is a spatial or
    token map and that are not bare activations, from the first to the last."""
    infos = [i for i in model.layers() if len(i.shape) in (2, 3) and i.path.count(".") <= 1
             and not model.is_activation(i.path)]
    if not infos:
        return ()
    picks = np.linspace(0, len(infos) - 1, min(count, len(infos))).round().astype(int)
    return tuple(infos[i].path for i in dict.fromkeys(picks.tolist()))


def _per_channel(acts: torch.Tensor) -> torch.Tensor:
    """(m, C, H, W) or tokens (m, N, C) → (C, m·positions)."""
    if acts.dim() == 4:
        return acts.permute(1, 0, 2, 3).flatten(1)
    return acts.permute(2, 0, 1).flatten(1)


def _grid_stride(shape: Sequence[int], most: int) -> int:
    """The smallest s whose grid of every s-th row and column of a (B, C, H, W) map (every s-th
    token of a (B, N, C) one) has at most `most` positions; 1 where `most` is 0."""
    dims = tuple(shape[2:]) if len(shape) == 4 else tuple(shape[1:2])
    stride = 1
    while most > 0 and math.prod(d // stride for d in dims) > most:
        stride += 1
    return stride


def _grid_positions(acts: torch.Tensor, stride: int, phase: int) -> torch.Tensor:
    """(B, C, positions) from a (B, C, H, W) or tokens (B, N, C) map: every position at stride
    1, else the grid of every `stride`-th row and column (token) at offset number `phase` of the
    stride² (stride) offsets, cut to the same count at every offset."""
    if acts.dim() != 4:
        if stride > 1:
            acts = acts[:, phase % stride::stride][:, :acts.shape[1] // stride]
        return acts.transpose(1, 2)
    if stride > 1:
        row, col = divmod(phase % (stride * stride), stride)
        rows, cols = acts.shape[2] // stride, acts.shape[3] // stride
        acts = acts[:, :, row::stride, col::stride][:, :, :rows, :cols]
    return acts.flatten(2)


def quantile_match(values: torch.Tensor, quantiles: torch.Tensor, var: torch.Tensor
                   ) -> torch.Tensor:
    """Per sample, mean over channels and positions of (sort(values) − quantiles)² / var for
    (B, C, N) values, (B, C, N) sorted quantiles and (B, C, 1) variances: the sort-matching term.

    The same value and gradient as differentiating through `torch.sort`, cheaper: the gradient
    at a value is 2 (value − the quantile of its rank) / var / (C·N), so only the ranks are
    needed, found without autograd, and the gradient is formed in the forward pass
    (`_QuantileMatch`): ~0.04 of Lite0's forward+backward less per step at batch 8 on 2 CPU
    cores. The ranks come from `_argsort`."""
    return _QuantileMatch.apply(values, quantiles, var)


class _QuantileMatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, quantiles: torch.Tensor, var: torch.Tensor
                ) -> torch.Tensor:
        order = _argsort(values.detach())
        matched = torch.empty_like(values).scatter_(2, order, quantiles.to(values.dtype))
        diff = values - matched  # each value minus the reference quantile of its rank
        scaled = diff / var
        ctx.save_for_backward(scaled)
        return (diff * scaled).mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scaled,) = ctx.saved_tensors
        count = scaled.shape[1] * scaled.shape[2]
        return scaled * (grad * (2.0 / count)).view(-1, 1, 1), None, None


def _argsort(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting (..., N) values along the last dimension, stably, on the values' device
    (a numpy sort of packed keys was faster on one CPU thread, but it reads the tensor on the
    host every step, which `tests/test_speed.py` forbids inside a render loop)."""
    return values.argsort(dim=-1, stable=True)

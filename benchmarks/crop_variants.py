"""Crops and codes `--region patch` did not adopt (or no longer uses), measured against the
library's own with `python benchmarks/hidden_units_e2e.py --crops VARIANT` (issue 22;
docs/hidden-units.md):

* `fit`: each crop's side fitted to its firing region (the bounding box of the region that
  `mfv.facets.patches.firing_centre` centres on, in input pixels) within [3/14, 3/7] of the
  input, instead of the layer's one side;
* `masked`: the library's box, cut from the photo with what the unit does not fire on greyed
  out (weight 0 at or below 0 of the map's maximum, 1 from half of it, bilinear between cells),
  so the code sees the texture and not its background;
* `one-side`: the library's crops, each coded alone (before the code of a crop larger than 3/14
  of the input was averaged with that of its centred square of 3/14, `patch_codes`);
* `weighted`: the library's crops, each coded by the code layer's input map (the head's
  features before pooling) averaged with the unit's firing weight (as `masked`'s, on the photo,
  cut to the crop's box) instead of uniformly: the code of where the unit fires inside the
  crop, without the grey edges a mask paints (the head layer is Lite's `_act_head`);
* `two-sides`: the library's crops, each coded as the mean of the codes of the crops of 3/14
  and 3/7 of the input around its centre, whatever the crop's side (measured, not adopted: at
  48 px layers it clusters on what the crop does not show);
* `tiled`: the library's boxes, each coded at the photo's own scale instead of enlarged to the
  input: the box mirrored outward (symmetric padding, so without seams) until it fills the
  input, so the network reads the texture at the scale it has in the photo, as a field;
* `tiled-mix`: the mean of the library's code and `tiled`'s;
* `contrast`: the library's code of the box minus that of a box of the same side in the same
  photo's corner farthest from it: what the patch holds that the rest of its photo does not
  (a composite's background, a photo's overall look, cancel).
* `window`: the library's side, centred on the side x side window of the map (in cells) that
  holds the most positive activation, instead of the firing region's weighted centre;
* `window-half`: the same over the map's excess above half its maximum;
* `window-region`: the window covering the most cells of the region `firing_centre` uses, of
  those the one nearest that region's weighted centre;
* `flip`, `rot4`: the library's codes averaged over the crop and its mirror image, or over its
  four quarter turns (a texture's code should not depend on its orientation);
* `zoom2`: the library's crops (and inner squares) coded at twice their side as the model's
  input (96 or 192 px at 224) instead of enlarged to the input size.

`install(name)` patches `mfv.facets.patches.Patches` in this process (the local backend runs the
facets here); research only, never imported by the library.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mfv.facets import patches
from mfv.models.activations import capture, first_layer_map
from mfv.models.passes import inference
from mfv.models.targets import resolve_layer

VARIANTS = ("library", "fit", "masked", "one-side", "two-sides", "weighted", "tiled",
            "tiled-mix", "contrast", "window", "window-half", "window-region", "zoom2", "flip",
            "rot4")


def _maps(holder: patches.Patches, images: np.ndarray) -> torch.Tensor:
    """(n, h, w) the target's combined map on its first layer (as the scan reads its peaks)."""
    first = holder.target.terms[0].layer
    with capture(holder.model, [first], stop=True) as store, \
            inference(holder.model) as forward:
        forward(patches.as_input(holder.model, images))
        return first_layer_map(holder.target, store).float().cpu()


def _extent(grid_map: np.ndarray) -> int:
    """Cells across (the larger side) of the bounding box of `firing_region`."""
    region = patches.firing_region(grid_map)
    if region is None:
        return 1
    rows, cols = np.nonzero(region > 0)
    return int(max(np.ptp(rows), np.ptp(cols)) + 1)


def _window_sums(m: np.ndarray, cells: int) -> tuple[np.ndarray, int]:
    """The sums of `m` over every k x k window inside it (k = `cells` within the map's
    sides), indexed by the window's top-left cell, and k."""
    k = int(max(1, min(cells, *m.shape)))
    c = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k], k


def _window_centre(grid_map: np.ndarray, cells: int, floor: float) -> tuple[float, float]:
    """(row, column), in cells, of the centre of the `cells` x `cells` window inside the map
    that holds the most activation above `floor` x the map's maximum (0: its positive part)."""
    m = np.asarray(grid_map, np.float64)
    sums, k = _window_sums(np.clip(m - floor * max(m.max(), 0.0), 0.0, None), cells)
    i, j = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return i + k / 2, j + k / 2


def _region_window_centre(grid_map: np.ndarray, cells: int) -> tuple[float, float]:
    """(row, column), in cells, of the centre of the `cells` x `cells` window that covers the
    most cells of `firing_region`; of the windows that cover as many, the one whose centre is
    nearest the region's weighted centre (`firing_centre`)."""
    centre = np.array(patches.firing_centre(grid_map)) + 0.5
    region = patches.firing_region(grid_map)
    if region is None:
        return tuple(centre)
    sums, k = _window_sums((region > 0).astype(np.float64), cells)
    rows, cols = np.indices(sums.shape) + k / 2
    far = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    i, j = np.unravel_index(int(np.argmin(np.where(sums >= sums.max() - 1e-9, far, np.inf))),
                            sums.shape)
    return i + k / 2, j + k / 2


def _firing_weight(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 1, size, size): 0 where the map is at or below 0 of its maximum, 1 from half of it,
    bilinear between cells."""
    top = maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    weight = (maps / top / patches.FIRING_SHARE).clamp(0, 1)[:, None]
    return F.interpolate(weight, size=(size, size), mode="bilinear", align_corners=False)


def _greyed(images: np.ndarray, maps: torch.Tensor) -> np.ndarray:
    """The images with what the map does not fire on blended to grey (module doc)."""
    weight = _firing_weight(maps, images.shape[1])[:, 0, ..., None]
    pixels = torch.from_numpy(images).float()
    return (pixels * weight + 127.5 * (1 - weight)).round().clamp(0, 255).to(torch.uint8).numpy()


def _mirrored(images: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: each image's box at its own scale, centred and mirrored
    outward (symmetric padding, repeated) to size x size."""
    out = []
    for image, (top, left, h, w) in zip(images, np.asarray(boxes), strict=True):
        crop = image[top:top + h, left:left + w]
        pad = [((size - h) // 2, size - h - (size - h) // 2),
               ((size - w) // 2, size - w - (size - w) // 2), (0, 0)]
        out.append(np.pad(crop, pad, mode="symmetric"))
    return np.stack(out)


def install(variant: str) -> None:
    """Make `Patches` cut crops the `variant` way (`library`: leave it as it is)."""
    if variant == "library":
        return
    if variant == "one-side":
        patches.INNER_SHARE = 1.0  # no crop is larger than the input: each coded alone
        return
    if variant == "two-sides":
        def codes(self: patches.Patches, indices: np.ndarray) -> np.ndarray:
            boxes, images = self.framed(indices)
            boxes = boxes.astype(np.float64)
            size = self.model.preprocess.input_size
            centres = boxes[:, :2] + boxes[:, 2:] / 2
            return sum(patches.crop_codes(self.model, patches.crop_resize(
                images, patches.peak_boxes(centres, round(size * share), size), size),
                self.code_layer) for share in (3 / 14, 3 / 7)) / 2
        patches.Patches.codes = codes
        return
    if variant in ("flip", "rot4", "zoom2"):
        def code_of(holder: patches.Patches, boxes: np.ndarray, images: np.ndarray
                    ) -> np.ndarray:
            size = holder.model.preprocess.input_size
            if variant == "zoom2":  # every box of one target has one side
                crops = patches.crop_resize(images, boxes, int(min(size, 2 * boxes[0, 2])))
                return patches.crop_codes(holder.model, crops, holder.code_layer)
            crops = patches.crop_resize(images, boxes, size)
            views = ([crops, crops[:, :, ::-1]] if variant == "flip" else
                     [np.rot90(crops, k, axes=(1, 2)) for k in range(4)])
            return sum(patches.crop_codes(holder.model, np.ascontiguousarray(view),
                                          holder.code_layer) for view in views) / len(views)

        def two_scale(self: patches.Patches, indices: np.ndarray) -> np.ndarray:
            """`code_of` the crops, averaged with that of their inner squares as the library's
            `patch_codes` averages its own."""
            boxes, images = self.framed(indices)
            codes = code_of(self, boxes, images)
            larger, inner = patches.inner_boxes(boxes, images.shape[1])
            if len(larger):
                codes[larger] = (codes[larger] + code_of(self, inner, images[larger])) / 2
            return codes
        patches.Patches.codes = two_scale
        return
    if variant in ("tiled", "tiled-mix"):
        def tiled(self: patches.Patches, indices: np.ndarray) -> np.ndarray:
            boxes, images = self.framed(indices)
            size = self.model.preprocess.input_size
            codes = patches.crop_codes(self.model, _mirrored(images, boxes, size),
                                       self.code_layer)
            if variant == "tiled":
                return codes
            return (codes + patches.patch_codes(self.model, images, boxes, self.code_layer)) / 2
        patches.Patches.codes = tiled
        return
    if variant == "contrast":
        def contrast(self: patches.Patches, indices: np.ndarray) -> np.ndarray:
            boxes, images = self.framed(indices)
            size = images.shape[1]
            centres = boxes[:, :2] + boxes[:, 2:] / 2
            corners = np.array([[0, 0], [0, size], [size, 0], [size, size]], np.float64)
            far = corners[np.argmax(((centres[:, None] - corners[None]) ** 2).sum(-1), axis=1)]
            away = np.concatenate([patches.peak_boxes(c[None], int(b[2]), size)
                                   for c, b in zip(far, boxes, strict=True)])
            return (patches.patch_codes(self.model, images, boxes, self.code_layer)
                    - patches.patch_codes(self.model, images, away, self.code_layer))
        patches.Patches.codes = contrast
        return
    if variant == "weighted":
        def weighted(self: patches.Patches, indices: np.ndarray) -> np.ndarray:
            boxes, images = self.framed(indices)
            size = self.model.preprocess.input_size
            weight = _firing_weight(_maps(self, images), size)
            head = resolve_layer(self.model, "_act_head")
            out = []
            with capture(self.model, [head], stop=True) as store, \
                    inference(self.model) as forward:
                for start in range(0, len(boxes), 32):
                    rows = slice(start, start + 32)
                    forward(patches.as_input(self.model, patches.crop_resize(
                        images[rows], boxes[rows], size)))
                    feats = store[head.key].float()
                    cut = torch.cat([F.interpolate(
                        w[None, :, t:t + h, le:le + wd], size=feats.shape[2:], mode="area")
                        for w, (t, le, h, wd) in zip(weight[rows], boxes[rows], strict=True)])
                    out.append(((feats * cut).sum((2, 3)) / cut.sum((2, 3)).clamp(min=1e-6))
                               .cpu().numpy())
            return np.concatenate(out)
        patches.Patches.codes = weighted
        return

    def load(self: patches.Patches, indices: np.ndarray) -> None:
        missing = [int(i) for i in np.asarray(indices, np.int64) if int(i) not in self._crops]
        if not missing:
            return
        size, rows = self.model.preprocess.input_size, np.array(missing)
        images = patches.frames(self.model, self.paths, rows)
        maps = _maps(self, images)
        cell = size / maps.shape[1]
        centres = (np.array([patches.firing_centre(m) for m in maps.numpy()]) + 0.5) * cell
        if variant == "window-region":
            centres = np.array([_region_window_centre(m, round(self.side / cell))
                                for m in maps.numpy()]) * cell
            boxes = patches.peak_boxes(centres, self.side, size)
        elif variant.startswith("window"):
            floor = patches.FIRING_SHARE if variant == "window-half" else 0.0
            centres = np.array([_window_centre(m, round(self.side / cell), floor)
                                for m in maps.numpy()]) * cell
            boxes = patches.peak_boxes(centres, self.side, size)
        elif variant == "fit":
            sides = [int(np.clip(round(_extent(m) * cell), round(size * 3 / 14),
                                 round(size * 3 / 7))) for m in maps.numpy()]
            boxes = np.concatenate([patches.peak_boxes(c[None], s, size)
                                    for c, s in zip(centres, sides, strict=True)])
        else:  # masked
            boxes = patches.peak_boxes(centres, self.side, size)
            images = _greyed(images, maps)
        self._boxes.update(zip(missing, boxes, strict=True))
        self._frames.update(zip(missing, images, strict=True))  # what `codes` crops again
        self._crops.update(zip(missing, patches.crop_resize(images, boxes, size), strict=True))

    patches.Patches._load = load

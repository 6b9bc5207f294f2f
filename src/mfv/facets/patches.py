"""Facets of what a hidden unit sees (`--region patch`): each selected image contributes the crop
around its peak at the unit's receptive-field size, not the whole photo.

A conv channel fires on a patch: its receptive field around the place where its map peaks (the
scan records that place, `mfv.scan.result.ScanResult.peak_pixels`). Clustering whole photos groups
their backgrounds; clustering the patches groups what the unit responds to. Here:

* `firing_centres`: where the square is centred. Not the peak cell itself: of the regions where
  the unit's map is at least half its maximum, the one holding the most activation, at its
  activation-weighted centre. A texture unit often peaks on the rim of its patch (or on a stray
  spot), and a crop centred there is half background; measured in docs/hidden-units.md;
* `peak_boxes`: the square of the field's side centred on each such centre, shifted to lie
  inside the photo (the scanned frame: the model's input, square);
* `load_crops`: the crops, resized to the model's input (so mean images, start images and
  anchors keep the shape of whole-photo ones);
* `patch_codes`: the code of each patch that is clustered — the one place that says which code:
  the code layer's output for the crop resized to the model's input (`crop_codes`, as for a
  whole photo), averaged with that of its centred square of 3/14 of the input when the crop is
  larger: a late unit's 96 px crop is often half background, its inner square mostly what the
  unit fires on (measured in docs/hidden-units.md); `PATCH_CODE` names it in the facets' key;
* `Patches`: the three for one target, crops loaded once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mfv.core.errors import MfvError
from mfv.data.images import load_rgb
from mfv.models.activations import capture, first_layer_map
from mfv.models.base import LoadedModel
from mfv.models.onnx_engine import layer_reader
from mfv.models.passes import inference
from mfv.models.targets import LayerRef, Target

# what `patch_codes` computes, where and how large the patches are (part of the facets' keys)
PATCH_CODE = ("code layer of the crop resized to the input, averaged with that of its centred "
              "square of 3/14 of the input when larger, inference pass; side ERF-90 within "
              "[3/14, 3/7]; centred where the map fires most (>= 1/2 max) /5")
INNER_SHARE = 3 / 14  # the centred square a larger crop's code adds, share of the input side
FIRING_SHARE = 0.5  # a unit fires where its map is at least this share of the map's maximum


def resolve_region(region: str, target: Target, grid: tuple[int, int] | None) -> str:
    """`auto` → patch for a hidden unit on a spatial map (the scan found its grid) read at one
    place (`center`, `max`); image for logits, the penultimate and other non-spatial targets,
    and for a map's spatial mean (every place counts, so the whole photo is what it sees);
    `patch` needs a spatial target."""
    if region == "auto":
        local = grid is not None and target.class_index is None and target.reduction != "mean"
        return "patch" if local else "image"
    if region == "patch" and grid is None:
        raise MfvError(f"--region patch: target {target.spec!r} is not on a spatial map, so it "
                       "has no peak to crop around; use --region image (or auto)")
    return region


def firing_region(grid_map: np.ndarray) -> np.ndarray | None:
    """Where a map fires most: of its regions at `FIRING_SHARE` of its maximum or more
    (8-connected), the one holding the most activation above that level, as that excess
    (0 elsewhere); None when the map is nowhere positive."""
    m = np.asarray(grid_map, np.float64)
    top = m.max()
    if not np.isfinite(top) or top <= 0:
        return None
    excess = np.clip(m - FIRING_SHARE * top, 0.0, None)
    regions, n = ndimage.label(excess > 0, structure=np.ones((3, 3)))
    best = 1 + int(np.argmax(ndimage.sum(excess, regions, index=np.arange(1, n + 1))))
    return np.where(regions == best, excess, 0.0)


def firing_centre(grid_map: np.ndarray) -> tuple[float, float]:
    """(row, column), in cells, of the centre of `firing_region`, weighted by its excess; the
    maximum's cell when the map is nowhere positive."""
    weight = firing_region(grid_map)
    if weight is None:
        m = np.asarray(grid_map)
        return tuple(float(v) for v in np.unravel_index(np.argmax(m), m.shape))
    rows, cols = np.indices(weight.shape)
    return float((weight * rows).sum() / weight.sum()), float((weight * cols).sum() / weight.sum())


def firing_centres(model: LoadedModel, target: Target, images: np.ndarray, peaks: np.ndarray,
                   batch_size: int = 32) -> np.ndarray:
    """(n, 2) (y, x) input pixels: `firing_centre` of the target's map (the weighted sum of its
    terms on its first layer, as the scan's peaks) on each (n, S, S, 3) uint8 image; `peaks`
    unchanged for a target read at its map's centre (`center`, `cls`) or not on a spatial map."""
    first = target.terms[0].layer
    if target.reduction in ("center", "cls") or len(images) == 0:
        return peaks
    out = []
    with capture(model, [first], stop=True) as store, inference(model) as forward:
        for start in range(0, len(images), batch_size):
            forward(as_input(model, images[start:start + batch_size]))
            if store[first.key].dim() != 4:
                return peaks
            maps = first_layer_map(target, store).float().cpu().numpy()
            cells = np.array([firing_centre(m) for m in maps]) + 0.5
            out.append(cells * images.shape[1] / np.array(maps.shape[1:], np.float64))
    return np.concatenate(out)


def peak_boxes(centres: np.ndarray, side: int, size: int) -> np.ndarray:
    """(n, 4) int boxes (top, left, height, width): squares of `side` px (at most `size`)
    centred on (y, x) `centres` in a `size` x `size` frame, shifted to lie inside it."""
    side = int(max(1, min(side, size)))
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    corner = np.clip(np.round(centres - side / 2), 0, size - side).astype(np.int64)
    return np.concatenate([corner, np.full_like(corner, side)], axis=1)


def patch_codes(model: LoadedModel, images: np.ndarray, boxes: np.ndarray,
                code_layer: LayerRef, batch_size: int = 32) -> np.ndarray:
    """(n, D) float32: for each box of its (S, S, 3) uint8 image, `crop_codes` of the box,
    averaged with that of its centred square of `INNER_SHARE` of the input when the box is
    larger (48 and 96 px for a 96 px box at 224): only what the crop shows, at two scales."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    size = model.preprocess.input_size
    codes = crop_codes(model, crop_resize(images, boxes, size), code_layer, batch_size)
    larger, inner = inner_boxes(boxes, images.shape[1])
    if len(larger):
        crops = crop_resize(images[larger], inner, size)
        codes[larger] = (codes[larger] + crop_codes(model, crops, code_layer, batch_size)) / 2
    return codes


def inner_boxes(boxes: np.ndarray, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the boxes larger than the inner square, their centred inner squares) in a
    `frame` x `frame` image: the squares whose codes `patch_codes` adds."""
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    inner = round(frame * INNER_SHARE)
    larger = np.flatnonzero(boxes[:, 2:].max(1) > inner)
    return larger, peak_boxes(boxes[larger, :2] + boxes[larger, 2:] / 2, inner, frame)


def frames(model: LoadedModel, paths: Sequence[str], indices: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 images at the model's input size, cropped as the scan cropped them."""
    pre = model.preprocess
    return np.stack([np.round(pre.to_array(load_rgb(paths[i]), "crop") * 255).astype(np.uint8)
                     .transpose(1, 2, 0) for i in indices])


def as_input(model: LoadedModel, images: np.ndarray) -> torch.Tensor:
    """(n, S, S, 3) uint8 images as the model's (n, 3, S, S) [0, 1] input on its device."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(model.device)
    return x.permute(0, 3, 1, 2).float() / 255


def crop_resize(images: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: each image's box, resized (bilinear, antialiased when
    shrinking) to size x size."""
    out = []
    for image, (top, left, h, w) in zip(images, np.asarray(boxes), strict=True):
        crop = torch.from_numpy(np.ascontiguousarray(image[top:top + h, left:left + w]))
        x = crop.permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=h > size)
        out.append(x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def load_crops(model: LoadedModel, paths: Sequence[str], indices: np.ndarray,
               boxes: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8: the boxes of the given images, resized to the model's input S."""
    size = model.preprocess.input_size
    return crop_resize(frames(model, paths, indices), boxes, size)


def crop_codes(model: LoadedModel, crops: np.ndarray, code_layer: LayerRef,
               batch_size: int = 32, engine: str = "torch") -> np.ndarray:
    """(n, D) float32: the code layer's output for each crop (0..255, at the model's input
    size), flattened. The one place that says how a patch is coded."""
    codes = None  # written in place (per-batch arrays kept between passes fragment the heap)
    with layer_reader(model, [code_layer], engine) as read:
        for start in range(0, len(crops), batch_size):
            code, = read(as_input(model, crops[start:start + batch_size]))
            code = code.flatten(1).cpu().numpy()
            if codes is None:
                codes = np.empty((len(crops), code.shape[1]), np.float32)
            codes[start:start + len(code)] = code
    return codes if codes is not None else np.zeros((0, 0), np.float32)


class Patches:
    """The patches of one target: boxes around its peaks, their crops and frames (each photo
    decoded once) and their codes, for the rows of a scan."""

    def __init__(self, model: LoadedModel, paths: Sequence[str],
                 centres: Callable[[np.ndarray], np.ndarray], side: int,
                 code_layer: LayerRef, target: Target | None = None) -> None:
        """`centres(indices)`: the images' peaks (y, x) in input pixels; with `target`, the
        boxes are centred where its map fires most (`firing_centres`), else on the peaks."""
        self.model, self.paths, self.centres = model, paths, centres
        self.side, self.code_layer, self.target = side, code_layer, target
        self._crops: dict[int, np.ndarray] = {}
        self._boxes: dict[int, np.ndarray] = {}
        self._frames: dict[int, np.ndarray] = {}

    def _load(self, indices: np.ndarray) -> None:
        """Boxes and crops of the images not yet loaded (each photo decoded once)."""
        missing = [int(i) for i in np.asarray(indices, dtype=np.int64) if int(i) not in
                   self._crops]
        if not missing:
            return
        size, rows = self.model.preprocess.input_size, np.array(missing)
        images = frames(self.model, self.paths, rows)
        centres = self.centres(rows)
        if self.target is not None:
            centres = firing_centres(self.model, self.target, images, centres)
        boxes = peak_boxes(centres, self.side, size)
        self._boxes.update(zip(missing, boxes, strict=True))
        self._frames.update(zip(missing, images, strict=True))
        self._crops.update(zip(missing, crop_resize(images, boxes, size), strict=True))

    def boxes(self, indices: np.ndarray) -> np.ndarray:
        """(n, 4) the boxes (top, left, height, width) of the given images' crops."""
        self._load(indices)
        return np.stack([self._boxes[int(i)] for i in np.asarray(indices)]) if len(indices) \
            else np.zeros((0, 4), np.int64)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops of the given images (what mean images average)."""
        self._load(indices)
        return np.stack([self._crops[int(i)] for i in np.asarray(indices)])

    def framed(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 4) the boxes of the given images' crops and (n, S, S, 3) the frames they are
        boxes of (each photo decoded once)."""
        boxes = self.boxes(indices)
        return boxes, np.stack([self._frames[int(i)] for i in np.asarray(indices)])

    def codes(self, indices: np.ndarray) -> np.ndarray:
        """(n, D) the codes of the given images' patches (`patch_codes`)."""
        boxes, images = self.framed(indices)
        return patch_codes(self.model, images, boxes, self.code_layer)

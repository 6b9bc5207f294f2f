"""Facets of what a hidden unit sees (`--region patch`): each selected image contributes the crop
around its peak at the unit's receptive-field size, not the whole photo.

A conv channel fires on a patch: its receptive field around the place where its map peaks (the
scan records that place, `mfv.scan.result.ScanResult.peak_pixels`). Clustering whole photos groups
their backgrounds; clustering the patches groups what the unit responds to. Here:

* `peak_boxes`: the square of the field's side centred on each peak, shifted to lie inside the
  photo (the scanned frame: the model's input, square);
* `load_crops`: the crops, resized to the model's input (so mean images, start images and
  anchors keep the shape of whole-photo ones);
* `crop_codes`: the code of each crop that is clustered — the one place that says which code
  (today: the code layer's output for the crop resized to the model's input, as for a whole
  photo); `PATCH_CODE` names it in the facets' key;
* `Patches`: the three for one target, crops loaded once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mfv.core.errors import MfvError
from mfv.data.images import load_rgb
from mfv.models.activations import capture
from mfv.models.base import LoadedModel
from mfv.models.targets import LayerRef, Target

# what `crop_codes` computes and how large the patches are (part of the facets' keys)
PATCH_CODE = "code layer of the crop resized to the input; side ERF-90 within [3/14, 3/7] /2"


def resolve_region(region: str, target: Target, grid: tuple[int, int] | None) -> str:
    """`auto` → patch for a hidden unit on a spatial map (the scan found its grid), image for
    logits, the penultimate and other non-spatial targets; `patch` needs a spatial target."""
    if region == "auto":
        return "patch" if grid is not None and target.class_index is None else "image"
    if region == "patch" and grid is None:
        raise MfvError(f"--region patch: target {target.spec!r} is not on a spatial map, so it "
                       "has no peak to crop around; use --region image (or auto)")
    return region


def peak_boxes(centres: np.ndarray, side: int, size: int) -> np.ndarray:
    """(n, 4) int boxes (top, left, height, width): squares of `side` px (at most `size`)
    centred on (y, x) `centres` in a `size` x `size` frame, shifted to lie inside it."""
    side = int(max(1, min(side, size)))
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    corner = np.clip(np.round(centres - side / 2), 0, size - side).astype(np.int64)
    return np.concatenate([corner, np.full_like(corner, side)], axis=1)


def frames(model: LoadedModel, paths: Sequence[str], indices: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 images at the model's input size, cropped as the scan cropped them."""
    pre = model.preprocess
    return np.stack([np.round(pre.to_array(load_rgb(paths[i]), "crop") * 255).astype(np.uint8)
                     .transpose(1, 2, 0) for i in indices])


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


@torch.inference_mode()
def crop_codes(model: LoadedModel, crops: np.ndarray, code_layer: LayerRef,
               batch_size: int = 32) -> np.ndarray:
    """(n, D) float32: the code layer's output for each crop (0..255, at the model's input
    size), flattened. The one place that says how a patch is coded."""
    parts = []
    with capture(model, [code_layer]) as store:
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size]))
            model(x.to(model.device).permute(0, 3, 1, 2).float() / 255)
            parts.append(store[code_layer.key].flatten(1).float().cpu().numpy())
    return np.concatenate(parts)


class Patches:
    """The patches of one target: boxes around its peaks, their crops (loaded once) and their
    codes, for the rows of a scan."""

    def __init__(self, model: LoadedModel, paths: Sequence[str],
                 centres: Callable[[np.ndarray], np.ndarray], side: int,
                 code_layer: LayerRef) -> None:
        self.model, self.paths, self.centres = model, paths, centres
        self.side, self.code_layer = side, code_layer
        self._crops: dict[int, np.ndarray] = {}

    def boxes(self, indices: np.ndarray) -> np.ndarray:
        """(n, 4) the boxes (top, left, height, width) around the images' peaks."""
        return peak_boxes(self.centres(np.asarray(indices)), self.side,
                          self.model.preprocess.input_size)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops of the given images (what mean images average)."""
        indices = np.asarray(indices, dtype=np.int64)
        missing = [int(i) for i in indices if int(i) not in self._crops]
        if missing:
            crops = load_crops(self.model, self.paths, np.array(missing), self.boxes(missing))
            self._crops.update(zip(missing, crops, strict=True))
        return np.stack([self._crops[int(i)] for i in indices])

    def codes(self, indices: np.ndarray) -> np.ndarray:
        """(n, D) the codes of the given images' crops (`crop_codes`)."""
        return crop_codes(self.model, self.pixels(indices), self.code_layer)

"""The MIS observer offline: an independent network whose pooled features stand in for the
published observer (DreamSim, whose weights are downloaded at run time).

By default the observer is EfficientNet-Lite2 (Lite1 when Lite2 is the network explained), read
at its penultimate layer (the pooled head features: chosen by measurement against block outputs,
docs/mis.md); a user names another network (`--observer`, any name `--model` takes), its
weights (`--observer-weights`) and layer (`--observer-layer`; spatial maps and tokens are
averaged over positions). Embeddings of the scan's photos are computed once per worker and
reused by every target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mfv.models import LoadedModel, load_model
from mfv.models.base import to_tensor
from mfv.models.onnx_engine import layer_reader
from mfv.models.read import channel_means, read_photos
from mfv.models.targets import LayerRef, resolve_layer

DEFAULT = "efficientnet_lite2"
FALLBACK = "efficientnet_lite1"  # when the default is the network explained
BATCH = 32


def observer_name(name: str, explained: str) -> str:
    """The observer network `name` stands for ('auto': Lite2, or Lite1 when Lite2 is the
    network explained)."""
    if name != "auto":
        return name
    return FALLBACK if explained == DEFAULT else DEFAULT


@dataclass
class Observer:
    """An independent network and the layer whose (pooled) output embeds an image; remembers
    the photos it has embedded."""

    model: LoadedModel
    layer: LayerRef
    label: str
    _photos: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def photos(self, paths: Sequence[str]) -> np.ndarray:
        """(len(paths), D) embeddings of photos as the observer's own preprocessing shows them
        (resize, centre crop); a row of NaN for a photo that cannot be read."""
        missing = list(dict.fromkeys(p for p in paths if p not in self._photos))
        if missing:
            read = read_photos(self.model, missing, [self.layer], channel_means,
                               batch_size=BATCH)
            width = read.outputs[0].shape[1] if len(read.kept) else 0
            for i, row in zip(read.kept, read.outputs[0], strict=True):
                self._photos[missing[i]] = row
            for i, _ in read.bad:
                self._photos[missing[i]] = np.full(width, np.nan, np.float32)
        return np.stack([self._photos[p] for p in paths]) if paths else np.zeros((0, 0))

    def pictures(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, D) embeddings of (H, W, 3) uint8 pictures, resized and centre-cropped like a
        photo (what a person looking at the file sees)."""
        out = []
        with layer_reader(self.model, [self.layer]) as read:
            for start in range(0, len(images), BATCH):
                batch = torch.stack([to_tensor(self.model.preprocess, Image.fromarray(im))
                                     for im in images[start:start + BATCH]])
                acts, = read(batch.to(self.model.device))
                out.append(channel_means(acts).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_observer(name: str, explained: LoadedModel, layer: str = "penultimate",
                  weights: str | None = None, loaded: Sequence[LoadedModel] = ()) -> Observer:
    """The observer a run's settings name, on the explained network's device (one of the
    `loaded` networks when it has that name and no other weights are asked for)."""
    resolved = observer_name(name, explained.name)
    same = [m for m in loaded if m.name == resolved] if weights is None else []
    model = same[0] if same else load_model(resolved, device=explained.device, weights=weights)
    return Observer(model, resolve_layer(model, layer), f"{model.name} {layer}")

"""What each unit of the layer study saw, listed once and coded once.

A unit's top images are *items*: for logits, the penultimate and other non-spatial targets the
whole photo; for hidden units on spatial maps (`--region patch`, the default there) the crop
around the unit's peak at its layer's patch side — the crops `mfv run --region patch` clusters
(`mfv.facets.patches`: `peak_boxes`, `frames`, `crop_resize`, `crop_codes`). Many units share
an item (the same photo, or the same photo and box: with `--reduction center` every unit of a
layer peaks at the same place, and layers with the same patch side share their boxes), so
items are deduplicated over the whole study and each is coded once, each photo decoded once
for all its crops:

* the clustering's code: the scan's code of the photo, or `crop_codes` of the crop resized to
  the swept model's input (as the run codes a patch);
* the independent code: the embedder's penultimate features of the photo (read as the embedder
  reads photos), or of the crop resized to the embedder's input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from mfv.core.allocator import release_free_memory
from mfv.core.errors import MfvError
from mfv.data.images import BadImageError
from mfv.facets.patches import as_input, crop_codes, crop_resize, firing_centre, frames
from mfv.models import LoadedModel
from mfv.models.activations import capture
from mfv.models.passes import inference, laid_out
from mfv.models.read import read_photos
from mfv.models.targets import LayerRef, resolve_layer
from mfv.scan.scanner import ScanResult

log = logging.getLogger(__name__)

WHOLE = -1  # the box of a whole-photo item: (-1, -1, -1, -1)
PHOTOS_PER_CHUNK = 64  # photos decoded at once while their crops are coded
CODE_BATCH = 32
CROP_BATCH = 128  # crops cut and resized at once (bounded memory)


@dataclass(frozen=True)
class Items:
    """Distinct items: `rows` (n,) scan rows and `boxes` (n, 4) (top, left, height, width) in
    the scanned frame, all -1 for a whole photo; sorted by row, then box."""

    rows: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def whole(self) -> np.ndarray:
        return self.boxes[:, 0] == WHOLE


def table(rows: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> tuple[Items,
                                                                           list[np.ndarray]]:
    """The distinct items of several lists of (row, box) and, per list, its items' indices into
    them (in the list's order)."""
    keys = np.concatenate([np.column_stack([np.asarray(r, np.int64), np.asarray(b, np.int64)])
                           for r, b in zip(rows, boxes, strict=True)]) if rows else \
        np.zeros((0, 5), np.int64)
    distinct, inverse = np.unique(keys, axis=0, return_inverse=True)
    cuts = np.cumsum([len(r) for r in rows])[:-1]
    return (Items(distinct[:, 0].copy(), distinct[:, 1:].copy()),
            np.split(inverse.reshape(-1), cuts))


def whole_boxes(n: int) -> np.ndarray:
    return np.full((n, 4), WHOLE, np.int64)


def code_items(model: LoadedModel, embedder: LoadedModel, result: ScanResult, items: Items,
               code_layer: LayerRef, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, D), independent (n, E)) float32 of every item: the clustering's code and the
    embedder's penultimate features (module doc). A photo that cannot be read any more gets
    zero codes."""
    penultimate = resolve_layer(embedder, "penultimate")
    whole = np.flatnonzero(items.whole)
    crops = np.flatnonzero(~items.whole)
    codes = np.zeros((len(items), np.asarray(result.codes).shape[1]), np.float32)
    codes[whole] = np.asarray(result.codes)[items.rows[whole]]
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if len(whole):
        read = read_photos(embedder, [result.paths[int(r)] for r in items.rows[whole]],
                           [penultimate], batch_size=CODE_BATCH,
                           progress="sweep: independent codes of photos" if progress else None)
        parts["whole"] = (whole[read.kept], read.outputs[0])
    if len(crops):
        own, other, done = _crop_codes(model, embedder, result, items, crops, code_layer,
                                       penultimate, progress)
        codes[done] = own
        parts["crops"] = (done, other)
    width = next((v.shape[1] for _, v in parts.values() if v.ndim == 2 and len(v)), 0)
    independent = np.zeros((len(items), width), np.float32)
    for at, values in parts.values():
        if len(at):
            independent[at] = values
    if len(items) and not width:
        raise MfvError(f"none of the {len(items)} images the sweep needs can be read any more")
    return codes, independent


def _crop_codes(model: LoadedModel, embedder: LoadedModel, result: ScanResult, items: Items,
                crops: np.ndarray, code_layer: LayerRef, penultimate: LayerRef,
                progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crops' codes by both networks (with the crops' item indices), decoding each photo
    once for all its crops; a photo gone since the scan is left out, with a warning."""
    photos = np.unique(items.rows[crops])
    own, other, done = [], [], []
    bar = tqdm(total=len(crops), desc="sweep: codes of the crops", unit="crop",
               disable=not progress)
    with laid_out(model), laid_out(embedder):  # prepared once, not once a batch
        for start in range(0, len(photos), PHOTOS_PER_CHUNK):
            mine = crops[np.isin(items.rows[crops], photos[start:start + PHOTOS_PER_CHUNK])]
            for part, codes, independent in _chunk_codes(model, embedder, result, items, mine,
                                                         code_layer, penultimate):
                own.append(codes)
                other.append(independent)
                done.append(part)
            bar.update(len(mine))
            release_free_memory()  # two networks at two sizes fragment a never-trimmed heap
    bar.close()
    if not done:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(own), np.concatenate(other), np.concatenate(done)


def _chunk_codes(model: LoadedModel, embedder: LoadedModel, result: ScanResult, items: Items,
                 mine: np.ndarray, code_layer: LayerRef, penultimate: LayerRef
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(item indices, codes, independent codes) of the crops `mine`, a batch at a time, each of
    their photos decoded once."""
    pictures = {}
    for row in np.unique(items.rows[mine]).tolist():
        try:
            pictures[row] = frames(model, result.paths, np.array([row]))[0]
        except BadImageError as exc:
            log.warning("left out of the sweep's crops: %s", exc)
    mine = mine[np.isin(items.rows[mine], list(pictures))]
    for at in range(0, len(mine), CROP_BATCH):
        part = mine[at:at + CROP_BATCH]
        images = np.stack([pictures[int(r)] for r in items.rows[part]])
        boxes = items.boxes[part]
        yield (part,
               crop_codes(model, crop_resize(images, boxes, model.preprocess.input_size),
                          code_layer, CODE_BATCH),
               crop_codes(embedder, crop_resize(images, boxes, embedder.preprocess.input_size),
                          penultimate, CODE_BATCH))


def firing_centres_of(model: LoadedModel, result: ScanResult,
                      units: Sequence[tuple[LayerRef, int, float, np.ndarray]],
                      progress: bool = False) -> list[np.ndarray]:
    """Per unit (layer, channel, weight, top rows), the (n, 2) (y, x) input pixels where its map
    fires most on each top image (`mfv.facets.patches.firing_centre`, where `mfv run --region
    patch` centres its crops for a unit not read at its map's centre): every photo decoded and
    passed through the model once for all units and layers."""
    out = [np.zeros((len(rows), 2)) for *_, rows in units]
    photos = np.unique(np.concatenate([rows for *_, rows in units])) if units else []
    wanted: dict[int, list[tuple[int, int]]] = {}
    for j, (*_, rows) in enumerate(units):
        for at, row in enumerate(rows.tolist()):
            wanted.setdefault(row, []).append((j, at))
    layers = list(dict.fromkeys(ref for ref, *_ in units))
    size = model.preprocess.input_size
    bar = tqdm(total=len(photos), desc="sweep: where the units fire", unit="img",
               disable=not progress)
    with capture(model, layers) as store, inference(model) as forward:
        for start in range(0, len(photos), CODE_BATCH):
            chunk = photos[start:start + CODE_BATCH]
            forward(as_input(model, frames(model, result.paths, chunk)))
            maps = {ref.key: store[ref.key] for ref in layers}
            for b, row in enumerate(chunk.tolist()):
                for j, at in wanted[row]:
                    ref, channel, weight, _ = units[j]
                    grid = (maps[ref.key][b, channel] * weight).float().cpu().numpy()
                    cell = np.array(firing_centre(grid)) + 0.5
                    out[j][at] = cell * size / np.array(grid.shape, np.float64)
            bar.update(len(chunk))
    bar.close()
    return out

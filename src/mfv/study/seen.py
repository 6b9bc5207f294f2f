"""What each unit of the layer study saw, listed once and coded once.

A unit's top images are *items*: for logits, the penultimate and other non-spatial targets the
whole photo; for hidden units on spatial maps (`--region patch`, the default there) the crop
around the unit's peak at its layer's patch side — the crops `mfv run --region patch` clusters
(`mfv.facets.patches`: `peak_boxes`, `frames`, `crop_resize`, `patch_codes`). Many units share
an item (the same photo, or the same photo and box: with `--reduction center` every unit of a
layer peaks at the same place, and layers with the same patch side share their boxes), so
items are deduplicated over the whole study and each is coded once, each photo decoded once
for all its crops:

* the clustering's code: the scan's code of the photo, or `patch_codes` of the crop (as the
  run codes a patch: the crop's code, averaged with its inner square's when larger; an inner
  square that is itself an item, as the centred 48 px crop of an early layer is the inner
  square of a late layer's centred crop, is coded once);
* the independent code: the embedder's penultimate features of the photo (read as the embedder
  reads photos), or of the crop resized to the embedder's input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mfv.core.allocator import keep_freed_memory, release_free_memory
from mfv.core.errors import MfvError
from mfv.data.images import BadImageError
from mfv.facets.patches import as_input, crop_codes, crop_resize, firing_centre, frames, inner_boxes
from mfv.models import LoadedModel
from mfv.models.activations import capture
from mfv.models.onnx_engine import engine_name, exported, release_sessions
from mfv.models.passes import inference, laid_out
from mfv.models.read import read_photos
from mfv.models.targets import LayerRef, resolve_layer
from mfv.runtime.backend import portable, unpacked
from mfv.scan.scanner import ScanResult
from mfv.study.measures import parallel_map

log = logging.getLogger(__name__)

WHOLE = -1  # the box of a whole-photo item: (-1, -1, -1, -1)
PHOTOS_PER_CHUNK = 64  # photos decoded at once while their crops are coded
CODE_BATCH = 2  # images an ONNX Runtime pass: as fast per image as 8 on the CPU, and the
# arenas of Lite0 and Lite2 hold a quarter as much (benchmarks/results/sweep-code-batch.md)
FIRING_BATCH = 8  # photos a torch pass while finding where units fire
CROP_BATCH = 128  # crops cut and resized at once (bounded memory)
PARALLEL_CROPS = 2000  # crops from which they are coded over a process per core
CODE_ENGINE = "onnxruntime"  # what reads the items (`mfv.models.onnx_engine`)
WORKER_BYTES = 1_500_000_000  # a coding worker's peak (Lite0 + Lite2: 1.13 GB measured)


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
               code_layer: LayerRef, progress: bool = False,
               processes: int | None = None, batch: int = CODE_BATCH
               ) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, D), independent (n, E)) float32 of every item: the clustering's code and the
    embedder's penultimate features (module doc). A photo that cannot be read any more gets
    zero codes. The crops are coded over `processes` worker processes of one thread each
    (default: one per core for `PARALLEL_CROPS` crops or more on the CPU; 1: in this process),
    `batch` images a network pass."""
    penultimate = resolve_layer(embedder, "penultimate")
    whole = np.flatnonzero(items.whole)
    crops = np.flatnonzero(~items.whole)
    codes = np.zeros((len(items), np.asarray(result.codes).shape[1]), np.float32)
    codes[whole] = np.asarray(result.codes)[items.rows[whole]]
    independent: np.ndarray | None = None

    def place(at: np.ndarray, values: np.ndarray) -> None:
        nonlocal independent
        if independent is None:  # its width is the embedder's, known from its first output
            independent = np.zeros((len(items), values.shape[1]), np.float32)
        independent[at] = values

    if len(whole):
        read = read_photos(embedder, [result.paths[int(r)] for r in items.rows[whole]],
                           [penultimate], batch_size=batch, engine=CODE_ENGINE,
                           progress="sweep: independent codes of photos" if progress else None)
        if len(read.kept):
            place(whole[read.kept], read.outputs[0])
    if len(crops):
        for network in (model, embedder):  # the earlier passes' sessions and freed heap,
            release_sessions(network)  # else held while the workers code
        release_free_memory()
        if processes is None:
            processes = _default_processes(len(crops), model, embedder)
        jobs = _crop_jobs(items, crops, model.preprocess.input_size)
        for network, layer in ((model, code_layer), (embedder, penultimate)):  # exported once
            size = network.preprocess.input_size  # here, shipped with the networks
            if engine_name(network, CODE_ENGINE) != "torch":
                exported(network, [layer], (size, size))
        extra = np.zeros((len(jobs.rows) - len(crops), codes.shape[1]), np.float32)
        for at, own, other in _crop_codes(
                _Coders(model, embedder, code_layer, penultimate, batch), result.paths, jobs,
                processes, progress):
            item = at < len(crops)  # each chunk in place: no list of chunks, no copy of them all
            codes[crops[at[item]]] = own[item]
            extra[at[~item] - len(crops)] = own[~item]
            place(crops[at[item]], other)
        for s in range(0, len(jobs.larger), CROP_BATCH):  # a block at a time: bounded memory
            larger, square = jobs.larger[s:s + CROP_BATCH], jobs.inner[s:s + CROP_BATCH]
            item = square < len(crops)  # an inner square is never larger: its code is raw
            inner = np.empty((len(larger), codes.shape[1]), np.float32)
            inner[item] = codes[crops[square[item]]]
            inner[~item] = extra[square[~item] - len(crops)]
            codes[crops[larger]] = (codes[crops[larger]] + inner) / 2
    if independent is None:
        if len(items):
            raise MfvError(f"none of the {len(items)} images the sweep needs can be read any "
                           "more")
        independent = np.zeros((0, 0), np.float32)
    return codes, independent


@dataclass(frozen=True)
class _Coders:
    """The two networks that code a crop and the layers read: the swept model's code layer and
    the embedder's penultimate (each network `portable` when shipped to a worker process), and
    the images a pass."""

    model: LoadedModel | Any
    embedder: LoadedModel | Any
    code_layer: LayerRef
    penultimate: LayerRef
    batch: int = CODE_BATCH


@dataclass(frozen=True)
class _CropJobs:
    """The crops to code: first the crop items (in the order of `crops`), then the inner
    squares of larger crops that are not items themselves; `larger` (indices into the crops:
    those whose code is averaged with their inner square's) and `inner` (each one's inner
    square, an index into the jobs); `items` is how many jobs are items."""

    rows: np.ndarray
    boxes: np.ndarray
    larger: np.ndarray
    inner: np.ndarray
    items: int


def _crop_jobs(items: Items, crops: np.ndarray, frame: int) -> _CropJobs:
    rows, boxes = items.rows[crops], items.boxes[crops]
    larger, squares = inner_boxes(boxes, frame)
    known = {key: i for i, key in enumerate(map(tuple, np.column_stack([rows, boxes]).tolist()))}
    added: dict[tuple, int] = {}
    inner = np.empty(len(larger), np.int64)
    for j, key in enumerate(map(tuple, np.column_stack([rows[larger], squares]).tolist())):
        inner[j] = known[key] if key in known else added.setdefault(key, len(rows) + len(added))
    more = np.array(list(added), np.int64).reshape(-1, 5)
    return _CropJobs(np.concatenate([rows, more[:, 0]]), np.concatenate([boxes, more[:, 1:]]),
                     larger, inner, len(rows))


@dataclass(frozen=True)
class _Chunk:
    """A few photos' crops: their job indices `at` (those below `items` are items, coded by
    both networks; the others inner squares, by the swept one), their photos' rows and boxes,
    and the paths of those photos (by row): one task of `_code_chunk`."""

    coders: _Coders
    at: np.ndarray
    rows: np.ndarray
    boxes: np.ndarray
    items: int
    paths: dict[int, str]


def _default_processes(crops: int, model: LoadedModel, embedder: LoadedModel) -> int:
    """One process per core for many crops on the CPU, as many as half the machine's memory
    holds at `WORKER_BYTES` each, when both networks can be shipped (a class defined in
    `__main__` cannot be unpickled by a worker); else 1."""
    shippable = all(type(m.module).__module__ != "__main__" for m in (model, embedder))
    on_cpu = model.device.type == "cpu" and embedder.device.type == "cpu"
    if not (shippable and on_cpu and crops >= PARALLEL_CROPS):
        return 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(len(os.sched_getaffinity(0)), memory // 2 // WORKER_BYTES))


def _crop_codes(coders: _Coders, paths: Sequence[str], jobs: _CropJobs, processes: int,
                progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]]:
    """(job indices, the swept network's codes, the embedder's codes of the items among them)
    of the crop jobs, a chunk of photos at a time, each photo decoded once for all its crops; a
    photo gone since the scan is left out, with a warning. Over several processes each chunk
    ships both networks (~45 MB for Lite0 + Lite2, a fraction of a second against the chunk's
    tens of seconds of coding)."""
    photos = np.unique(jobs.rows)
    shipped = coders if processes < 2 else replace(
        coders, model=portable(coders.model), embedder=portable(coders.embedder))
    chunks = []
    for start in range(0, len(photos), PHOTOS_PER_CHUNK):
        at = np.flatnonzero(np.isin(jobs.rows, photos[start:start + PHOTOS_PER_CHUNK]))
        chunks.append(_Chunk(shipped, at, jobs.rows[at], jobs.boxes[at], jobs.items,
                             {int(r): paths[int(r)] for r in np.unique(jobs.rows[at]).tolist()}))
    bar = tqdm(total=len(jobs.rows), desc="sweep: codes of the crops", unit="crop",
               disable=not progress)
    with ExitStack() as here:
        if processes < 2:  # both networks prepared once for all chunks
            here.enter_context(laid_out(coders.model))
            here.enter_context(laid_out(coders.embedder))
            coded = map(_code_chunk, chunks)
        else:
            coded = parallel_map(_code_chunk, chunks, processes, setup=_one_thread_each,
                                 min_size=0)
        for at, codes, independent, left_out in coded:
            for message in left_out:  # logged here: a worker process's log goes nowhere
                log.warning("left out of the sweep's crops: %s", message)
            bar.update(len(at))
            if len(at):
                yield at, codes, independent
    bar.close()


def _one_thread_each() -> None:
    """A coding worker's setup: one thread (the cores are the processes: 1.2-1.3x the crops a
    second of one process with two threads on 2 cores), freed memory kept (mfv's own process,
    as mfv's Ray workers)."""
    torch.set_num_threads(1)
    keep_freed_memory()


def _code_chunk(chunk: _Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(job indices, the swept network's codes, the embedder's codes of the items among them,
    left-out photos' messages) of one chunk's crops, a batch at a time, each of their photos
    decoded once."""
    coders = chunk.coders
    model, embedder = unpacked(coders.model), unpacked(coders.embedder)
    pictures, left_out = {}, []
    for row in chunk.paths:
        try:
            pictures[row] = frames(model, chunk.paths, np.array([row]))[0]
        except BadImageError as exc:
            left_out.append(str(exc))
    kept = np.isin(chunk.rows, list(pictures))
    at, rows, boxes = chunk.at[kept], chunk.rows[kept], chunk.boxes[kept]
    own, other = [], []
    with laid_out(model), laid_out(embedder):
        for s in range(0, len(at), CROP_BATCH):
            images = np.stack([pictures[int(r)] for r in rows[s:s + CROP_BATCH]])
            part, item = boxes[s:s + CROP_BATCH], at[s:s + CROP_BATCH] < chunk.items
            own.append(crop_codes(model, crop_resize(images, part, model.preprocess.input_size),
                                  coders.code_layer, coders.batch, CODE_ENGINE))
            if item.any():
                other.append(crop_codes(embedder, crop_resize(
                    images[item], part[item], embedder.preprocess.input_size),
                    coders.penultimate, coders.batch, CODE_ENGINE))
    release_free_memory()  # two networks at two sizes fragment a never-trimmed heap
    empty = np.zeros((0, 0), np.float32)
    return (at, np.concatenate(own) if own else empty,
            np.concatenate(other) if other else empty, left_out)


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
    with capture(model, layers, stop=True) as store, inference(model) as forward:
        for start in range(0, len(photos), FIRING_BATCH):
            chunk = photos[start:start + FIRING_BATCH]
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

"""Photos through a network: files → decoded, preprocessed batches → chosen layers' outputs.

One loop for what evaluate (facet members as the networks see them) and the layer study (an
independent network's codes) read; the scan keeps its own chunked, resumable, sharded loop over
the same decoding (`mfv.data.images`). Unreadable files are skipped, each with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from mfv.data.images import BadImageError, decoding_workers, load_rgb
from mfv.models.base import LoadedModel, to_tensor
from mfv.models.onnx_engine import layer_reader
from mfv.models.targets import LayerRef

log = logging.getLogger(__name__)
T = TypeVar("T")


def flat(acts: torch.Tensor) -> torch.Tensor:
    """(B, ...) → (B, D): a layer's whole output as one vector per photo (a code)."""
    return acts.flatten(1)


def channel_means(acts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or tokens (B, N, C) → (B, C): each channel's mean over positions."""
    if acts.dim() == 4:
        return acts.mean(dim=(2, 3))
    return acts.mean(dim=1) if acts.dim() == 3 else acts


@dataclass(frozen=True)
class Reading:
    """What a network made of a list of photos."""

    outputs: list[np.ndarray]  # per layer: (len(kept), ...) float32, the reduced outputs
    kept: np.ndarray  # indices into the paths of the photos that were read, in order
    bad: list[tuple[int, str]]  # (index, reason) of the photos that could not be


def read_photos(model: LoadedModel, paths: Sequence[str], layers: Sequence[LayerRef],
                reduce: Callable[[torch.Tensor], torch.Tensor] = flat, *, batch_size: int = 32,
                progress: str | None = None, engine: str = "torch",
                decoders: int | None = None) -> Reading:
    """Each photo decoded, preprocessed as the model's own photos are (resize, centre crop), and
    passed through the model without gradients in batches (`layer_reader`); `reduce` of every
    layer's output.
    `progress`: a progress bar's title (None: no bar); `engine`: `layer_reader`'s; `decoders`:
    threads decoding the next batch while the network reads this one (default:
    `decoding_workers`, none on the CPU). The values do not depend on it."""
    if decoders is None:
        decoders = decoding_workers(model.device)
    # each layer's values written in place into one array: per-batch arrays kept between
    # ONNX Runtime's passes fragment the heap (~0.6 MB more resident memory a photo, measured)
    outputs: list[np.ndarray | None] = [None] * len(layers)
    kept: list[int] = []
    bad: list[tuple[int, str]] = []
    bar = tqdm(total=len(paths), desc=progress, unit="img", disable=progress is None)

    def decoded(i: int) -> torch.Tensor | BadImageError:
        try:
            return to_tensor(model.preprocess, load_rgb(paths[i]))
        except BadImageError as exc:
            return exc

    with layer_reader(model, layers, engine) as read:
        for first, photos in _batches(decoded, len(paths), batch_size, decoders):
            batch = []
            for i, photo in enumerate(photos, first):
                if isinstance(photo, BadImageError):
                    bad.append((i, str(photo)))
                else:
                    batch.append(photo)
                    kept.append(i)
            if batch:
                done = len(kept) - len(batch)
                for j, acts in enumerate(read(torch.stack(batch).to(model.device))):
                    values = reduce(acts).cpu().numpy()
                    if outputs[j] is None:
                        outputs[j] = np.empty((len(paths), *values.shape[1:]), values.dtype)
                    outputs[j][done:len(kept)] = values
            bar.update(len(photos))
    bar.close()
    for i, reason in bad:
        log.warning("skipped %s: %s", paths[i], reason)
    return Reading([out[:len(kept)] if out is not None else np.zeros((0,), np.float32)
                    for out in outputs], np.array(kept, dtype=np.int64), bad)


def _batches(decoded: Callable[[int], T], n: int, size: int, threads: int
             ) -> Iterator[tuple[int, list[T]]]:
    """(first index, [decoded(i) for the batch's i]) for batches of `size` of range(n); with
    `threads`, the next batch is decoded in a thread pool while the caller uses this one (one
    batch ahead, so at most two batches of photos are held; Pillow's decoding and resizing
    release the GIL)."""
    starts = range(0, n, size)
    if threads <= 0:
        for first in starts:
            yield first, [decoded(i) for i in range(first, min(first + size, n))]
        return
    with ThreadPoolExecutor(threads) as pool:
        def submit(first: int) -> list[Future]:
            return [pool.submit(decoded, i) for i in range(first, min(first + size, n))]
        ahead = submit(0) if n else []
        for first in starts:
            current = ahead
            if first + size < n:
                ahead = submit(first + size)
            yield first, [f.result() for f in current]

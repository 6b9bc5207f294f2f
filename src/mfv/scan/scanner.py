"""Stage 1, scan: one streaming pass records every target's activation and every image's code.

Stored (by `mfv.runtime.rundir.ScanStore`, one folder per scan key): a manifest (model,
preprocessing, decoding, image list and its fingerprint, targets, code layer, bad files) and plain
`.npy` arrays — `activations` (N, T) or, when full vectors would not fit, a streaming top-N per
target (`top_indices`, `top_values`, (T, n)), `codes` (N, D), `valid` (N,) and the images' mean
amplitude spectrum (what the MACO recipe keeps fixed), measured on an even sample of about
`SPECTRUM_PHOTOS` of them (`spectrum_every`; the manifest's `spectrum_photos` says how many).
Rows of undecodable images are NaN and invalid. For targets on spatial maps, where each image
drives the target most (its peak: `TargetBank.peaks`) is kept next to its activation: `peaks`
(N, T, 2) or `top_peaks` (T, n, 2), (row, column) in the target's grid (the manifest's
`grids`), -1 where there is none.

The pass is cut into chunks of whole batches; each finished chunk is written atomically, so a scan
killed at any moment resumes from the last finished chunk and its merged arrays equal an
uninterrupted scan's. Chunks are independent units of work: `shard=(i, n)` processes every n-th
chunk, so several processes or machines can share one scan.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mfv.core.errors import MfvError
from mfv.core.keys import digest
from mfv.core.layout import RunLayout
from mfv.data.images import (
    MAX_ASPECT_RATIO,
    MIN_USABLE_SIDE,
    ImageDataset,
    collate_skip_bad,
    decoding_workers,
)
from mfv.data.sources import ImageList
from mfv.data.spectrum import AmplitudeSpectrum
from mfv.models import LoadedModel
from mfv.models.activations import TargetBank
from mfv.models.base import to_tensor
from mfv.models.onnx_engine import layer_reader
from mfv.models.passes import default_channels_last
from mfv.models.targets import Target, resolve_layer
from mfv.scan.options import ScanOptions
from mfv.scan.result import ScanResult
from mfv.scan.store import ScanStore, choose_mode
from mfv.scan.topn import merge_top, peaks_of_top

log = logging.getLogger(__name__)

# Photos the mean amplitude spectrum is measured on (the FFT of every photo cost ~0.6 ms of
# 2 CPU cores): 1,024 evenly spread Imagenette training photos give all 9,469 photos' mean
# amplitude to 3 % (relative L2; median bin 2 %), the sampling noise of amplitudes that vary
# ~100 % between photos (`benchmarks/results/scan-issue24.md`).
SPECTRUM_PHOTOS = 1024


def decode_settings(model: LoadedModel) -> dict:
    """How files are decoded: large JPEGs decode at reduced size (DCT scaling, up to 8x) while
    their shorter side stays >= the resize target, which makes decoding multi-megapixel photos
    several times faster at a negligible change in pixels; images below the decoder's usable
    size or aspect limits are skipped."""
    return {"jpeg_draft_min_side": model.preprocess.resize_size, "min_side": MIN_USABLE_SIDE,
            "max_aspect": MAX_ASPECT_RATIO}


def scan_key(model: LoadedModel, images: ImageList, targets: list[Target], code_layer: str,
             mode: str, top_n: int, batch_size: int) -> str:
    """Everything a stored scan depends on: model (weights included), data, decoding, targets,
    code layer, storage mode, and the batch size (a kernel's sums, so the last bits of every
    activation, depend on it)."""
    return digest({"model": model.describe(), "images": images.fingerprint(),
                   "batch_size": batch_size,
                   "decode": decode_settings(model), "targets": [t.to_dict() for t in targets],
                   "code_layer": code_layer, "mode": mode, "top_n": top_n,
                   "spectrum": {"photos": SPECTRUM_PHOTOS},
                   "peaks": 1,
                   "layout": default_channels_last(model.device), "batchnorm": "folded"})


@dataclass(frozen=True)
class _Pass:
    """What one scan pass needs, fixed for its duration."""

    model: LoadedModel
    images: ImageList
    targets: list[Target]
    store: ScanStore
    code_layer: str
    batch_size: int
    chunk: int  # images per chunk (whole batches)
    mode: str
    top_n: int

    @property
    def n_chunks(self) -> int:
        return -(-len(self.images) // self.chunk)

    def chunk_size(self, c: int) -> int:
        return min((c + 1) * self.chunk, len(self.images)) - c * self.chunk

    @property
    def spectrum_every(self) -> int:
        """The spectrum reads every this-many-th readable image of each batch, from its first
        (`SPECTRUM_PHOTOS` in all, evenly spread; at least one per batch that has any)."""
        return max(1, len(self.images) // SPECTRUM_PHOTOS)


def scan(model: LoadedModel, images: ImageList, targets: list[Target],
         run: RunLayout | str | Path, options: ScanOptions | None = None, *,
         shard: tuple[int, int] = (0, 1), merge: bool = True,
         progress: bool = True) -> ScanResult | None:
    """Scan `images` for `targets` as `options` say; reuse or resume what the run directory
    holds for this key.

    Returns the merged result, or None when this shard finished but others are still missing
    (or `merge` is False: a worker's shard, which another process merges).
    """
    o = options or ScanOptions()
    if not targets:
        raise MfvError("no targets to scan for")
    if len(images) == 0:
        raise MfvError("the image source holds no images")
    workers = decoding_workers(model.device) if o.workers is None else o.workers
    code_layer, batch_size, chunk_batches, top_n = o.code_layer, o.batch_size, \
        o.chunk_batches, o.top_n
    index, count = shard
    if not 0 <= index < count:
        raise MfvError(f"shard {index} of {count} does not exist")
    mode = choose_mode(o.mode, len(images), len(targets))
    key = scan_key(model, images, targets, code_layer, mode, top_n, batch_size)
    store = ScanStore.under(run.root if isinstance(run, RunLayout) else run, key)
    manifest = store.manifest()
    if manifest and manifest.get("key") == key:
        if manifest.get("status") == "complete":
            return ScanResult(store, manifest)
        batch_size, chunk_batches = manifest["batch_size"], manifest["chunk_batches"]
    else:
        manifest = {
            "key": key, "status": "running", "model": model.describe(),
            "source": images.source, "fingerprint": images.fingerprint(),
            "decode": decode_settings(model),
            "images": [[item.path, item.label] for item in images],
            "targets": [t.to_dict() for t in targets], "code_layer": code_layer,
            "mode": mode, "top_n": top_n, "batch_size": batch_size,
            "chunk_batches": chunk_batches,
        }
        store.write_manifest(manifest)
    job = _Pass(model, images, targets, store, code_layer, batch_size,
                batch_size * chunk_batches, mode, top_n)
    mine = [c for c in range(index, job.n_chunks, count) if not store.chunk_done(c)]
    started = time.perf_counter()
    if mine:
        _scan_chunks(job, mine, workers, progress)
    if not merge or not all(store.chunk_done(c) for c in range(job.n_chunks)):
        return None
    result = _merge(job, manifest, time.perf_counter() - started)
    if progress:
        m = result.manifest
        log.info("scan: %d images, %d read, %d skipped, %.1f s", len(images),
                 len(images) - len(m["bad"]), len(m["bad"]), m["seconds"])
    return result


def _scan_chunks(job: _Pass, chunks: list[int], workers: int, progress: bool) -> None:
    model, images = job.model, job.images
    bank = TargetBank(job.targets)
    code_ref = resolve_layer(model, job.code_layer)
    dataset = ImageDataset(images, functools.partial(to_tensor, model.preprocess),
                           min_side=decode_settings(model)["jpeg_draft_min_side"])
    batches = [list(range(s, min(s + job.batch_size, c * job.chunk + job.chunk_size(c))))
               for c in chunks
               for s in range(c * job.chunk, c * job.chunk + job.chunk_size(c), job.batch_size)]
    device = model.device
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="scan",
               disable=not progress, smoothing=0.1)
    pending: dict[int, _Chunk] = {}
    layers = list(dict.fromkeys([*bank.layers, code_ref]))
    with layer_reader(model, layers) as read:
        for (indices, pixels, bad), batch in zip(loader, batches, strict=True):
            c = batch[0] // job.chunk
            state = pending.setdefault(c, _Chunk())
            if pixels is not None:
                pixels = pixels.to(device, non_blocking=True)
                store = {ref.key: acts for ref, acts in zip(layers, read(pixels), strict=True)}
                state.rows.append(indices.numpy())
                state.acts.append(bank(store).float().cpu().numpy())
                peaks, state.grids = bank.peaks(store)
                state.peaks.append(peaks.cpu().numpy().astype(np.int16))
                state.codes.append(store[code_ref.key].flatten(1).float().cpu().numpy())
                state.spectrum.update(pixels[::job.spectrum_every])
            state.bad += [[images[i].path, reason] for i, reason in bad]
            state.seen += len(batch)
            bar.update(len(batch))
            if state.seen == job.chunk_size(c):
                _write_chunk(job, c, pending.pop(c))
    bar.close()


class _Chunk:
    """What one chunk has gathered so far."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.acts: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []
        self.peaks: list[np.ndarray] = []
        self.grids: list = []
        self.bad: list[list[str]] = []
        self.seen = 0
        self.spectrum = AmplitudeSpectrum()


def _write_chunk(job: _Pass, c: int, state: _Chunk) -> None:
    start, size, n_targets = c * job.chunk, job.chunk_size(c), len(job.targets)
    rows = np.concatenate(state.rows) if state.rows else np.zeros(0, np.int64)
    acts = np.concatenate(state.acts) if state.acts else np.zeros((0, n_targets), np.float32)
    arrays: dict[str, np.ndarray] = {}
    spatial = any(g is not None for g in state.grids)
    if job.mode == "full":
        full = np.full((size, n_targets), np.nan, np.float32)
        full[rows - start] = acts
        arrays["acts"] = full
        if spatial:
            arrays["peaks"] = np.full((size, n_targets, 2), -1, np.int16)
            arrays["peaks"][rows - start] = np.concatenate(state.peaks)
    else:
        candidates = np.broadcast_to(rows, acts.T.shape)
        values, indices = merge_top(acts.T, candidates, job.top_n)
        arrays.update(topv=values, topi=indices)
        if spatial:
            arrays["topp"] = peaks_of_top(indices, candidates,
                                          np.concatenate(state.peaks).transpose(1, 0, 2))
    valid = np.zeros(size, bool)
    valid[rows - start] = True
    arrays["valid"] = valid
    if state.codes:
        codes = np.concatenate(state.codes)
        full_codes = np.full((size, codes.shape[1]), np.nan, np.float32)
        full_codes[rows - start] = codes
        arrays["codes"] = full_codes
        arrays.update({f"spectrum_{k}": v for k, v in state.spectrum.state().items()})
    job.store.write_chunk(c, arrays, {"chunk": c, "start": start, "size": size,
                                      "bad": state.bad, "grids": state.grids})


def _merge(job: _Pass, manifest: dict, seconds: float) -> ScanResult:
    """Fold the chunks, one at a time, into the scan's arrays: a top-N scan keeps only the
    running top-N per target in memory (targets × N), never images × targets."""
    store = job.store
    valid, codes, acts, bad, peaks = [], [], [], [], []
    spectrum = AmplitudeSpectrum()
    top: tuple[np.ndarray, np.ndarray] | None = None
    top_peaks, grids = None, None
    for c in range(job.n_chunks):
        arrays, meta = store.read_chunk(c)
        grids = grids or (meta.get("grids") if any(meta.get("grids") or ()) else None)
        none = np.full((job.chunk_size(c), len(job.targets), 2), -1, np.int16)
        valid.append(arrays["valid"])
        codes.append(arrays.get("codes"))
        bad += [{"path": p, "reason": r} for p, r in meta["bad"]]
        if "spectrum_sum" in arrays:
            spectrum.merge(AmplitudeSpectrum.from_state(
                {k.removeprefix("spectrum_"): v for k, v in arrays.items()
                 if k.startswith("spectrum_")}))
        if job.mode == "full":
            acts.append(arrays["acts"])
            peaks.append(arrays.get("peaks", none))
        else:
            pair = (arrays["topv"], arrays["topi"])
            here = arrays.get("topp", np.full((*pair[1].shape, 2), -1, np.int16))
            if top is not None:
                pair = (np.concatenate([top[0], pair[0]], axis=1),
                        np.concatenate([top[1], pair[1]], axis=1))
                here = np.concatenate([top_peaks, here], axis=1)
            top = merge_top(*pair, job.top_n)
            top_peaks = peaks_of_top(top[1], pair[1], here)
    valid = np.concatenate(valid)
    if not valid.any():  # the reasons are kept in the manifest, and the first few shown
        store.write_manifest({**manifest, "status": "unreadable", "bad": bad})
        shown = "; ".join(f"{Path(b['path']).name}: {b['reason']}" for b in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise MfvError(f"no image of {job.images.source} could be read ({shown}{more}); every "
                       f"skipped file and its reason: \"bad\" in "
                       f"{store.directory / 'manifest.json'}")
    dim = next(block.shape[1] for block in codes if block is not None)
    store.write_array("codes", np.concatenate([
        block if block is not None else np.full((job.chunk_size(c), dim), np.nan, np.float32)
        for c, block in enumerate(codes)]))
    store.write_array("valid", valid)
    store.write_array("spectrum", spectrum.result().numpy())
    if job.mode == "full":
        store.write_array("activations", np.concatenate(acts))
    else:
        store.write_array("top_values", top[0])
        store.write_array("top_indices", top[1])
    if grids:
        store.write_array("peaks" if job.mode == "full" else "top_peaks",
                          np.concatenate(peaks) if job.mode == "full" else top_peaks)
    manifest = {**manifest, "grids": grids, "status": "complete", "bad": bad,
                "n_valid": int(valid.sum()), "spectrum_photos": spectrum.count,
                "code_dim": int(dim), "seconds": manifest.get("seconds", 0.0) + seconds}
    store.write_manifest(manifest)
    store.drop_chunks()
    return ScanResult(store, manifest)

"""Stage 1, scan: one streaming pass records every target's activation and every image's code.

Output, in `RUN/scan/`: `manifest.json` (model, preprocessing, decoding, image list and its
fingerprint, targets, code layer, bad files) and plain `.npy` arrays — `activations.npy` (N, T)
or, when full vectors would not fit, a streaming top-N per target (`top_indices.npy`,
`top_values.npy`, (T, n)), `codes.npy` (N, D) and `valid.npy` (N,). Rows of undecodable images
are NaN and invalid.

The pass is cut into chunks of whole batches; each finished chunk is written atomically under
`RUN/scan/chunks/`, so a scan killed at any moment resumes from the last finished chunk and its
merged arrays equal an uninterrupted scan's. Chunks are independent units of work: `shard=(i, n)`
processes every n-th chunk, so several processes or machines can share one scan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mfv.errors import MfvError
from mfv.images import ImageDataset, collate_skip_bad
from mfv.io import atomic_save_npy, atomic_write_json, load_npy, read_json
from mfv.models import LoadedModel
from mfv.models.base import to_tensor
from mfv.sources import ImageList
from mfv.activations import TargetBank, capture
from mfv.targets import LayerRef, Target, resolve_layer

FULL_LIMIT_BYTES = 2 * 1024**3  # above this, activations are kept as a streaming top-N


@dataclass
class ScanResult:
    """A finished scan, read lazily from its directory."""

    directory: Path
    manifest: dict

    @classmethod
    def load(cls, directory: str | Path) -> ScanResult:
        directory = Path(directory)
        manifest = read_json(directory / "manifest.json")
        if manifest.get("status") != "complete":
            raise MfvError(f"the scan in {directory} is not complete; run `mfv scan` to finish it")
        return cls(directory, manifest)

    @property
    def paths(self) -> list[str]:
        return [row[0] for row in self.manifest["images"]]

    @property
    def labels(self) -> list[str | None]:
        return [row[1] for row in self.manifest["images"]]

    @property
    def targets(self) -> list[str]:
        return [t["spec"] for t in self.manifest["targets"]]

    @property
    def bad(self) -> list[dict]:
        return self.manifest["bad"]

    @functools.cached_property
    def codes(self) -> np.ndarray:
        return load_npy(self.directory / "codes.npy")

    @functools.cached_property
    def valid(self) -> np.ndarray:
        return load_npy(self.directory / "valid.npy")

    @functools.cached_property
    def activations(self) -> np.ndarray | None:
        """(N, T) activations, or None when the scan kept only a top-N per target."""
        path = self.directory / "activations.npy"
        return load_npy(path) if path.exists() else None

    def target_index(self, spec: str) -> int:
        return self.targets.index(spec)

    def top(self, target: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and values of the n valid images that activate `target` most, best first."""
        if self.activations is not None:
            values = np.where(self.valid, self.activations[:, target], -np.inf)
            order = np.argsort(-values, kind="stable")[: min(n, int(self.valid.sum()))]
            return order, values[order]
        indices = load_npy(self.directory / "top_indices.npy")[target]
        values = load_npy(self.directory / "top_values.npy")[target]
        keep = indices >= 0
        return indices[keep][:n], values[keep][:n]

    def activation_of(self, target: int, indices: np.ndarray) -> np.ndarray:
        """The target's activation on given images (from full vectors or the stored top-N)."""
        if self.activations is not None:
            return self.activations[indices, target]
        top_i = load_npy(self.directory / "top_indices.npy")[target]
        top_v = load_npy(self.directory / "top_values.npy")[target]
        lookup = dict(zip(top_i.tolist(), top_v.tolist(), strict=True))
        return np.array([lookup.get(int(i), np.nan) for i in indices], dtype=np.float32)


def scan_key(model: LoadedModel, images: ImageList, targets: list[Target], code_layer: str,
             mode: str, top_n: int) -> str:
    """What a stored scan must match to be reused: model, data, targets, code layer, storage."""
    blob = json.dumps({"model": model.describe(), "images": images.fingerprint(),
                       "decode": _decode_settings(model),
                       "targets": [t.to_dict() for t in targets], "code_layer": code_layer,
                       "mode": mode, "top_n": top_n}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _decode_settings(model: LoadedModel) -> dict:
    """How files are decoded: large JPEGs decode at reduced size (DCT scaling, up to 8x) while
    their shorter side stays >= the resize target, which makes decoding multi-megapixel photos
    several times faster at a negligible change in pixels."""
    return {"jpeg_draft_min_side": model.preprocess.resize_size}


def _choose_mode(mode: str, n_images: int, n_targets: int) -> str:
    if mode == "auto":
        return "full" if n_images * n_targets * 4 <= FULL_LIMIT_BYTES else "topn"
    if mode not in ("full", "topn"):
        raise MfvError(f"unknown scan mode {mode!r}: use auto, full or topn")
    return mode


def _merge_top(values: np.ndarray, indices: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the n largest per row (ties broken by lower image index), padded with -1/-inf."""
    order = np.lexsort((indices, -values), axis=1)[:, :n]
    top_v = np.take_along_axis(values, order, 1)
    top_i = np.take_along_axis(indices, order, 1)
    if top_v.shape[1] < n:
        pad = n - top_v.shape[1]
        top_v = np.pad(top_v, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    top_i = np.where(np.isfinite(top_v), top_i, -1)
    return top_v.astype(np.float32), top_i.astype(np.int64)


def scan(model: LoadedModel, images: ImageList, targets: list[Target], run_dir: str | Path, *,
         code_layer: str = "penultimate", batch_size: int = 32, workers: int = 1,
         chunk_batches: int = 8, mode: str = "auto", top_n: int = 200,
         shard: tuple[int, int] = (0, 1), progress: bool = True) -> ScanResult | None:
    """Scan `images` for `targets`; reuse or resume what `run_dir/scan` already holds.

    Returns the merged result, or None when this shard finished but others are still missing.
    """
    if not targets:
        raise MfvError("no targets to scan for")
    if len(images) == 0:
        raise MfvError("the image source holds no images")
    directory = Path(run_dir) / "scan"
    mode = _choose_mode(mode, len(images), len(targets))
    key = scan_key(model, images, targets, code_layer, mode, top_n)
    manifest_path = directory / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    if manifest and manifest.get("key") == key:
        if manifest.get("status") == "complete":
            return ScanResult(directory, manifest)
        batch_size, chunk_batches = manifest["batch_size"], manifest["chunk_batches"]
    else:
        _clear(directory)
        manifest = {
            "key": key, "status": "running", "model": model.describe(),
            "source": images.source, "fingerprint": images.fingerprint(),
            "decode": _decode_settings(model),
            "images": [[item.path, item.label] for item in images],
            "targets": [t.to_dict() for t in targets], "code_layer": code_layer,
            "mode": mode, "top_n": top_n, "batch_size": batch_size,
            "chunk_batches": chunk_batches,
        }
        atomic_write_json(manifest_path, manifest)
    chunk = batch_size * chunk_batches
    n_chunks = -(-len(images) // chunk)
    index, count = shard
    if not 0 <= index < count:
        raise MfvError(f"shard {index} of {count} does not exist")
    mine = [c for c in range(index, n_chunks, count) if not _chunk_done(directory, c)]
    started = time.perf_counter()
    if mine:
        _scan_chunks(model, images, targets, directory, mine, code_layer, batch_size, chunk,
                     workers, mode, top_n, progress)
    if not all(_chunk_done(directory, c) for c in range(n_chunks)):
        return None
    result = _merge(directory, manifest, n_chunks, mode, top_n, time.perf_counter() - started)
    if progress:
        m = result.manifest
        print(f"scan: {len(images)} images, {len(images) - len(m['bad'])} read, "
              f"{len(m['bad'])} skipped, {m['seconds']:.1f} s")
    return result


def _clear(directory: Path) -> None:
    for path in [*directory.glob("chunks/*"), *directory.glob("*.npy"),
                 directory / "manifest.json"]:
        path.unlink(missing_ok=True)


def _chunk_done(directory: Path, c: int) -> bool:
    return (directory / "chunks" / f"{c:06d}.json").exists()


def _code_ref(model: LoadedModel, code_layer: str) -> LayerRef:
    return resolve_layer(model, code_layer)


def _scan_chunks(model, images, targets, directory, chunks, code_layer, batch_size, chunk,
                 workers, mode, top_n, progress) -> None:
    bank = TargetBank(targets)
    code_ref = _code_ref(model, code_layer)
    dataset = ImageDataset(images, functools.partial(to_tensor, model.preprocess),
                           min_side=_decode_settings(model)["jpeg_draft_min_side"])
    batches = [list(range(s, min(s + batch_size, (c + 1) * chunk, len(images))))
               for c in chunks for s in range(c * chunk, min((c + 1) * chunk, len(images)),
                                              batch_size)]
    device = model.device
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_skip_bad,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", desc="scan", disable=not progress, smoothing=0.1)
    pending: dict[int, dict] = {}
    with capture(model, [*bank.layers, code_ref]) as store, torch.inference_mode():
        for (indices, pixels, bad), batch in zip(loader, batches, strict=True):
            c = batch[0] // chunk
            state = pending.setdefault(c, {"rows": [], "acts": [], "codes": [], "bad": [],
                                           "seen": 0})
            if pixels is not None:
                model(pixels.to(device, non_blocking=True))
                state["rows"].append(indices.numpy())
                state["acts"].append(bank(store).float().cpu().numpy())
                state["codes"].append(store[code_ref.key].flatten(1).float().cpu().numpy())
            state["bad"] += [[images[i].path, reason] for i, reason in bad]
            state["seen"] += len(batch)
            bar.update(len(batch))
            c_size = min((c + 1) * chunk, len(images)) - c * chunk
            if state["seen"] == c_size:
                _write_chunk(directory, c, pending.pop(c), c * chunk, c_size, len(targets),
                             mode, top_n)
    bar.close()


def _write_chunk(directory, c, state, start, size, n_targets, mode, top_n) -> None:
    rows = np.concatenate(state["rows"]) if state["rows"] else np.zeros(0, np.int64)
    acts = (np.concatenate(state["acts"]) if state["acts"]
            else np.zeros((0, n_targets), np.float32))
    codes = np.concatenate(state["codes"]) if state["codes"] else None
    base = directory / "chunks" / f"{c:06d}"
    if mode == "full":
        full = np.full((size, n_targets), np.nan, np.float32)
        full[rows - start] = acts
        atomic_save_npy(f"{base}.acts.npy", full)
    else:
        values, indices = _merge_top(acts.T, np.broadcast_to(rows, acts.T.shape), top_n)
        atomic_save_npy(f"{base}.topv.npy", values)
        atomic_save_npy(f"{base}.topi.npy", indices)
    valid = np.zeros(size, bool)
    valid[rows - start] = True
    atomic_save_npy(f"{base}.valid.npy", valid)
    if codes is not None:
        full_codes = np.full((size, codes.shape[1]), np.nan, np.float32)
        full_codes[rows - start] = codes
        atomic_save_npy(f"{base}.codes.npy", full_codes)
    atomic_write_json(f"{base}.json", {"chunk": c, "start": start, "size": size,
                                       "bad": state["bad"], "has_codes": codes is not None})


def _merge(directory: Path, manifest: dict, n_chunks: int, mode: str, top_n: int,
           seconds: float) -> ScanResult:
    metas = [read_json(directory / "chunks" / f"{c:06d}.json") for c in range(n_chunks)]
    base = [directory / "chunks" / f"{c:06d}" for c in range(n_chunks)]
    valid = np.concatenate([load_npy(f"{b}.valid.npy") for b in base])
    if not valid.any():
        raise MfvError("no image of the source could be read; see the skipped files in "
                       f"{directory / 'manifest.json'}")
    dim = next(load_npy(f"{b}.codes.npy").shape[1] for b, m in zip(base, metas, strict=True)
               if m["has_codes"])
    codes = np.concatenate([load_npy(f"{b}.codes.npy") if m["has_codes"]
                            else np.full((m["size"], dim), np.nan, np.float32)
                            for b, m in zip(base, metas, strict=True)])
    atomic_save_npy(directory / "codes.npy", codes)
    atomic_save_npy(directory / "valid.npy", valid)
    if mode == "full":
        atomic_save_npy(directory / "activations.npy",
                        np.concatenate([load_npy(f"{b}.acts.npy") for b in base]))
    else:
        values = np.concatenate([load_npy(f"{b}.topv.npy") for b in base], axis=1)
        indices = np.concatenate([load_npy(f"{b}.topi.npy") for b in base], axis=1)
        values, indices = _merge_top(values, indices, top_n)
        atomic_save_npy(directory / "top_values.npy", values)
        atomic_save_npy(directory / "top_indices.npy", indices)
    manifest = {**manifest, "status": "complete", "bad": [
        {"path": p, "reason": r} for m in metas for p, r in m["bad"]],
        "n_valid": int(valid.sum()), "code_dim": int(dim),
        "seconds": manifest.get("seconds", 0.0) + seconds}
    atomic_write_json(directory / "manifest.json", manifest)
    return ScanResult(directory, manifest)

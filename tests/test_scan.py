"""Scan: recorded activations and codes equal direct model calls; bad files; reuse; SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfv.core.errors import MfvError
from mfv.data.images import decoding_workers, load_rgb
from mfv.data.sources import ImageList, from_folder
from mfv.models.base import to_tensor
from mfv.models.targets import parse_targets
from mfv.scan.options import ScanOptions
from mfv.scan.scanner import ScanResult, scan

SMALL = ScanOptions(batch_size=4, chunk_batches=1, workers=0)  # several chunks of tiny batches


def _make_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = "red thing" if i % 2 else "blue thing"
        (folder / label).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40 + i % 7, 48, 3), dtype=np.uint8)
        arr[..., 0 if i % 2 else 2] = 250
        Image.fromarray(arr).save(folder / label / f"img{i:03d}.png")


def _direct(model, items):
    """Logits and penultimate features of calling the model directly on the images."""
    x = torch.stack([to_tensor(model.preprocess, load_rgb(it.path)) for it in items])
    feats = {}
    head = model.module.get_submodule(model.logits_layer)
    h = head.register_forward_hook(lambda m, i, o: feats.update(code=i[0]))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        h.remove()
    return logits.numpy(), feats["code"].numpy()


def test_decoding_workers_default_per_device(monkeypatch):
    """None on the CPU (the model's pass has every core); the host's cores but one, 1 to 8,
    with an accelerator."""
    assert decoding_workers(torch.device("cpu")) == 0
    for cores, expected in ((None, 1), (1, 1), (2, 1), (6, 5), (64, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert decoding_workers(torch.device("cuda")) == expected


def test_scan_records_logits_and_codes(tmp_path, tiny):
    _make_images(tmp_path / "imgs", 21)
    images = from_folder(tmp_path / "imgs")
    targets = parse_targets(["fc:*", "conv2:1"], tiny)
    result = scan(tiny, images, targets, tmp_path / "run",
                  ScanOptions(batch_size=4, chunk_batches=2, workers=0), progress=False)
    logits, codes = _direct(tiny, images)
    assert result.activations.shape == (21, 6) and result.codes.shape == (21, 16)
    np.testing.assert_allclose(result.activations[:, :5], logits, atol=1e-5)
    np.testing.assert_allclose(result.codes, codes, atol=1e-5)
    assert result.labels[:2] == ["blue thing", "blue thing"]
    idx, vals = result.top(2, 5)
    assert np.all(np.diff(vals) <= 0) and vals[0] == result.activations[:, 2].max()
    # a second call reuses the stored scan; another batch size (whose sums differ in their last
    # bits) or a changed input is another scan
    manifest = result.store.directory / "manifest.json"
    manifest_mtime = manifest.stat().st_mtime_ns
    again = scan(tiny, images, targets, tmp_path / "run",
                 ScanOptions(batch_size=4, chunk_batches=2, workers=0), progress=False)
    assert manifest.stat().st_mtime_ns == manifest_mtime
    np.testing.assert_array_equal(again.activations, result.activations)
    other = scan(tiny, images, targets, tmp_path / "run", ScanOptions(workers=0), progress=False)
    assert other.key != result.key
    Image.new("RGB", (30, 30), "white").save(images[0].path)
    changed = scan(tiny, from_folder(tmp_path / "imgs"), targets, tmp_path / "run",
                   ScanOptions(batch_size=4, workers=0), progress=False)
    assert not np.allclose(changed.activations[0], result.activations[0])


def test_topn_mode_equals_full_ranking(tmp_path, tiny):
    _make_images(tmp_path / "imgs", 30)
    images = from_folder(tmp_path / "imgs")
    targets = parse_targets(["fc:*"], tiny)
    full = scan(tiny, images, targets, tmp_path / "a",
                ScanOptions(batch_size=4, chunk_batches=1, workers=0, mode="full"), progress=False)
    top = scan(tiny, images, targets, tmp_path / "b",
               ScanOptions(batch_size=4, chunk_batches=1, workers=0, mode="topn", top_n=7),
               progress=False)
    assert top.activations is None
    for t in range(5):
        i_full, v_full = full.top(t, 7)
        i_top, v_top = top.top(t, 7)
        np.testing.assert_array_equal(i_full, i_top)
        np.testing.assert_allclose(v_full, v_top)


def test_bad_files_are_counted_and_listed(tmp_path, tiny):
    _make_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs/red thing/empty.jpg").write_bytes(b"")
    (tmp_path / "imgs/red thing/noise.jpg").write_bytes(os.urandom(500))
    good = tmp_path / "imgs/blue thing/img000.png"
    (tmp_path / "imgs/blue thing/cut.png").write_bytes(good.read_bytes()[:200])
    (tmp_path / "imgs/blue thing/notes.png").write_text("hello")
    images = from_folder(tmp_path / "imgs")
    result = scan(tiny, images, parse_targets(["fc:0"], tiny), tmp_path / "run",
                  ScanOptions(batch_size=3, workers=2), progress=False)
    bad = {Path(b["path"]).name: b["reason"] for b in result.bad}
    assert set(bad) == {"empty.jpg", "noise.jpg", "cut.png", "notes.png"}
    assert all(bad.values())
    assert result.valid.sum() == 6
    rows = [i for i, p in enumerate(result.paths) if Path(p).name in bad]
    assert np.isnan(result.activations[rows]).all() and not result.valid[rows].any()


def test_scan_options_refuse_bad_values_in_one_line():
    with pytest.raises(MfvError, match=r"^ScanOptions: scan_batch_size must be at least 1 "):
        ScanOptions(batch_size=0)
    with pytest.raises(MfvError, match=r"^ScanOptions: scan_mode must be one of"):
        ScanOptions(mode="half")
    assert ScanOptions(scan_batch_size=8).batch_size == 8  # the setting's flat name works too


def test_shards_merge_to_the_same_arrays(tmp_path, tiny):
    _make_images(tmp_path / "imgs", 25)
    images = from_folder(tmp_path / "imgs")
    targets = parse_targets(["fc:*"], tiny)
    whole = scan(tiny, images, targets, tmp_path / "a", SMALL, progress=False)
    assert scan(tiny, images, targets, tmp_path / "b", SMALL, progress=False,
                shard=(0, 2)) is None
    merged = scan(tiny, images, targets, tmp_path / "b", SMALL, progress=False, shard=(1, 2))
    np.testing.assert_array_equal(whole.activations, merged.activations)
    np.testing.assert_array_equal(whole.codes, merged.codes)


@pytest.mark.slow
def test_real_model_on_imagenette(imagenette, lite0, tmp_path):
    classes = sorted(p for p in imagenette.iterdir() if p.is_dir())[:2]
    images = from_folder(imagenette)
    chosen = [it for it in images.items if Path(it.path).parent in classes]
    items = tuple(chosen[:12] + chosen[-12:])
    sub = ImageList(items, "subset")
    targets = parse_targets(["_fc:*"], lite0)
    result = scan(lite0, sub, targets, tmp_path, ScanOptions(batch_size=8, workers=1),
                  progress=False)
    logits, codes = _direct(lite0, items)
    # Two float32 programs of one function: the direct pass runs torch's batch norms, the scan
    # folds them into the convolutions; each is up to ~1.1e-5 from a float64 pass on these
    # logits (measured), so they may differ by twice that.
    np.testing.assert_allclose(result.activations, logits, atol=3e-5)
    np.testing.assert_allclose(result.codes, codes, atol=3e-5)
    assert result.labels[0] == classes[0].name  # WordNet id folders give labels
    # most images have their own class in the top 5 (published top-5: ~94 %)
    wnids = np.array([lite0.classes.lookup(lbl) for lbl in result.labels])
    top5 = np.argsort(-result.activations, 1)[:, :5]
    assert np.mean((top5 == wnids[:, None]).any(1)) > 0.8


SCRIPT = textwrap.dedent("""
    import sys
    from mfv.data.sources import open_images
    from mfv.models import load_model
    from mfv.scan.options import ScanOptions
    from mfv.scan.scanner import scan
    from mfv.models.targets import parse_targets
    model = load_model("efficientnet_lite0")
    images = open_images(sys.argv[1])
    scan(model, images, parse_targets(["_fc:*", "_blocks.10:5"], model), sys.argv[2],
         ScanOptions(batch_size=4, chunk_batches=1, workers=0), progress=False)
""")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, imagenette):
    files = sorted((imagenette / "n03888257").iterdir())[:40]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(f) for f in files))
    script = tmp_path / "scan.py"
    script.write_text(SCRIPT)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(listing), str(run)])
    deadline = time.time() + 120
    while len(list(run.glob("scan/*/chunks/*.json"))) < 3 and time.time() < deadline:
        assert proc.poll() is None, "scan finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(run.glob("scan/*/chunks/*.json")))
    assert 3 <= done_before < 10
    subprocess.run([sys.executable, str(script), str(listing), str(run)], check=True)
    subprocess.run([sys.executable, str(script), str(listing), str(tmp_path / "clean")],
                   check=True)
    (resumed_dir,), (clean_dir,) = (run / "scan").iterdir(), (tmp_path / "clean/scan").iterdir()
    assert resumed_dir.name == clean_dir.name  # the same key
    resumed, clean = ScanResult.load(resumed_dir), ScanResult.load(clean_dir)
    np.testing.assert_array_equal(resumed.activations, clean.activations)
    np.testing.assert_array_equal(resumed.codes, clean.codes)
    assert resumed.manifest["images"] == clean.manifest["images"]


def test_the_spectrum_is_measured_on_an_even_sample(tmp_path, tiny, monkeypatch):
    """With `SPECTRUM_PHOTOS` below the collection, the stored spectrum is the mean over every
    `spectrum_every`-th image of each batch (bad files skipped), and the manifest says how many."""
    import mfv.scan.scanner as scanner
    from mfv.data.spectrum import AmplitudeSpectrum

    _make_images(tmp_path / "imgs", 22)
    (tmp_path / "imgs/red thing/noise.jpg").write_bytes(os.urandom(500))
    images = from_folder(tmp_path / "imgs")
    targets = parse_targets(["fc:0"], tiny)
    monkeypatch.setattr(scanner, "SPECTRUM_PHOTOS", 7)  # 23 // 7: every 3rd of each batch
    result = scan(tiny, images, targets, tmp_path / "run",
                  ScanOptions(batch_size=5, chunk_batches=2, workers=0), progress=False)
    good = [i for i, it in enumerate(images) if it.path.endswith(".png")]
    batches = [[i for i in range(s, min(s + 5, len(images))) if i in good]
               for s in range(0, len(images), 5)]
    sample = [i for b in batches for i in b[::3]]
    expected = AmplitudeSpectrum()
    expected.update(torch.stack([to_tensor(tiny.preprocess, load_rgb(images[i].path))
                                 for i in sample]))
    assert result.manifest["spectrum_photos"] == len(sample) < len(good)
    np.testing.assert_allclose(result.spectrum, expected.result().numpy(), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(scanner, "SPECTRUM_PHOTOS", 1024)  # another key: every image
    every = scan(tiny, images, targets, tmp_path / "run",
                 ScanOptions(batch_size=5, chunk_batches=2, workers=0), progress=False)
    assert every.key != result.key and every.manifest["spectrum_photos"] == len(good)

"""Checks that need a CUDA machine (and torchvision / timm, which the CPU machines lack):
`python scripts/gpu_checks.py [--data IMAGENETTE_FOLDER]`, output in benchmarks/results/.

1. TV-Bregman on CUDA against scikit-image (mean |difference| per weight, both methods);
2. every recipe on CUDA: a batch of four against each job alone (20 steps): the first step agrees
   to float precision (TF32 convolutions), the final images drift apart (see the README);
3. `torchvision:resnet18` by name (a clear error without cached weights; random weights planted
   in the hub cache then load), `mfv layers`, and `mfv.run` on it on CUDA with a class,
   two hidden channels and two recipes;
4. `timm:NAME` offline: a clear error, fast; a timm ViT module with token targets (cls, mean)
   rendered on CUDA.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from skimage import data, transform
from skimage.restoration import denoise_tv_bregman

import mfv.runtime.pipeline
from mfv.cli import main as cli
from mfv.core.errors import MfvError
from mfv.models import Preprocess, load_model
from mfv.models.targets import parse_targets
from mfv.render.batch import Job, RenderOptions, render_batches
from mfv.render.tv import tv_bregman

DEVICE = torch.device("cuda")


def check(name: str, fn: Callable[[], None]) -> None:
    print(f"\n=== {name}", flush=True)
    try:
        fn()
        print(f"=== {name}: OK")
    except Exception:  # noqa: BLE001 - report and go on to the next check
        traceback.print_exc()
        print(f"=== {name}: FAILED")


def tv_against_skimage() -> None:
    img = transform.resize(data.astronaut(), (227, 227), anti_aliasing=True) * 255.0
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 12, img.shape), 0, 255)
    weights = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0]
    x = torch.from_numpy(np.stack([noisy] * len(weights))).permute(0, 3, 1, 2).float().to(DEVICE)
    refs = [denoise_tv_bregman(noisy, weight=w, max_num_iter=100, eps=1e-3, channel_axis=None)
            for w in weights]
    for method in ("exact", "fast"):
        out = tv_bregman(x, torch.tensor(weights, device=DEVICE), method=method).cpu().numpy()
        diffs = [float(np.abs(o.transpose(1, 2, 0) - r).mean()) for o, r in zip(out, refs,
                                                                                  strict=True)]
        print(f"TV {method}: mean |diff| vs skimage per weight", [round(d, 4) for d in diffs])
        assert max(diffs) <= 0.5


def batch_against_alone() -> None:
    model = load_model("efficientnet_lite0", device=DEVICE)
    targets = parse_targets(["tench", "_blocks.10:5", "_fc:701 + _fc:0"], model)
    photos = np.stack([transform.resize(getattr(data, n)(), (224, 224)) * 255
                       for n in ("chelsea", "coffee")])
    starts = torch.from_numpy(photos).permute(0, 3, 1, 2).float()
    jobs = [Job(0, starts[0], 1), Job(1, starts[1], 2), Job(2, None, 3), Job(0, None, 4)]
    for recipe in ("paper-mean", "paper-center", "fourier"):
        together = render_batches(model, targets, jobs, recipe, RenderOptions(steps=20),
                                  batch_size=4,
                                  progress=False)
        alone = [render_batches(model, targets, [j], recipe, RenderOptions(steps=20),
                                progress=False)[0]
                 for j in jobs]
        diff = [np.abs(a.image.astype(int) - b.image.astype(int))
                for a, b in zip(together, alone, strict=True)]
        # relative: cuDNN convolutions run in TF32 by default (about 1e-3 relative precision)
        first = max(abs(float(a.trace[0]) - float(b.trace[0])) / max(abs(float(b.trace[0])), 1)
                    for a, b in zip(together, alone, strict=True))
        print(f"{recipe}: first-step objective, relative difference {first:.1e}; final images "
              f"differ by max {max(float(d.max()) for d in diff)}, mean "
              f"{max(float(d.mean()) for d in diff):.2f} grey levels (20 steps)")
        assert first < 1e-3


def torchvision_by_name(images: Path) -> None:
    import torchvision

    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cache.exists():
        try:
            load_model("torchvision:resnet18")
            raise AssertionError("expected a clear error without cached weights")
        except MfvError as exc:
            print("without cached weights:", exc)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), cache)
        print("planted random weights at", cache)
    model = load_model("torchvision:resnet18", device=DEVICE)
    print(model.name, model.preprocess, model.logits_layer, len(model.classes), model.device)
    assert model.logits_layer == "fc" and len(model.classes) == 1000
    cli(["layers", "torchvision:resnet18"])
    with tempfile.TemporaryDirectory() as out:
        results = mfv.run(
            model="torchvision:resnet18", images=str(images), out=out, device="cuda",
            targets=["tench", "layer4:17", "layer3.1.conv2:5"], facets=2, mean_of=4, steps=20,
            recipes=["paper-mean", "fourier"], judges=[], progress=False, until="report").to_dict()
        for t in results["targets"]:
            print(t["spec"], t["selection"], [
                (f["size"], {r: round(v["activation"], 3) for r, v in
                             f["visualizations"].items()}) for f in t["facets"]])
        assert all(v == "done" for v in results["stages"].values()), results["stages"]


def timm_models() -> None:
    import timm

    start = time.perf_counter()
    try:
        load_model("timm:resnet18")
        raise AssertionError("expected a clear error offline")
    except MfvError as exc:
        print(f"timm:resnet18 offline, error after {time.perf_counter() - start:.1f} s:",
              str(exc)[:160])
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model = load_model(vit, device=DEVICE, preprocess=Preprocess(input_size=224,
                                                                 resize_size=248))
    targets = parse_targets(["blocks.6:3"], model, reduction="cls") + \
        parse_targets(["blocks.6.mlp.fc1:10"], model, reduction="mean")
    jobs = [Job(0, None, 1), Job(1, None, 2), Job(0, torch.full((3, 224, 224), 120.0), 3)]
    for recipe in ("paper-mean", "fourier"):
        out = render_batches(model, targets, jobs, recipe, RenderOptions(steps=20), progress=False)
        print(recipe, "(first, final):",
              [(round(float(r.trace[0]), 3), round(r.activation, 3)) for r in out])
        assert all(r.activation > r.trace[0] for r in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" /
                        "imagenette-train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp)
        for wnid in ("n01440764", "n03888257"):  # tench, parachute: 20 photos each
            (images / wnid).mkdir()
            for f in sorted((args.data / wnid).iterdir())[:20]:
                shutil.copy(f, images / wnid / f.name)
        check("TV-Bregman on CUDA vs scikit-image", tv_against_skimage)
        check("batch vs one by one on CUDA", batch_against_alone)
        check("torchvision:resnet18 by name, mfv run on CUDA",
              lambda: torchvision_by_name(images))
        check("timm: offline error, ViT token targets on CUDA", timm_models)


if __name__ == "__main__":
    main()

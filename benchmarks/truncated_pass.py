"""Steps of hidden units' pictures with the pass ending at the unit's layer, against the full
pass (issue 24: the default recipe at the model's pace; `capture(..., stop=True)`).

Usage: python benchmarks/truncated_pass.py [--blocks _blocks.2 _blocks.5 _blocks.10 _blocks.14]
       [--recipes fourier anchored] [--batch 8] [--steps 8] [--rounds 3]
       [--out benchmarks/results/truncated-pass.md]

Per block and recipe, `batch` channels of the block (`--reduction max`) are rendered from
photo starts for `steps` steps, once as the library does it (the target's pass ends at the
unit's layer) and once with every pass run to the end (`capture`'s `stop` ignored), back to
back in each of `rounds` rounds; the medians of the seconds a step and of the per-round ratio
are printed. The anchored pictures are made at the unit's scale (a 48-96 px view, as
`--region patch` facets are), so each of their steps is the target's pass on the view plus
the code-and-matching pass on the canvas, which reads the penultimate and is never cut short.
The stopped and full renders' pictures are compared (they must be equal up to float noise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import mfv.models.activations as activations
from mfv.core.allocator import keep_freed_memory
from mfv.core.io import atomic_write_text
from mfv.data.images import load_rgb
from mfv.data.sources import from_folder
from mfv.models import load_model
from mfv.models.base import to_tensor
from mfv.models.targets import parse_targets, resolve_layer
from mfv.render.anchor import Anchor
from mfv.render.batch import Job, render_batches
from mfv.render.options import RenderOptions

HERE = Path(__file__).resolve().parent
SIDES = {"_blocks.2": 48, "_blocks.5": 48, "_blocks.10": 96, "_blocks.14": 96}  # patch sides


@contextmanager
def full_passes() -> Iterator[None]:
    """Every `capture` in this process runs its passes to the end (`stop` ignored)."""
    original = activations.capture

    @contextmanager
    def capture(model, layers, *, stop: bool = False):
        with original(model, layers) as store:
            yield store

    modules = [m for m in list(sys.modules.values())
               if getattr(m, "capture", None) is original]
    for m in modules:
        m.capture = capture
    try:
        yield
    finally:
        for m in modules:
            m.capture = original


def render(model, block: str, recipe: str, photos: torch.Tensor, codes: np.ndarray,
           batch: int, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds a step (the render's wall time over its steps) and the pictures."""
    targets = parse_targets([f"{block}:{c}" for c in range(batch)], model, reduction="max")
    jobs = []
    for b in range(batch):
        anchor = None
        if recipe == "anchored":
            refs = [(b + j) % len(photos) for j in range(4)]
            anchor = Anchor(codes[refs].mean(0), 1.0, 10.0, photos[refs].numpy())
        jobs.append(Job(b, photos[b % len(photos)], b, anchor,
                        SIDES.get(block) if recipe == "anchored" else None))
    start = time.perf_counter()
    results = render_batches(model, targets, jobs, recipe, RenderOptions(steps=steps),
                             batch_size=batch, progress=False)
    seconds = (time.perf_counter() - start) / steps
    return seconds, torch.stack([torch.as_tensor(r.image).float() for r in results])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get(
        "MFV_SHARED_DATA", HERE.parents[1] / "shared" / "data")) / "imagenette-train")
    ap.add_argument("--blocks", nargs="+", default=list(SIDES))
    ap.add_argument("--recipes", nargs="+", default=["fourier", "anchored"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "truncated-pass.md")
    args = ap.parse_args()
    keep_freed_memory()
    model = load_model("efficientnet_lite0")
    items = list(from_folder(args.data))[::97][:args.batch]
    photos = torch.stack([to_tensor(model.preprocess, load_rgb(it.path)) for it in items]) * 255
    code = resolve_layer(model, "penultimate")  # the code the anchors pull towards
    with activations.capture(model, [code]) as store, torch.no_grad():
        model(photos / 255)
        codes = store[code.key].flatten(1).numpy()
    rows = ["| block | recipe | stopped s/step | full s/step | full / stopped | max picture "
            "difference (0..255) |", "|---|---|---|---|---|---|"]
    print(rows[0])
    for block in args.blocks:
        for recipe in args.recipes:
            stopped, full, ratios, diff = [], [], [], 0.0
            render(model, block, recipe, photos, codes, args.batch, 2)  # warm-up
            for _ in range(args.rounds):
                s, pictures = render(model, block, recipe, photos, codes, args.batch, args.steps)
                with full_passes():
                    f, reference = render(model, block, recipe, photos, codes, args.batch,
                                          args.steps)
                stopped.append(s)
                full.append(f)
                ratios.append(f / s)
                diff = max(diff, float((pictures - reference).abs().max()))
            row = (f"| `{block}` | {recipe} | {statistics.median(stopped):.3f} | "
                   f"{statistics.median(full):.3f} | **{statistics.median(ratios):.2f}** | "
                   f"{diff:.3g} |")
            print(row, flush=True)
            rows.append(row)
    load = os.getloadavg()
    text = "\n".join([
        "# Hidden units' steps with the pass ending at the unit's layer", "",
        f"    python benchmarks/truncated_pass.py --batch {args.batch} --steps {args.steps} "
        f"--rounds {args.rounds}", "",
        f"EfficientNet-Lite0, batch {args.batch}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, load average at the end {load[0]:.1f}; medians over "
        f"{args.rounds} rounds, stopped and full back to back in each.", "", *rows, ""])
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

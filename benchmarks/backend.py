"""The same run on the local backend and on Ray with 1 and 2 workers: wall time per stage and
the speed-ups, plus the per-unit costs a cluster plan needs.

Usage: python benchmarks/backend.py [--per-class 64] [--steps 64] [--workers 1 2]
           [--data ../shared/data/imagenette-train] [--out .tmp/bench-backend]

One run: Lite0 on the first `--per-class` photos of tench and parachute, four targets (two class
logits, their sum, a hidden channel), 2 facets each, the default recipe (anchored) at `--steps`,
its random starts, no transferability judges. Each configuration starts from an empty run
directory; Ray's times include starting its workers (each loads the model), on a local Ray
instance of as many CPUs as the machine has. Ray workers run torch with one thread each (one
core per worker); the local backend uses torch's default threads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

import mfv

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-train"
CLASSES = ("n01440764", "n03888257")  # tench, parachute
TARGETS = ["tench", "parachute", "_fc:0 + _fc:701", "_blocks.10:37"]
STAGES = ("scan", "facets", "render", "evaluate")


def image_list(data: Path, per_class: int, out: Path) -> Path:
    paths = [p for c in CLASSES for p in sorted((data / c).iterdir())[:per_class]]
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "images.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    return listing


def one_run(backend: str, workers: int | None, images: Path, out: Path, steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    extra = {"ray_workers": workers} if backend == "ray" else {}
    started = time.perf_counter()
    results = mfv.run(model="efficientnet_lite0", images=str(images), out=str(out),
                      targets=TARGETS, facets=2, mean_of=10, steps=steps, judges=[],
                      device="cpu", progress=False, backend=backend, seed=0, **extra).to_dict()
    wall = time.perf_counter() - started
    if backend == "ray":
        import ray

        ray.shutdown()
    assert results["status"] == "complete", results["status"]
    timings = results.get("timings") or {}
    pictures = sum(len(f["visualizations"]) for t in results["targets"] for f in t["facets"])
    pictures += sum(len(b) for t in results["targets"] for b in t["baselines"].values())
    activations = [v["activation"] for t in results["targets"] for f in t["facets"]
                   for v in f["visualizations"].values()]
    return {"wall": wall, "timings": timings, "pictures": pictures,
            "images": results["data"]["n_images"], "activations": activations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=ROOT / ".tmp" / "bench-backend")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    images = image_list(args.data, args.per_class, args.out)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start")
    configs = [("local", None)] + [("ray", w) for w in args.workers]
    runs = {}
    for backend, workers in configs:
        name = backend if workers is None else f"ray x{workers}"
        runs[name] = one_run(backend, workers, images, args.out / name.replace(" ", ""),
                             args.steps)
        print(f"{name}: {runs[name]['wall']:.1f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print()
    print("| backend | wall s | " + " | ".join(f"{s} s" for s in STAGES) + " |")
    print("|---" * (2 + len(STAGES)) + "|")
    for name, r in runs.items():
        cells = " | ".join(f"{r['timings'].get(s, float('nan')):.1f}" for s in STAGES)
        print(f"| {name} | {r['wall']:.1f} | {cells} |")
    base = f"ray x{args.workers[0]}"
    for w in args.workers[1:]:
        name = f"ray x{w}"
        print(f"speed-up {name} over {base}: {runs[base]['wall'] / runs[name]['wall']:.2f}x "
              f"(render {runs[base]['timings']['render'] / runs[name]['timings']['render']:.2f}x)")
    last = f"ray x{args.workers[-1]}"
    print(f"speed-up {last} over local: {runs['local']['wall'] / runs[last]['wall']:.2f}x")
    same = max(abs(a - b) for a, b in zip(runs["local"]["activations"],
                                          runs[last]["activations"], strict=True))
    print(f"largest activation difference local vs {last}: {same:.2e}")
    local = runs["local"]
    n_targets = len(TARGETS)
    print()
    print(f"per-unit costs (local backend, this machine): scan "
          f"{1000 * local['timings']['scan'] / local['images']:.1f} ms/image; facets "
          f"{local['timings']['facets'] / n_targets:.2f} s/target; render "
          f"{local['timings']['render'] / local['pictures']:.2f} s/picture at {args.steps} steps "
          f"({local['pictures']} pictures); evaluate "
          f"{local['timings']['evaluate'] / n_targets:.2f} s/target")


if __name__ == "__main__":
    main()

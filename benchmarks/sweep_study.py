"""The layer study's two costs that grow with `--units` (issue 24): coding the items (crops
and photos, by the swept network and the independent one) and clustering the sets (units,
chance sets, constructed units), timed on real photos; then the projection of a whole sweep.

Usage: python benchmarks/sweep_study.py [--crops 256] [--sets 24] [--top-n 200]
       [--items 81500] [--n-sets 3114] [--scan-s 300] [--processes 2] [--code-batch 8 16]
       python benchmarks/sweep_study.py --count RUN [--units all] [--top-n 200]
       python benchmarks/sweep_study.py --table RUN

`--table RUN`: no timing; a finished sweep's `sweep.json` as a Markdown table per layer (its
units' means against the layer's chance level, the calibration's difference with its 95 %
interval, where each measure has power) and its answer, with the timings it recorded.

`--count RUN`: no timing; the distinct items (crops and photos) a sweep with `--units` would
code over the scan stored in RUN (a sweep's run directory), per layer, as the sweep lists them,
and the inner squares of larger crops that are not items themselves (coded once more).

Crops: `mfv.study.seen.code_items` on `--crops` centre crops (48 and 96 px) of Imagenette
photos, Lite0 (the clustering's code, as `mfv run --region patch`) + Lite2 (the independent
code), in one process (two threads) and over `--processes` (one thread each) at each
`--code-batch` crops a pass, side by side, with the peak PSS of this process and of a worker.
Sets: `mfv.study.measures.measure_set` (automatic k, t-SNE) on `--sets` sets of
`--top-n` of those codes, in one process and over `--processes` (`parallel_map`). The
projection is scan + items x seconds per item + sets x seconds per set (parallel): pass the
counts of the sweep to project (`--items`: distinct crops and photos, as `timings.items` of a
sweep.json or benchmarks' count; `--n-sets`: units + 10 chance sets and up to 8 constructed
units per layer). Prints one line per measurement with the load average.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from mfv.core.allocator import keep_freed_memory
from mfv.facets.patches import peak_boxes
from mfv.models import load_model
from mfv.models.targets import resolve_layer
from mfv.study.measures import measure_set, parallel_map
from mfv.study.seen import CODE_BATCH, Items, code_items
from recovery import cell, markdown

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MFV_SHARED_DATA", ROOT.parent / "shared" / "data"))


class _Photos:
    """The little of a scan `code_items` reads: paths and (for whole photos) codes."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.codes = np.zeros((len(paths), 1280), np.float32)


class _PeakMemory:
    """The peak PSS of this process and of its largest child process (a coding worker), sampled
    every 0.2 s by a thread while the block runs (psutil)."""

    def __enter__(self) -> _PeakMemory:
        self.own = self.worker = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._done.wait(0.2):
            try:
                self.own = max(self.own, me.memory_full_info().pss)
                for child in me.children(recursive=True):
                    self.worker = max(self.worker, child.memory_full_info().pss)
            except psutil.Error:
                continue

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()


def count(out: str, units: str, top_n: int) -> None:
    """Print the items a sweep with `units` would code over the scan stored in `out`."""
    from mfv.models.targets import parse_targets
    from mfv.runtime.rundir import RunDir
    from mfv.runtime.settings import make_settings
    from mfv.scan.scanner import ScanResult
    from mfv.study.layers import _all_boxes, _how_seen, _sampled_units, choose_layers
    from mfv.study.seen import _crop_jobs, table

    run = RunDir(out)
    result = ScanResult.load(run.scan(next((run.root / "scan").iterdir()).name))
    model = load_model("efficientnet_lite0")
    s = make_settings(units=units if units == "all" else int(units), top_n=top_n, out=out,
                      progress=False)
    layers = choose_layers(model, "auto")
    targets = parse_targets([f"{x}:*" for x in layers], model, s.reduction, s.activation)
    per = _sampled_units(s, result, layers)
    seen = _how_seen(run, s, model, result, per, targets)
    todo = [u for x in layers for u in per[x]]
    boxes = _all_boxes(s, model, result, todo, seen, targets)
    items, _ = table([u.rows for u in todo], boxes)
    crops = np.flatnonzero(~items.whole)
    jobs = _crop_jobs(items, crops, model.preprocess.input_size)
    print(f"units {len(todo)}, slots {sum(len(u.rows) for u in todo)}, items {len(items)}, "
          f"crops {len(crops)}; of them larger than the inner square {len(jobs.larger)}, whose "
          f"inner squares are {len(jobs.rows) - jobs.items} more crops to code (the others are "
          f"items)")
    for x in layers:
        mine = [i for i, u in enumerate(todo) if u.layer == x]
        here, _ = table([todo[i].rows for i in mine], [boxes[i] for i in mine])
        print(f"{x}: {seen[x].region} {seen[x].side or ''} units {len(mine)} items {len(here)}")


def table(out: str) -> None:
    """Print a finished sweep's results per layer and its answer (Markdown)."""
    import json

    doc = json.loads((Path(out) / "sweep" / "sweep.json").read_text())
    names = {"k": "k", "polysemanticity": "1 − MonoScore", "separation": "separation"}
    header = ["layer", "seen", "units", "pairs"]
    for n in names.values():
        header += [f"{n}: units / chance", f"{n}: two − one kind (95 % CI)"]
    rows = []
    for e in doc["layers"]:
        cells = []
        for key in names:
            c, cal = e["chance"][key], e["calibration"]["measures"][key]
            cells.append(f"{cell(e['summary'][key]['mean'])} / {cell(c['mean'])}")
            mark = "**power**" if cal["power"] else "no power"
            cells.append(f"{cell(cal['difference'], 3)} ({cell(cal['low'], 3)}, "
                         f"{cell(cal['high'], 3)}) {mark}" if cal["pairs"] else "–")
        aris = [t["kind_ari"] for t in e["calibration"]["two_kind"]]
        seen = f"patch {e['patch_side']} px" if e["region"] == "patch" else "photo"
        rows.append([f"`{e['layer']}`", seen, str(len(e["units"])), str(len(aris)), *cells,
                     cell(float(np.mean(aris)) if aris else None)])
    print(markdown([*header, "kind ARI"], rows))
    layers = len(doc["layers"])
    for key, label in names.items():
        a = doc["answer"][key]
        power = a.get("with_power", {})
        print(f"\n{label}: slope {cell(a['slope'], 4)} per layer (95 % CI {cell(a['low'], 4)} "
              f"to {cell(a['high'], 4)}), first quarter {cell(a.get('first_quarter'), 3)}, last "
              f"{cell(a.get('last_quarter'), 3)}, chance {cell(a.get('chance'), 3)}; power at "
              f"{len(power.get('layers', []))}/{layers} layers, over them slope "
              f"{cell(power.get('slope'), 4)} ({cell(power.get('low'), 4)} to "
              f"{cell(power.get('high'), 4)})")
    distinct = [(t["separation"] > e["chance"]["separation"]["mean"],
                 t["separation"] > e["chance"]["separation"]["mean"]
                 + 2 * e["chance"]["separation"]["std"])
                for e in doc["layers"] for t in e["calibration"]["two_kind"]
                if t["separation"] is not None and e["chance"]["separation"]["mean"] is not None]
    if distinct:
        above, clearly = np.sum(distinct, axis=0)
        print(f"\nconstructed two-kind units whose facets' separation (independent embedding) is "
              f"above their layer's chance level: {above}/{len(distinct)} "
              f"({100 * above / len(distinct):.0f} %); above chance + 2 sd: {clearly} "
              f"({100 * clearly / len(distinct):.0f} %)")
    print(f"\ntimings: {doc['timings']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", help="a sweep's run directory: count its items, time nothing")
    ap.add_argument("--table", help="a finished sweep's run directory: print its results")
    ap.add_argument("--units", default="all")
    ap.add_argument("--crops", type=int, default=256)
    ap.add_argument("--sets", type=int, default=24)
    ap.add_argument("--top-n", type=int, default=200)
    ap.add_argument("--items", type=int, default=0, help="items of the sweep to project")
    ap.add_argument("--n-sets", type=int, default=0, help="sets of the sweep to project")
    ap.add_argument("--scan-s", type=float, default=0.0, help="its scan's seconds")
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--code-batch", type=int, nargs="+", default=[CODE_BATCH],
                    help="crops a network pass in the coding workers, side by side")
    ap.add_argument("--data", type=Path, default=DATA / "imagenette-train")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    if args.count:
        count(args.count, args.units, args.top_n)
        return
    keep_freed_memory()  # as the `mfv` command does (and the coding workers do)
    paths = sorted(str(p) for p in args.data.glob("*/*.JPEG"))
    rng = np.random.default_rng(0)
    photos = [paths[i] for i in rng.choice(len(paths), args.crops // 2, replace=False)]
    model, embedder = load_model("efficientnet_lite0"), load_model("efficientnet_lite2")
    rows = np.repeat(np.arange(len(photos)), 2)
    boxes = np.concatenate([peak_boxes(np.array([[112.0, 112.0]]), side, 224)
                            for side in (48, 96)] * len(photos))
    items = Items(rows, boxes)
    per_item = {}
    runs = [("one process", 1, CODE_BATCH),
            *((f"parallel #{i + 1}, {b} a pass", args.processes, b)
              for i, b in enumerate(args.code_batch))]
    for label, processes, batch in runs:
        load = os.getloadavg()[0]
        t = time.perf_counter()
        with _PeakMemory() as memory:
            codes, other = code_items(model, embedder, _Photos(photos), items,
                                      resolve_layer(model, "penultimate"), processes=processes,
                                      batch=batch)
        per_item[label] = (time.perf_counter() - t) / len(items)
        print(f"items: {len(items)} crops coded in {per_item[label] * len(items):.1f} s = "
              f"{per_item[label] * 1000:.0f} ms per crop (Lite0 + Lite2), {label} ({processes} "
              f"processes; load {load:.1f} -> {os.getloadavg()[0]:.1f}); peak PSS of this "
              f"process {memory.own / 1e9:.2f} GB, of each worker {memory.worker / 1e9:.2f} GB",
              flush=True)
    for label, _, _ in runs[1:]:
        print(f"items: one process / {label} = "
              f"{per_item['one process'] / per_item[label]:.2f}x", flush=True)
    per_item = per_item[runs[-1][0]]
    tasks = []
    for i in range(args.sets):
        chosen = rng.choice(len(items), min(args.top_n, len(items)), replace=False)
        tasks.append((codes[chosen], other[chosen], np.sort(rng.random(len(chosen)))[::-1],
                      i, 15, "tsne", f"set {i}"))
    timing = {}
    for label, processes in (("serial", 1), ("parallel", args.processes)):
        load = os.getloadavg()[0]
        t = time.perf_counter()
        list(parallel_map(measure_set, tasks, processes, size=10**9))
        timing[label] = (time.perf_counter() - t) / len(tasks)
        print(f"sets: {len(tasks)} x {args.top_n} items, {label} ({processes} processes): "
              f"{timing[label]:.2f} s per set (load {load:.1f} -> {os.getloadavg()[0]:.1f})",
              flush=True)
    if args.items or args.n_sets:
        total = args.scan_s + args.items * per_item + args.n_sets * timing["parallel"]
        print(f"projection: scan {args.scan_s:.0f} s + {args.items} items x {per_item:.3f} s + "
              f"{args.n_sets} sets x {timing['parallel']:.2f} s = {total / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Facet recovery on neurons multifaceted by construction, on whole Imagenette classes.

Usage: python benchmarks/recovery.py [--pairs 5] [--per-class N] [--out .tmp/bench-recovery]
       [--data ../shared/data/imagenette-train] [--device cpu] [--workers 1] [--seed 0]

For each pair of classes (A, B) the target "_fc:A + _fc:B" of EfficientNet-Lite0 is clustered
over all photos of A and B (selection "class"), through mfv's pipeline: one scan of every class
involved, then the facets stage with k=2 and with k="auto". Prints, per pair, the agreement of
the facets with the true classes (adjusted Rand index, NMI, purity), the automatic k with its
facet sizes and the purity of its least pure facet, and the clustering time (PCA + t-SNE +
k-means, in this run); the table is also written to benchmarks/results/recovery.md. The run
directory keeps the scan, so a second run does not scan again.
Acceptance (issue 4): ARI >= 0.9 with k=2; auto k in 2..4 with every facet >= 95 % one class.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import mfv
from mfv.core.io import atomic_write_text
from mfv.evaluate.metrics import recovery
from mfv.models.classes import imagenet_classes
from mfv.runtime.rundir import RunDir
from mfv.scan.scanner import ScanResult

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenette-train"
RESULTS = ROOT / "benchmarks" / "results"
# Pairs of Imagenette folders (WordNet ids); the first three are issue 4's examples.
PAIRS = (
    ("n01440764", "n03888257"),  # tench + parachute
    ("n03028079", "n03445777"),  # church + golf ball
    ("n03394916", "n03425413"),  # French horn + gas pump
    ("n02102040", "n02979186"),  # English springer + cassette player
    ("n03000684", "n03417042"),  # chain saw + garbage truck
)


def spread(items: Sequence, n: int | None) -> list:
    """n items evenly spaced over the sequence, first and last included (all when n is None)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def link_classes(data: Path, wnids: Sequence[str], root: Path, per_class: int | None) -> Path:
    """A class-subfolder tree of links to `per_class` photos of each class (all when None).

    The photos are spread evenly over the sorted folder: its first files are ImageNet validation
    photos (`ILSVRC2012_val_*`), not a typical sample of the class. Rebuilt only where it
    differs, so the scan's image fingerprint (and the stored scan) holds.
    """
    for wnid in wnids:
        source = data / wnid
        if not source.is_dir():
            raise SystemExit(f"class folder not found: {source}")
        files = spread(sorted(source.iterdir()), per_class)
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {f.name for f in files}
        for stale in set(os.listdir(folder)) - wanted:
            (folder / stale).unlink()
        for f in files:
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
    for extra in {p.name for p in root.iterdir()} - set(wnids):
        for link in (root / extra).iterdir():
            link.unlink()
        (root / extra).rmdir()
    return root


def pair_target(pair: Sequence[str], logits_layer: str = "_fc") -> str:
    """'_fc:A + _fc:B' for two class folders named by WordNet id (ImageNet-1k indices)."""
    classes = imagenet_classes()
    return " + ".join(f"{logits_layer}:{classes.lookup(wnid)}" for wnid in pair)


def facet_labels(target: dict, classes) -> tuple[np.ndarray, np.ndarray]:
    """From a results.json target: each selected photo's true class and facet."""
    return (np.array([classes.lookup(p["label"]) for p in target["map"]]),
            np.array([p["facet"] for p in target["map"]]))


def class_purities(assignment: np.ndarray, truth: np.ndarray) -> list[float]:
    """Per facet, the share of its members from its most common class."""
    out = []
    for rank in np.unique(assignment):
        members = truth[assignment == rank]
        out.append(float(np.bincount(np.unique(members, return_inverse=True)[1]).max()
                         / len(members)))
    return out


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load avg {os.getloadavg()[0]:.1f}")


def finite_mean(values: Sequence[float | None]) -> float:
    """The mean of the values that are numbers (None and NaN left out); NaN when none is."""
    kept = [float(v) for v in values if v is not None and not np.isnan(float(v))]
    return float(np.mean(kept)) if kept else float("nan")


def cell(value: float | None, digits: int = 2, percent: bool = False) -> str:
    """A table cell: "–" for None or NaN, else the value to `digits` places or as a
    percentage."""
    if value is None or np.isnan(value):
        return "–"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plain(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in [header, *rows])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=int, default=len(PAIRS), help=f"1..{len(PAIRS)}")
    ap.add_argument("--per-class", type=int, default=None, help="photos per class (all)")
    ap.add_argument("--out", type=Path, default=ROOT / ".tmp" / "bench-recovery")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="do not write results/recovery.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    pairs = PAIRS[:args.pairs]
    images = link_classes(args.data, [w for p in pairs for w in p], args.out / "images",
                          args.per_class)
    base = {"images": str(images), "out": str(args.out / "run"), "selection": "class",
            "mean_of": 15, "device": args.device, "workers": args.workers, "seed": args.seed,
            "progress": False}
    targets = [pair_target(p) for p in pairs]
    run = RunDir(args.out / "run")
    previous = run.read_record("results") if run.results_file.exists() else None
    results = {k: mfv.run(**base, targets=targets, facets=k, until="facets").to_dict()
               for k in (2, "auto")}
    found = {k: r["targets"] for k, r in results.items()}
    key = results[2]["data"]["scan_key"]
    reused = previous is not None and (previous.get("data") or {}).get("scan_key") == key
    scan = ScanResult.load(run.scan(key))
    scan_s = scan.manifest["seconds"]
    classes = imagenet_classes()
    names = classes.names
    header = ["pair", "n", "ARI k=2", "NMI k=2", "purity k=2", "auto k", "auto sizes",
              "min purity auto", "ARI auto", "s k=2", "s auto"]
    rows = []
    for i, target in enumerate(targets):
        two, auto = found[2][i], found["auto"][i]
        truth, assignment = facet_labels(two, classes)
        truth_auto, assignment_auto = facet_labels(auto, classes)
        fixed = recovery(assignment, truth)
        pair = " + ".join(names[int(t.split(":")[1])] for t in target.split(" + "))
        rows.append([
            pair, str(len(truth)), f"{fixed['ari']:.3f}", f"{fixed['nmi']:.3f}",
            f"{fixed['purity']:.3f}", str(len(auto["facets"])),
            "/".join(str(f["size"]) for f in auto["facets"]),
            f"{min(class_purities(assignment_auto, truth_auto)):.3f}",
            f"{recovery(assignment_auto, truth_auto)['ari']:.3f}",
            f"{two['clustering']['timings']['total']:.1f}",
            f"{auto['clustering']['timings']['total']:.1f}"])
    n_images = len(scan.paths)
    lines = [f"# facet recovery, EfficientNet-Lite0 penultimate codes, t-SNE + k-means, seed "
             f"{args.seed}", f"# {machine()}",
             f"# scan: {n_images} photos of {2 * len(pairs)} classes, "
             + (f"reused from {args.out / 'run'}" if reused else f"{scan_s:.0f} s")]
    print("\n".join(lines))
    print(plain(header, rows))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/recovery.py " + " ".join(argv)
        text = "\n".join(["# Facet recovery on neurons multifaceted by construction", "",
                          f"`{command.strip()}` on {machine()}.", "",
                          f"Scan: {n_images} photos of {2 * len(pairs)} Imagenette classes "
                          f"(per class: {args.per_class or 'all'}), EfficientNet-Lite0"
                          + ("." if reused else f", {scan_s:.0f} s."),
                          "Clustering: PCA 50, t-SNE 2-D, k-means; seconds per target.", "",
                          markdown(header, rows), ""])
        atomic_write_text(RESULTS / "recovery.md", text)


if __name__ == "__main__":
    main()

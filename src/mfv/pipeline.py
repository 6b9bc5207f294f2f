"""The pipeline over one run directory: images → scan → facets → render → evaluate → report.

Each stage reads what earlier stages wrote, skips work already done with the same inputs, and
brings `RUN/results.json` and `RUN/index.html` up to date when it finishes. Calling a later stage
runs whatever earlier stages are missing.

Layout: `settings.json`, `scan/`, `facets/<slug>/` (clusters), `targets/<slug>/` (mean images and
visualizations as PNG, traces), `evaluate.json`, `results.json`, `index.html`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mfv.errors import MfvError
from mfv.facets import FacetResult, find_facets, load_facets, mean_image, save_facets, select_images
from mfv.images import load_rgb
from mfv.io import atomic_save_npy, atomic_write_bytes, atomic_write_json, load_npy, read_json
from mfv.models import LoadedModel, load_model
from mfv.models.base import to_tensor
from mfv.render.batch import Job, Result, render_batches
from mfv.scan import ScanResult, scan
from mfv.settings import Settings
from mfv.sources import ImageList, open_images
from mfv.targets import Target, parse_targets

STAGES = ("scan", "facets", "render", "evaluate", "report")


def slugify(index: int, spec: str) -> str:
    """A file-system-safe folder name for a target, unique by its index."""
    text = re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-").lower()[:40] or "target"
    return f"t{index:02d}_{text}"


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from the run seed and what is being made."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def save_png(path: Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) image in 0..255 as PNG, atomically."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(buffer, "PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _hash(key: dict, stem: str, start: np.ndarray | None = None) -> str:
    """Identity of one visualization: settings, which one, and its start image's pixels."""
    digest = hashlib.sha256(json.dumps([key, stem], sort_keys=True, default=str).encode())
    if start is not None:
        digest.update(np.ascontiguousarray(start).tobytes())
    return digest.hexdigest()[:16]


def _rank_of(name: str) -> int:
    """The facet number in a render.json name: `facet03_paper-mean`, `random03_fourier` → 3."""
    return int(name.split("_")[0].removeprefix("facet").removeprefix("random"))


class Run:
    """A run directory with its settings; stage methods are idempotent and resumable."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = Path(settings.out)
        if self.dir.exists() and not self.dir.is_dir():
            raise MfvError(f"--out {self.dir} is a file; give a directory for the run")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MfvError(f"cannot create the run directory {self.dir}: {exc.strerror}") from None
        self.timings: dict[str, float] = {}
        previous = self.dir / "timings.json"
        if previous.exists():
            self.timings.update(read_json(previous))
        atomic_write_json(self.dir / "settings.json", settings.to_dict())

    # ------------------------------------------------------------------ inputs
    @functools.cached_property
    def model(self) -> LoadedModel:
        model = load_model(self.settings.model, device=self.settings.device,
                           weights=self.settings.weights)
        if self.settings.size is not None:
            model.preprocess = model.preprocess.resized(self.settings.size)
        return model

    @functools.cached_property
    def images(self) -> ImageList:
        return open_images(self.settings.images, cache_dir=None)

    @functools.cached_property
    def targets(self) -> list[Target]:
        if not self.settings.targets:
            raise MfvError("no target given: add --target LAYER:UNIT or a class name "
                           "(see `mfv layers MODEL`)")
        return parse_targets(list(self.settings.targets), self.model, self.settings.reduction,
                             self.settings.activation)

    @functools.cached_property
    def scan_targets(self) -> list[Target]:
        """What the scan records: `scan_targets` then the targets (each spelling once)."""
        extra = parse_targets(list(self.settings.scan_targets), self.model,
                              self.settings.reduction, self.settings.activation)
        chosen = self.targets if self.settings.targets or not extra else []
        merged = {t.spec: t for t in [*extra, *chosen]}
        return list(merged.values())

    @functools.cached_property
    def slugs(self) -> list[str]:
        return [slugify(i, t.spec) for i, t in enumerate(self.targets)]

    def _timed(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 3)
        atomic_write_json(self.dir / "timings.json", self.timings)

    # ------------------------------------------------------------------ stages
    def scan(self) -> ScanResult:
        t0 = time.perf_counter()
        s = self.settings
        targets = self.scan_targets  # target typos are reported before the images are read
        result = scan(self.model, self.images, targets, self.dir, code_layer=s.code_layer,
                      batch_size=s.scan_batch_size, workers=s.workers, top_n=max(s.top_n, 1),
                      progress=s.progress)
        if result is None:  # pragma: no cover - only with shards
            raise MfvError("the scan is incomplete")
        self._timed("scan", time.perf_counter() - t0)
        return result

    def class_labels(self, result: ScanResult) -> np.ndarray | None:
        """Image labels as the model's class indices (-1 where a label is no class)."""
        classes = self.model.classes
        labels = result.labels
        if classes is None or all(label is None for label in labels):
            return None
        lookup = {label: classes.lookup(label) for label in set(labels) if label is not None}
        return np.array([-1 if lookup.get(lbl) is None else lookup[lbl] for lbl in labels])

    def facets(self) -> list[FacetResult]:
        result = self.scan()
        t0 = time.perf_counter()
        labels = self.class_labels(result)
        out = []
        for target, slug in zip(self.targets, self.slugs, strict=True):
            t_index = result.target_index(target.spec)
            key = self._facets_key(result, target)
            directory = self.dir / "facets" / slug
            if (directory / "key.json").exists() and read_json(directory / "key.json") == key:
                out.append(load_facets(directory))
                continue
            facets = self._cluster(result, labels, t_index, target)
            save_facets(facets, directory)
            self._save_means(result, facets, slug)
            atomic_write_json(directory / "key.json", key)
            out.append(facets)
        self._timed("facets", time.perf_counter() - t0)
        return out

    def _facets_key(self, result: ScanResult, target: Target) -> dict:
        s = self.settings
        return {"scan": result.manifest["key"], "target": target.to_dict(),
                "selection": s.selection, "top_n": s.top_n, "facets": s.facets,
                "mean_of": s.mean_of, "embedding": s.embedding, "min_size": s.min_facet_size,
                "merge": s.merge, "mean_resize": s.mean_resize, "seed": s.seed}

    def _cluster(self, result: ScanResult, labels, t_index: int, target: Target
                 ) -> FacetResult:
        s = self.settings
        if result.activations is not None:
            acts = np.where(result.valid, result.activations[:, t_index], np.nan)
        else:
            acts = np.full(len(result.paths), np.nan)
            idx, vals = result.top(t_index, s.top_n)
            acts[idx] = vals
        # "All images of the class" (paper); for a sum of class logits, of any of its classes.
        in_class = None
        if labels is not None and target.classes:
            in_class = (np.isin(labels, target.classes) & result.valid).astype(np.int64)
        if s.selection == "class" and (in_class is None or not in_class.any()):
            names = ", ".join(map(str, target.classes)) or "none"
            raise MfvError(f"--selection class: no readable image of the source is labelled with "
                           f"the class(es) of {target.spec!r} (class indices: {names}); label "
                           "folders by WordNet id or class name, or use --selection top")
        chosen = select_images(acts, in_class, 1 if in_class is not None else None,
                               s.selection, s.top_n, name=target.spec)
        chosen = chosen[result.valid[chosen]]
        facets = find_facets(result.codes, np.nan_to_num(acts, nan=0.0), chosen, k=s.facets,
                             m=s.mean_of, embedding=s.embedding, merge=s.merge,
                             min_size=s.min_facet_size, seed=s.seed, name=target.spec)
        by_class = in_class is not None and bool(np.all(in_class[chosen] == 1)) and \
            s.selection != "top"
        facets.settings["selection_policy"] = "class" if by_class else "top"
        facets.settings["selection_classes"] = list(target.classes) if by_class else []
        return facets

    def load_pixels(self, paths: Sequence[str]) -> np.ndarray:
        """(m, S, S, 3) uint8 images at the model's input size, resized as the settings say."""
        pre = self.model.preprocess
        arrays = [(to_tensor(pre, load_rgb(p), policy=self.settings.mean_resize) * 255).round()
                  .byte().permute(1, 2, 0).numpy() for p in paths]
        return np.stack(arrays)

    def _save_means(self, result: ScanResult, facets: FacetResult, slug: str) -> None:
        directory = self.dir / "targets" / slug
        for facet in facets.facets:
            paths = [result.paths[i] for i in facet.representatives]
            mean = mean_image(self.load_pixels(paths))
            atomic_save_npy(directory / f"facet{facet.rank:02d}_mean.npy", mean)
            save_png(directory / f"facet{facet.rank:02d}_mean.png", mean)

    def render(self) -> dict[str, dict]:
        """Every facet of every target with every recipe (and random-start baselines)."""
        all_facets = self.facets()
        t0 = time.perf_counter()
        records = {}
        for recipe in self.settings.recipes:
            records.update(self._render_recipe(recipe, all_facets))
        self._timed("render", time.perf_counter() - t0)
        return records

    def _render_key(self, recipe: str) -> dict:
        s = self.settings
        return {"recipe": recipe, "steps": s.steps, "quirks": s.quirks, "seed": s.seed,
                "model": self.model.describe()}

    def _render_recipe(self, recipe: str, all_facets: list[FacetResult]) -> dict[str, dict]:
        s = self.settings
        key = self._render_key(recipe)
        jobs: list[Job] = []
        names: list[tuple[str, str, str]] = []
        records: dict[str, dict] = {}
        for t_index, (slug, facets) in enumerate(zip(self.slugs, all_facets, strict=True)):
            directory = self.dir / "targets" / slug
            index_path = directory / "render.json"
            stored = read_json(index_path) if index_path.exists() else {}
            stems = [f"facet{f.rank:02d}" for f in facets.facets]
            if s.baseline:
                stems += [f"random{r:02d}" for r in range(len(facets.facets))]
            # Entries (`facetNN_recipe`, `randomNN_recipe`) numbered beyond the facets, left by
            # a run with more, are dropped: later stages read render.json as the current set.
            done = {name: entry for name, entry in stored.items()
                    if _rank_of(name) < len(facets.facets)}
            if done != stored:
                atomic_write_json(index_path, done)
            records[slug] = done
            for stem in stems:
                name = f"{stem}_{recipe}"
                mean = load_npy(directory / f"{stem}_mean.npy") if stem.startswith("facet") \
                    else None
                entry_key = _hash(key, stem, mean)
                entry = done.get(name)
                if entry and entry.get("key") == entry_key and \
                        (directory / entry["path"]).exists():
                    continue
                start = None if mean is None else torch.from_numpy(mean).permute(2, 0, 1).float()
                seed = derived_seed(s.seed, slug, stem, recipe)
                jobs.append(Job(t_index, start, seed))
                names.append((slug, name, entry_key))
        if not jobs:
            return records

        def save(rows: list[int], results: list[Result]) -> None:
            for row, res in zip(rows, results, strict=True):
                slug, name, entry_key = names[row]
                directory = self.dir / "targets" / slug
                save_png(directory / f"{name}.png", res.image)
                atomic_save_npy(directory / f"{name}_trace.npy", res.trace.astype(np.float32))
                records[slug][name] = {"path": f"{name}.png", "trace": f"{name}_trace.npy",
                                       "activation": res.activation,
                                       "key": entry_key}
            for slug in {names[r][0] for r in rows}:
                atomic_write_json(self.dir / "targets" / slug / "render.json", records[slug])

        render_batches(self.model, self.targets, jobs, recipe, steps=s.steps, quirks=s.quirks,
               batch_size=s.batch_size, progress=s.progress, on_batch=save)
        return records

    # ------------------------------------------------------------------ outputs
    def evaluate(self) -> dict:
        from mfv.evaluate import evaluate_run

        self.render()
        t0 = time.perf_counter()
        metrics = evaluate_run(self)
        self._timed("evaluate", time.perf_counter() - t0)
        return metrics

    def publish(self) -> dict:
        """Bring results.json and index.html up to date with what the run directory holds."""
        from mfv.report import write_report
        from mfv.results import build_results

        results = build_results(self)
        results["stages"]["report"] = "done"  # written right below, with these very results
        write_report(self.dir, results, progress=self.settings.progress)
        atomic_write_json(self.dir / "results.json", results)
        return results


def run(settings: Settings | None = None, until: str = "evaluate", **options) -> dict:
    """Run the pipeline up to `until` (a stage name) and return the results object.

    `mfv.run(images="photos/", targets=["bell pepper"], out="runs/pepper")` in a notebook is
    `mfv run --images photos/ --target "bell pepper" --out runs/pepper` on the command line.
    """
    from mfv.settings import make_settings

    if until not in STAGES:
        raise MfvError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    settings = settings.updated(**options) if settings is not None else make_settings(**options)
    pipeline = Run(settings)
    stage = "evaluate" if until == "report" else until
    try:
        getattr(pipeline, stage)()
    except BaseException as error:
        _publish_partial(pipeline, error)
        raise
    return pipeline.publish()


def _publish_partial(pipeline: Run, error: BaseException) -> None:
    """After a failure, refresh the public files so they show what is done (never mask it).
    A refresh that fails for the stage's own reason (e.g. a bad target) says nothing more."""
    import warnings

    try:
        pipeline.publish()
    except Exception as exc:  # noqa: BLE001 - the stage's own error is the one to raise
        if str(exc) != str(error):
            warnings.warn(f"could not refresh results.json/index.html: {exc}", stacklevel=2)

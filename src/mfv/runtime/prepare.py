"""Everything a run needs, resolved before its first stage starts: the settings, the model on
its device, every layer and model the settings name, the targets and the images.

A mistake in any of them stops the run before the run directory is touched, in one line that
names the option as the user wrote it (`--judges banana` says `--judges`, not `--model`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mfv.core.errors import MfvError
from mfv.data.preprocess import Preprocess
from mfv.data.sources import ImageList, open_images
from mfv.models import LoadedModel, load_model
from mfv.models.loading import BUILTIN, EXPORT_SUFFIXES, SCRIPT_SUFFIXES
from mfv.models.targets import Target, parse_targets, resolve_layer
from mfv.runtime.lock import check_out
from mfv.runtime.settings import Settings, make_settings


@dataclass(frozen=True)
class Inputs:
    """What a run works on, resolved."""

    settings: Settings
    model: LoadedModel
    images: ImageList
    targets: list[Target]  # what the run renders
    scan_targets: list[Target]  # also recorded by the scan

    def __iter__(self) -> Iterator:
        return iter((self.settings, self.model, self.images, self.targets, self.scan_targets))


def prepare(settings: Settings | None, model: str | nn.Module | LoadedModel | None,
            preprocess: Preprocess | None, options: dict, *, scan_only: bool = False
            ) -> Inputs:
    """Settings (with `options`), the output folder, device and model, the layers and models
    the settings name, targets (before the images, so a typo is reported first), images.
    `scan_only`: the run only scans, so `LAYER:*` targets are recorded, not refused."""
    settings = settings.updated(**options) if settings is not None else make_settings(**options)
    check_out(settings.out)
    loaded = prepare_model(settings, model, preprocess)
    if model is not None and not isinstance(model, str):
        settings = settings.updated(model=loaded.name)
    check_layers(settings, loaded)
    for judge in settings.evaluate.judges:
        check_model_name(judge, "--judges")
    specs = list(settings.targets)
    every = [spec for spec in specs if spec.strip().endswith(":*")]
    if every and not scan_only:
        raise MfvError(f"--target {every[0]!r}: LAYER:* (every unit of a layer) is for `mfv "
                       "scan`, which records them; facets and pictures are made for single "
                       "targets: give LAYER:UNIT, a class name or a sum")
    targets: list[Target] = []
    if (specs and len(every) < len(specs)) or not (every or settings.scan_targets):
        targets = run_targets([s for s in specs if s not in every], loaded, settings)
    scan_targets = parse_targets([*every, *settings.scan_targets], loaded,
                                 settings.reduction, settings.activation, settings.sum)
    return Inputs(settings, loaded, open_images(settings.images), targets, scan_targets)


def prepare_model(settings: Settings, model: str | nn.Module | LoadedModel | None = None,
                  preprocess: Preprocess | None = None) -> LoadedModel:
    """The model a run uses, on its device, at its input size. (The process's allocator is the
    caller's: the command line tunes it, a Python caller may, `mfv.core.allocator`.)"""
    loaded = load_model(model if model is not None else settings.model, device=settings.device,
                        weights=settings.weights, preprocess=preprocess)
    if settings.size is not None:
        loaded.preprocess = loaded.preprocess.resized(settings.size)
    return loaded


def run_targets(specs: Sequence[str], model: LoadedModel, settings: Settings) -> list[Target]:
    """The targets a run renders (at least one)."""
    if not specs:
        raise MfvError("no target given: add --target LAYER:UNIT or a class name "
                       "(see `mfv layers MODEL`)")
    return parse_targets(list(specs), model, settings.reduction, settings.activation,
                         settings.sum)


def check_layers(settings: Settings, model: LoadedModel) -> None:
    """`--code-layer` and every `--match-layer` name a layer of the model."""
    named = [("--code-layer", settings.scan.code_layer),
             *(("--match-layer", path) for path in settings.render.match_layers)]
    for flag, path in named:
        try:
            resolve_layer(model, path)
        except MfvError as exc:
            raise MfvError(f"{flag} {path}: {exc}") from None


def check_model_name(name: str, flag: str) -> None:
    """A model that a setting names besides `--model` (`--judges`, `--embedder`) exists,
    checked without loading it (it loads where it is used, on the workers)."""
    hub, _, arch = name.partition(":")
    package = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm"}.get(hub)
    if name in BUILTIN or (Path(name).suffix in EXPORT_SUFFIXES and Path(name).is_file()):
        return
    if package:
        try:
            found = __import__(package)
        except ImportError:
            raise MfvError(f"{flag} {name}: {package} models need `pip install "
                           f"mfv[{package}]`") from None
        if not (found.is_model(arch) if hub == "timm" else arch in found.models.list_models()):
            raise MfvError(f"{flag} {name}: {package} has no model {arch!r}")
    elif Path(name).suffix in (*SCRIPT_SUFFIXES, *EXPORT_SUFFIXES) or "/" in name:
        raise MfvError(f"{flag} {name}: " + ("not a torch.export file (.pt2)"
                                             if Path(name).is_file() else "file not found"))
    else:
        raise MfvError(f"{flag}: unknown model {name!r}; use a built-in ({', '.join(BUILTIN)}), "
                       "'torchvision:NAME', 'timm:NAME' or a torch.export file (.pt2)")

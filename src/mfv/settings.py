"""Every option of a run in one dataclass: from the CLI, a TOML file, or Python keywords.

The run directory records the exact settings (`RUN/settings.json`), so a run can be repeated.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mfv.errors import MfvError
from mfv.render.recipes import RECIPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Settings:
    """What to visualize, from which images, and how (defaults follow the paper)."""

    out: str = "mfv-run"
    model: str = "efficientnet_lite0"
    weights: str | None = None
    images: str = "demo"
    targets: tuple[str, ...] = ()
    scan_targets: tuple[str, ...] = ()  # recorded by the scan too (e.g. "_fc:*"), not rendered
    reduction: str = "center"  # spatial maps: center (paper), max, mean
    activation: str = "pre"  # pre- or post-activation (paper: pre-ReLU)
    code_layer: str = "penultimate"  # the image codes that are clustered (paper: fc7)
    selection: str = "auto"  # class (paper, class neurons) / top (hidden units) / auto
    top_n: int = 200
    facets: int | str = 10  # k, or "auto"
    mean_of: int = 15  # m images per mean image
    embedding: str = "tsne"  # tsne (paper), pca, umap
    min_facet_size: int = 1
    merge: bool | None = None  # merge near-duplicate facets (default: on for auto k)
    mean_resize: str = "crop"  # how images are resized for the mean: crop (model's) / squash
    recipes: tuple[str, ...] = ("paper-mean",)
    baseline: bool = True  # also render from the paper's random start, for comparison
    steps: int | None = None  # rescale the recipe's iterations (None: the paper's)
    quirks: bool = True  # reproduce the authors' executed (Python 2) schedules
    seed: int = 0
    device: str = "cpu"
    size: int | None = None  # the model's input size for scan, means and synthesis (None: its own)
    batch_size: int | None = None  # synthesis batch (None: automatic)
    scan_batch_size: int = 32
    workers: int = 1
    judges: tuple[str, ...] = ("efficientnet_lite1", "efficientnet_lite2")
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for recipe in self.recipes:
            if recipe not in RECIPES:
                raise MfvError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        if not isinstance(self.facets, int) and self.facets != "auto":
            raise MfvError(f"--facets must be a number or 'auto', not {self.facets!r}")
        if isinstance(self.facets, int) and self.facets < 1:
            raise MfvError("--facets must be at least 1")
        if self.mean_of < 1:
            raise MfvError("--mean-of must be at least 1")
        if self.steps is not None and self.steps < 10:
            raise MfvError("--steps must be at least 10 (two per octave of the paper recipes)")
        if self.selection not in ("auto", "class", "top"):
            raise MfvError("--selection must be auto, class or top")
        if self.mean_resize not in ("crop", "squash"):
            raise MfvError("--mean-resize must be crop or squash")
        if self.size is not None and self.size < 32:
            raise MfvError("--size must be at least 32 pixels")

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("progress")
        return data

    def updated(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(name: str, value: Any) -> Any:
    if name in ("targets", "scan_targets", "recipes", "judges") and isinstance(value, str):
        return (value,)
    if name in ("targets", "scan_targets", "recipes", "judges"):
        return tuple(value)
    if name == "facets" and isinstance(value, str) and value != "auto":
        try:
            return int(value)
        except ValueError:
            raise MfvError(f"--facets must be a number or 'auto', not {value!r}") from None
    return value


def make_settings(config: str | Path | None = None, **options: Any) -> Settings:
    """Settings from an optional TOML file, overridden by keyword options that are not None."""
    values: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        try:
            values = tomllib.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise MfvError(f"settings file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MfvError(f"settings file {path} is not valid TOML: {exc}") from None
    values.update({k: v for k, v in options.items() if v is not None})
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MfvError(f"unknown setting(s): {', '.join(unknown)}")
    return Settings(**{k: _coerce(k, v) for k, v in values.items()})

"""Every option of a run in one validated model: from the CLI, a TOML file, or Python keywords.

The settings are the common ones (what, from which images, where) and one section per stage,
each the stage's own options object: `scan` (`ScanOptions`), `facets` (`FacetOptions`),
`render`, `evaluate` (`EvaluateOptions`), `backend` and `sweep`. Users name
every setting by one flat name, the same on the command line (`--top-n`), in a TOML file
(`top_n = 50`, or `[facets]` tables) and in Python (`mfv.run(top_n=50)`); a name used by
several stages (`top_n`, `seed`) is one setting, copied into each section that uses it.

Types and ranges are checked once, here, so the three reject a bad value with the same
one-line message. This module imports no torch and no scikit-learn. `RUN/settings.json` holds
the flat names (`Settings.to_dict`), which also read back as settings.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mfv.core.errors import MfvError
from mfv.core.options import Name, Names, OptionError, Options, count_or, opt, problem_text
from mfv.evaluate.options import EvaluateOptions
from mfv.facets.options import MAX_SEED, FacetOptions
from mfv.models.targets import ACTIVATIONS, REDUCTIONS, SUMS
from mfv.render.recipes import DEFAULT as DEFAULT_RECIPE
from mfv.render.recipes import names as recipe_names
from mfv.runtime.backend import BACKENDS
from mfv.scan.options import ScanOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SEQUENCES = ("targets", "scan_targets", "recipes", "judges", "match_layers")


class RenderSection(Options):
    """How the pictures are synthesized (the render stage's settings)."""

    recipes: tuple[Literal[recipe_names()], ...] = opt(
        (DEFAULT_RECIPE,), "--recipe", f"synthesis recipe (repeatable; one of "
        f"{', '.join(recipe_names())}; default {DEFAULT_RECIPE})", min_length=1, repeat=True)
    baseline: bool = opt(True, "--no-baseline", "skip the random-start baseline "
                         "visualizations", negate=True)
    steps: int | None = opt(None, "--steps", "total optimization steps (default: the "
                            "recipe's)", ge=10)
    as_written: bool = opt(False, "--as-written", "use the paper's schedules as written, not "
                           "as the authors' Python 2 code ran them")
    anchor_weight: float = opt(1.0, "--anchor-weight", "anchored recipe: pull of the picture's "
                               "code toward its facet's centre, in facet radii² per best-photo "
                               "activation (1)", ge=0)
    match_weight: float = opt(1.0, "--match-weight", "anchored recipe: weight of matching "
                              "intermediate activation distributions to the facet's photos "
                              "(1; 0: off)", ge=0)
    match_layers: Names = opt((), "--match-layer", "anchored recipe: a layer whose activations "
                              "are matched (repeatable; default: three along the depth)",
                              repeat=True)
    match_every: int = opt(1, "--match-every", "anchored recipe: match the activation "
                           "distributions on every k-th step only, at k times the weight (1: "
                           "every step; 2 halves the matching's cost, which counts on GPUs)",
                           ge=1)
    maco_crops: int | None = opt(None, "--maco-crops", "maco recipe: random crops per step "
                                 "(default: the published 32; 4 is 8x cheaper on a CPU)", ge=1)
    batch_size: int | None = opt(None, "--batch-size", "synthesis batch size (default: "
                                 "automatic)", ge=1)
    picture_scale: Literal["unit", "input"] = opt(
        "unit", "--picture-scale", "patch facets: the unit reads its pictures at the crops' "
        "size, as it saw them (unit, default), or magnified to the input size (input)")


class BackendSection(Options):
    """Where the stages' units of work run."""

    kind: Literal[BACKENDS] = opt("local", "--backend", "where the stages' units run: local "
                                  "(this process) or ray (a Ray cluster; the run directory "
                                  "must be on a file system every worker sees)",
                                  alias="backend")
    ray_address: str | None = opt(None, "--ray-address", "with --backend ray: 'auto' or "
                                  "HOST:PORT of a running cluster (default: start a local Ray "
                                  "instance)")
    ray_workers: int | None = opt(None, "--ray-workers", "with --backend ray: how many workers "
                                  "(default: one per CPU, or per GPU when the run uses one; "
                                  "more than the GPUs share them)",
                                  ge=1)


class SweepSection(Options):
    """Which layers and units `mfv sweep` measures, and against which independent network
    (the sweep is above the runtime, so its section lives here)."""

    layers: str = opt("auto", "--layers", "'auto' (every block output plus the logits) or "
                      "L1,L2,...")
    units: count_or("all") = opt(10, "--units", "units per layer (a seeded sample), or "
                                      "'all'", metavar="N|all")
    render: int = opt(0, "--render", "also render the facets of this many units per layer",
                      ge=0)
    embedder: str = opt("efficientnet_lite2", "--embedder", "the independent network whose "
                        "codes score the facets")


SECTIONS: dict[str, type[Options]] = {
    "scan": ScanOptions, "facets": FacetOptions, "render": RenderSection,
    "evaluate": EvaluateOptions, "backend": BackendSection, "sweep": SweepSection}


class Settings(BaseModel):
    """What to visualize, from which images, and how (defaults follow the paper)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    out: Name = opt("mfv-run", "--out", "run directory (default: mfv-run)")
    model: Name = opt("efficientnet_lite0", "--model", "efficientnet_lite0 (default), "
                      "torchvision:NAME, timm:NAME, or a torch.export file (.pt2)")
    weights: str | None = opt(None, "--weights", "state dict (.safetensors / .pt) for the "
                              "model")
    images: str | tuple[str, ...] = opt("demo", "--images", "folder (class subfolders = "
                                        "labels), .txt list, an image file, or demo")
    targets: Names = opt((), "--target", "LAYER:UNIT, a class name, or a sum like '_fc:0 + "
                         "_fc:701' (repeatable; LAYER:* = every unit, for `mfv scan`)",
                         repeat=True)
    scan_targets: Names = opt((), None, "also recorded by the scan, not rendered (e.g. "
                              "'_fc:*')")
    reduction: Literal[REDUCTIONS] = opt("center", "--reduction", "how a spatial or token map "
                                         "gives one number (default center, the paper's)")
    sum: Literal[SUMS] = opt("terms", "--sum", "how the terms of a sum of spatial units combine: "
                             "terms (default: each term reduced on its own, then summed; with "
                             "--reduction max, 'A + B' is max(A) + max(B)) or maps (the "
                             "weighted maps summed, then reduced once: max(A + B), a direction "
                             "in the layer's space; every term on one layer)")
    activation: Literal[ACTIVATIONS] = opt("pre", "--activation", "a layer's output before "
                                           "(pre, the paper's) or after (post) the activation "
                                           "that follows it")
    seed: int = opt(0, "--seed", "seed of every random choice (0)", ge=0, le=MAX_SEED)
    device: Name = opt("auto", "--device", "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, "
                       "mps")
    size: int | None = opt(None, "--size", "the model's input size in pixels for scanning, "
                           "mean images and synthesis (default: the model's own)", ge=32)
    progress: bool = opt(True, "--quiet", "no progress bars", negate=True)
    scan: ScanOptions = Field(default_factory=ScanOptions)
    facets: FacetOptions = Field(default_factory=FacetOptions)
    render: RenderSection = Field(default_factory=RenderSection)
    evaluate: EvaluateOptions = Field(default_factory=EvaluateOptions)
    backend: BackendSection = Field(default_factory=BackendSection)
    sweep: SweepSection = Field(default_factory=SweepSection)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any) -> Any:
        """Flat names (and `[section]` tables) → the common fields and the sections."""
        return _nested(values) if isinstance(values, Mapping) else values

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()) or (
                index and kind != "cuda"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    def value(self, name: str) -> Any:
        """A setting by its flat name (`top_n`, `facets`, `backend`, ...)."""
        section, attribute = locations()[name][0]
        return getattr(getattr(self, section) if section else self, attribute)

    def to_dict(self) -> dict:
        """The settings by flat name, as plain JSON types (what `RUN/settings.json` holds)."""
        plain = {name: self.value(name) for name in locations() if name != "progress"}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items()}

    def updated(self, **changes: Any) -> Settings:
        """A copy with `changes` (flat names; None values ignored), validated like the
        original; what the user gave stays `given`, with the changes."""
        kept = {name: self.value(name) for name in self.given}
        return make_settings(**{**kept, **{k: v for k, v in changes.items() if v is not None}})

    @property
    def given(self) -> set[str]:
        """The settings (flat names) the user set explicitly; others hold their defaults."""
        names = {n for n in self.model_fields_set if n not in SECTIONS}
        for section in self.model_fields_set & set(SECTIONS):
            flat = {a: f for f, a in SECTIONS[section].flat_names().items()}
            names |= {flat[a] for a in getattr(self, section).model_fields_set if a in flat}
        return names


@functools.cache
def locations() -> dict[str, list[tuple[str | None, str]]]:
    """Every setting's flat name → where it lives: (section or None, attribute), one place per
    stage that uses it."""
    found: dict[str, list[tuple[str | None, str]]] = {
        name: [(None, name)] for name in Settings.model_fields if name not in SECTIONS}
    for section, kind in SECTIONS.items():
        for flat, attribute in kind.flat_names().items():
            found.setdefault(flat, []).append((section, attribute))
    return found


def field_of(name: str) -> Any:
    """The pydantic field of a setting (its first place), for its flag, help and type."""
    section, attribute = locations()[name][0]
    return (SECTIONS[section] if section else Settings).model_fields[attribute]


def flag_of(name: str) -> str:
    """How the user spells a setting: its command-line flag, else its name."""
    return (field_of(name).json_schema_extra or {}).get("flag") or name


def _is_table(name: str, value: Any) -> bool:
    return name in SECTIONS and isinstance(value, (Mapping, BaseModel))


def _table(name: str, value: Mapping | BaseModel) -> dict[str, Any]:
    """A `[section]` table (or a section object: the fields it was given) by flat names; names
    that are not the section's stay as they are."""
    table = value.model_dump(include=value.model_fields_set, by_alias=True) \
        if isinstance(value, BaseModel) else value
    flat = {a: f for f, a in SECTIONS[name].flat_names().items()}
    return {flat.get(k, k): v for k, v in table.items()}


def flatten(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Flat names from flat names and `[section]` tables; unknown or misplaced names refused."""
    flat: dict[str, Any] = {}
    unknown = []
    for name, value in values.items():
        if _is_table(name, value):
            table = _table(name, value)
            own = SECTIONS[name].flat_names()
            unknown += [f"[{name}] {k}" for k in table if k not in own]
            flat.update(table)
        elif name in locations():
            flat[name] = value
        else:
            unknown.append(name)
    if unknown:
        raise MfvError(f"unknown setting(s){where}: {', '.join(sorted(unknown))} (see `mfv run "
                       "--help`)")
    return flat


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat names and tables → the model's shape: each value in every place that uses it
    (names that are no setting stay, to fail as unknown fields)."""
    nested: dict[str, Any] = {}
    pairs = [(k, v) for name, value in values.items() for k, v in (
        _table(name, value).items() if _is_table(name, value) else [(name, value)])]
    for name, value in pairs:
        if name not in locations():
            nested[name] = value
            continue
        if name in _SEQUENCES and isinstance(value, (str, list)):
            value = (value,) if isinstance(value, str) else tuple(value)
        if name == "images" and isinstance(value, list):
            value = tuple(value)
        for section, attribute in locations()[name]:
            if section is None:
                nested[name] = value
            else:
                nested.setdefault(section, {})[attribute] = value
    return nested


def _message(error: ValidationError, origin: str) -> str:
    """The first problem of a validation error as one line that names the setting as the user
    wrote it (its flag on the command line and in Python, its name in a settings file)."""
    problem = error.errors()[0]
    loc = list(problem["loc"])
    inner = (problem.get("ctx") or {}).get("error")
    if isinstance(inner, OptionError):  # a section's own check, raised from inside it
        problem, loc = inner.problem, [*loc, *inner.problem["loc"]]
    if len(loc) > 1 and loc[0] in SECTIONS:
        flat = {a: f for f, a in SECTIONS[loc[0]].flat_names().items()}
        loc = [flat.get(loc[1], loc[1]), *loc[2:]]
    name = str(loc[0]) if loc else "settings"
    plain = name not in locations() or flag_of(name) == name
    label = name if origin or plain else f"{flag_of(name)} ({name})"
    if len(loc) > 1 and isinstance(loc[1], int):
        label += f", entry {loc[1] + 1}"
    where = f" in {origin}" if origin else ""
    return f"setting {label}{where} {problem_text(problem)}"


def load_toml(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, with a clear error for a missing, unreadable or bad file."""
    path = Path(path)
    if path.is_dir():
        raise MfvError(f"--config {path} is a directory; give a TOML settings file")
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise MfvError(f"--config: settings file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MfvError(f"--config: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MfvError(f"--config: {path} is not valid TOML: {exc}") from None


def make_settings(config: str | Path | None = None, **options: Any) -> Settings:
    """Settings from an optional TOML file, overridden by keyword options that are not None."""
    from_file = flatten(load_toml(config), f" in {config}") if config is not None else {}
    given = flatten({k: v for k, v in options.items() if v is not None})
    try:
        Settings(**from_file)  # report a bad file value as the file's
    except ValidationError as exc:
        raise MfvError(_message(exc, str(config))) from None
    try:
        settings = Settings(**{**from_file, **given})
    except ValidationError as exc:
        raise MfvError(_message(exc, "")) from None
    for name in ("ray_address", "ray_workers"):
        if settings.value(name) is not None and settings.backend.kind != "ray":
            raise MfvError(f"{flag_of(name)} ({name}) is only used with --backend ray; add "
                           f"--backend ray or leave {flag_of(name)} out")
    return settings

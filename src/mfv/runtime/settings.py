"""Every option of a run in one validated model: from the CLI, a TOML file, or Python keywords.

Types and ranges are checked once, here, so the command line, a settings file and the Python API
reject a bad value with the same one-line message. The lists of allowed choices belong to the
modules that implement them (recipes, reductions, selections, embeddings, resize policies);
this module only reads them, and imports no torch. The run directory records the settings
(`RUN/settings.json`), so a run can be repeated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mfv.core.errors import MfvError
from mfv.data.preprocess import RESIZE_POLICIES
from mfv.facets.cluster import EMBEDDINGS
from mfv.facets.find import POLICIES
from mfv.models.targets import ACTIVATIONS, REDUCTIONS
from mfv.render.recipes import RECIPES
from mfv.runtime.backend import BACKENDS
from mfv.scan.store import SCAN_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
_SEQUENCES = ("targets", "scan_targets", "recipes", "judges", "match_layers")


def _opt(flag: str | None, help_text: str, **extra: Any) -> Any:
    """Field metadata: the command-line flag (None: not on the command line) and its help."""
    return {"description": help_text, "json_schema_extra": {"flag": flag, **extra}}


class Settings(BaseModel):
    """What to visualize, from which images, and how (defaults follow the paper)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    out: str = Field("mfv-run", **_opt("--out", "run directory (default: mfv-run)"))
    model: str = Field("efficientnet_lite0", **_opt(
        "--model", "efficientnet_lite0 (default), torchvision:NAME, timm:NAME, or a torch.export "
        "file (.pt2)"))
    weights: str | None = Field(None, **_opt("--weights", "state dict (.safetensors / .pt) for "
                                             "the model"))
    images: str | tuple[str, ...] = Field("demo", **_opt(
        "--images", "folder (class subfolders = labels), .txt list, an image file, or demo"))
    targets: tuple[str, ...] = Field((), **_opt(
        "--target", "LAYER:UNIT, a class name, or a sum like '_fc:0 + _fc:701' (repeatable; "
        "LAYER:* = every unit, scan only)", dest="targets", repeat=True))
    scan_targets: tuple[str, ...] = Field((), **_opt(None, "also recorded by the scan, not "
                                                     "rendered (e.g. '_fc:*')"))
    reduction: Literal[REDUCTIONS] = Field("center", **_opt(
        "--reduction", "how a spatial or token map gives one number (default center, the "
        "paper's)"))
    activation: Literal[ACTIVATIONS] = Field("pre", **_opt(
        "--activation", "a layer's output before (pre, the paper's) or after (post) the "
        "activation that follows it"))
    code_layer: str = Field("penultimate", **_opt("--code-layer", "layer whose outputs are "
                                                  "clustered (default penultimate, the paper's "
                                                  "fc7)"))
    selection: Literal[POLICIES] = Field("auto", **_opt(
        "--selection", "which images a target's facets come from (auto: the class's images for "
        "class logits when labels exist, else the top-N)"))
    top_n: int = Field(200, ge=1, **_opt("--top-n", "N for the top-N selection (200)"))
    facets: int | Literal["auto"] = Field(10, **_opt("--facets", "number of facets k, or 'auto' "
                                                     "(default 10, the paper's)"))
    mean_of: int = Field(15, ge=1, **_opt("--mean-of", "images per mean image (15)"))
    embedding: Literal[EMBEDDINGS] = Field("tsne", **_opt("--embedding", "2-D map that is "
                                                          "clustered (tsne, the paper's)"))
    min_facet_size: int = Field(1, ge=1, **_opt("--min-facet-size", "dissolve smaller facets"))
    merge: bool | None = Field(None, **_opt(None, "merge near-duplicate facets (default: on for "
                                            "automatic k)"))
    mean_resize: Literal[RESIZE_POLICIES] = Field("crop", **_opt(
        "--mean-resize", "how member images are resized for the mean image"))
    recipes: tuple[Literal[RECIPES], ...] = Field(("anchored",), min_length=1, **_opt(
        "--recipe", "synthesis recipe (repeatable; default anchored: facet-faithful; the "
        "paper's are paper-mean and paper-center)", dest="recipes", repeat=True))
    baseline: bool = Field(True, **_opt("--no-baseline", "skip the random-start baseline "
                                        "visualizations", negate=True))
    steps: int | None = Field(None, ge=10, **_opt("--steps", "total optimization steps "
                                                  "(default: the recipe's)"))
    as_written: bool = Field(False, **_opt("--as-written", "use the paper's schedules as "
                                           "written, not as the authors' Python 2 code ran them"))
    anchor_weight: float = Field(1.0, ge=0, **_opt(
        "--anchor-weight", "anchored recipe: pull of the picture's code toward its facet's "
        "centre, in facet radii² per best-photo activation (1)"))
    match_weight: float = Field(1.0, ge=0, **_opt(
        "--match-weight", "anchored recipe: weight of matching intermediate activation "
        "distributions to the facet's photos (1; 0: off)"))
    maco_crops: int | None = Field(None, ge=1, **_opt(
        "--maco-crops", "maco recipe: random crops per step (default: the published 32; 4 is "
        "8x cheaper on a CPU)"))
    match_layers: tuple[str, ...] = Field((), **_opt(
        "--match-layer", "anchored recipe: a layer whose activations are matched (repeatable; "
        "default: three along the depth)", repeat=True))
    seed: int = Field(0, ge=0, le=MAX_SEED, **_opt("--seed", "seed of every random choice (0)"))
    device: str = Field("auto", **_opt("--device", "auto (CUDA, else MPS, else CPU), cpu, cuda, "
                                       "cuda:1, mps"))
    size: int | None = Field(None, ge=32, **_opt(
        "--size", "the model's input size in pixels for scanning, mean images and synthesis "
        "(default: the model's own)"))
    batch_size: int | None = Field(None, ge=1, **_opt("--batch-size", "synthesis batch size "
                                                      "(default: automatic)"))
    scan_batch_size: int = Field(32, ge=1, **_opt("--scan-batch-size", "images per scan batch"))
    workers: int | None = Field(None, ge=0, **_opt(
        "--workers", "image decoding processes (default: none on the CPU, whose cores the "
        "model's pass takes; up to 8 with an accelerator)"))
    backend: Literal[BACKENDS] = Field("local", **_opt(
        "--backend", "where the stages' units run: local (this process) or ray (a Ray "
        "cluster; the run directory must be on a file system every worker sees)"))
    ray_address: str | None = Field(None, **_opt(
        "--ray-address", "with --backend ray: 'auto' or HOST:PORT of a running cluster "
        "(default: start a local Ray instance)"))
    ray_workers: int | None = Field(None, ge=1, **_opt(
        "--ray-workers", "with --backend ray: how many workers (default: one per CPU, or per "
        "GPU when the run uses one)"))
    scan_mode: Literal[SCAN_MODES] = Field("auto", **_opt(
        "--scan-mode", "full activation vectors, a streaming top-N per target (topn), or auto "
        "(full when they fit in 2 GB)"))
    layers: str = Field("auto", **_opt(
        "--layers", "sweep: 'auto' (every block output plus the logits) or L1,L2,...",
        commands=("sweep",)))
    units: int | Literal["all"] = Field(8, **_opt(
        "--units", "sweep: units per layer (a seeded sample), or 'all'", commands=("sweep",)))
    render: int = Field(0, ge=0, **_opt(
        "--render", "sweep: also render the facets of this many units per layer",
        commands=("sweep",)))
    embedder: str = Field("efficientnet_lite2", **_opt(
        "--embedder", "sweep: the independent network whose codes score the facets",
        commands=("sweep",)))
    judges: tuple[str, ...] = Field(("efficientnet_lite1", "efficientnet_lite2"), **_opt(
        "--judges", "models that judge transferability, comma-separated, or 'none'",
        judges=True))
    progress: bool = Field(True, **_opt("--quiet", "no progress bars", negate=True))

    @field_validator("facets", mode="before")
    @classmethod
    def _facets_kind(cls, value: Any) -> Any:
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError("must be a whole number or 'auto'")
        return value

    @field_validator("units")
    @classmethod
    def _positive_units(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, or 'all'")
        return value

    @field_validator("facets")
    @classmethod
    def _positive_facets(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, or 'auto'")
        return value

    @field_validator("out", "model", "code_layer", "device")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("auto", "cpu", "cuda", "mps") or (index and not index.isdigit()) or (
                index and kind != "cuda"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("targets", "scan_targets", "judges", "match_layers")
    @classmethod
    def _no_blank_entries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not v.strip() for v in value):
            raise ValueError("entries must not be empty")
        return value

    def to_dict(self) -> dict:
        """The settings as plain JSON types (what `RUN/settings.json` holds)."""
        return self.model_dump(mode="json", exclude={"progress"})

    def updated(self, **changes: Any) -> Settings:
        """A copy with `changes` (None values ignored), validated like the original; what the
        user gave stays `given`, with the changes."""
        kept = self.model_dump(include=self.model_fields_set)
        return make_settings(**{**kept, **{k: v for k, v in changes.items() if v is not None}})

    @property
    def given(self) -> set[str]:
        """The settings the user set explicitly (others hold their defaults)."""
        return set(self.model_fields_set)


def flag_of(name: str) -> str:
    """How the user spells a setting: its command-line flag, else its name."""
    extra = Settings.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or name


def _coerce_sequences(values: dict[str, Any]) -> dict[str, Any]:
    """One string for a list-valued setting means a list of one; lists become tuples."""
    out = dict(values)
    for name in _SEQUENCES:
        if isinstance(out.get(name), str):
            out[name] = (out[name],)
        elif isinstance(out.get(name), list):
            out[name] = tuple(out[name])
    if isinstance(out.get("images"), list):
        out["images"] = tuple(out["images"])
    return out


_PLAIN = {  # pydantic error types → what to write instead
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_type": "must be a number",
    "float_parsing": "must be a number", "bool_type": "must be true or false",
    "bool_parsing": "must be true or false", "string_type": "must be text (a string)",
    "tuple_type": "must be a list", "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
    "too_short": "must not be empty",
}


def _message(error: ValidationError, origin: str) -> str:
    """The first problem of a validation error as one line that names the setting as the user
    wrote it (its flag on the command line and in Python, its name in a settings file)."""
    problem = error.errors()[0]
    loc = problem["loc"]
    name = str(loc[0]) if loc else "settings"
    label = name if origin or flag_of(name) == name else f"{flag_of(name)} ({name})"
    if len(loc) > 1 and isinstance(loc[1], int):
        label += f", entry {loc[1] + 1}"
    template = _PLAIN.get(problem["type"])
    text = (template.format(**(problem.get("ctx") or {})) if template
            else problem["msg"].removeprefix("Value error, "))
    given = problem.get("input")
    shown = repr(given) if len(repr(given)) < 60 else type(given).__name__
    where = f" in {origin}" if origin else ""
    return f"setting {label}{where} {text} (got {shown})"


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
    from_file = load_toml(config) if config is not None else {}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted((set(from_file) | set(given)) - set(Settings.model_fields))
    if unknown:
        where = f" in {config}" if unknown[0] in from_file else ""
        raise MfvError(f"unknown setting(s){where}: {', '.join(unknown)} (see `mfv run --help`)")
    try:
        Settings(**_coerce_sequences(from_file))  # report a bad file value as the file's
    except ValidationError as exc:
        raise MfvError(_message(exc, str(config))) from None
    try:
        return Settings(**_coerce_sequences({**from_file, **given}))
    except ValidationError as exc:
        raise MfvError(_message(exc, "")) from None

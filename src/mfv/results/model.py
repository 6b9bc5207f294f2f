"""`RUN/results.json` as one pydantic model: what the run writes, what the report reads, and
the source of `docs/results.schema.json` (`python -m mfv.results.model` regenerates it).

**Schema version.** The document stays `mfv.results/2`: this model describes exactly the shape
the hand-written schema of /2 did (same keys, same nesting), so runs written before it read
unchanged and no migration is needed. What changed is strictness, not shape: an undefined
number (a diversity of one picture, a mean over nothing) is `null`, never a bare `NaN` or
`Infinity`, so any strict JSON parser reads the file. Reading is lenient where a partial run
leaves things out (every part has a default, older `/1` documents and sweep-only runs load);
writing always gives every key the schema requires.

Metric values stay open maps (keys in `mfv.results.metrics.METRICS`), so a new metric needs no
schema change; their numbers are finite or null like every other number here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from mfv.core.io import finite_tree
from mfv.results import display

SCHEMA = "mfv.results/2"
STAGES = ("scan", "facets", "render", "evaluate", "report")
SCHEMA_FILE = Path(__file__).resolve().parents[3] / "docs" / "results.schema.json"


Number = Annotated[float | None, BeforeValidator(finite_tree)]
MetricValue = Annotated[
    bool | int | float | list[float | int | None] | dict[str, float | None] | None,
    BeforeValidator(finite_tree)]
Metrics = dict[str, MetricValue]  # one picture's (or group's) metrics, keys in METRICS
Json = Annotated[dict[str, Any], BeforeValidator(finite_tree)]
_absent = {"exclude_if": lambda v: v is None}  # keys written only when they exist
_empty = {"exclude_if": lambda v: not v}


class _Part(BaseModel):
    """Lenient on read (unknown keys are kept), every key written."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, serialize_by_alias=True,
                              json_schema_serialization_defaults_required=True)


@dataclass(frozen=True)
class Where:
    """Where a run's files are, for those who show them: generated files (pictures, mean
    images, traces) relative to the run directory `root`, input photos as given (relative ones
    against `base`, the run's working directory). Not part of results.json: `Results.at` sets
    it when a run returns its results or `mfv.open` reads them."""

    root: Path | None = None
    base: str | None = None

    def generated(self, path: str | None) -> Path | None:
        return None if path is None or self.root is None else self.root / path

    def photo(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() or not self.base else Path(self.base) / p


class _Shown:
    """Shows itself in Jupyter (`mfv.results.display`): as HTML with its pictures inlined, its
    files found through its `_where`, and as one line of text."""

    _where: Where

    def _repr_html_(self) -> str:
        return self._html(self._where)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self._one_line())

    def _html(self, where: Where) -> str:
        raise NotImplementedError

    def _one_line(self) -> str:
        raise NotImplementedError


class Visualization(_Part):
    path: str | None = Field(None, description="the picture, relative to the run directory")
    activation: Number = Field(None, description="recorded by the renderer (central view)")
    trace: str | None = Field(None, description="the target's value per step (.npy)")
    alpha: str | None = Field(None, description="importance map (MACO's transparency), where "
                              "the recipe makes one", **_absent)


class ActivationReal(_Part):
    mean: Number = None
    max: Number = None


class Facet(_Shown, _Part):
    rank: int = Field(0, ge=0)
    size: int = Field(0, ge=0)
    members: list[str] = Field(default_factory=list)
    representatives: list[str] = Field(default_factory=list)
    boxes: list[list[int]] = Field(default_factory=list, description="patch facets (`--region "
                                   "patch`): each member's crop (top, left, height, width) in "
                                   "the scanned frame (the model's input after its resize and "
                                   "centre crop), in the order of members; empty for whole "
                                   "photos", **_empty)
    mean_image: str | None = None
    activation_real: ActivationReal = Field(default_factory=ActivationReal)
    visualizations: dict[str, Visualization] = Field(default_factory=dict,
                                                     description="per recipe")
    metrics: dict[str, Metrics] = Field(default_factory=dict, description="per recipe")
    _where: Where = PrivateAttr(default_factory=Where)


    def _html(self, where: Where) -> str:
        return display.facet_html(self, where)

    def _one_line(self) -> str:
        return f"Facet(rank={self.rank}, size={self.size}, pictures={list(self.visualizations)})"

class MapPoint(_Part):
    path: str
    x: Number = None
    y: Number = None
    facet: int = -1
    activation: Number = None
    label: str | int | None = None


class Selection(_Part):
    policy: str | None = None
    n: int | None = None
    top_n: int | None = None


class MisCondition(_Part):
    """The MIS task with one kind of reference (docs/mis.md)."""

    mis: Number = Field(None, description="share of the 20 trials the observer gets right")
    mis_soft: Number = Field(None, description="mean σ(αΔ) with the published α (fitted on "
                             "human data with another observer)")
    mis_delta: Number = Field(None, description="mean Δ over the trials")
    references: int | None = Field(None, description="references per side and trial")
    negative: Literal["pictures", "photos"] | None = Field(
        None, description="the negative references: the negation's pictures of the same kind "
        "(--negative), or the natural least activating photos", **_absent)


class MisResult(_Part):
    """A target's Machine Interpretability Score: the two-alternative task an observer network
    solves with natural, facet-picture and random-start references."""

    observer: str | None = Field(None, description="the observer network and layer")
    alpha: Number = None
    trials: int | None = None
    references: int | None = Field(None, description="natural references per side and trial")
    skipped: str | None = Field(None, description="why there is no score", **_absent)
    natural: MisCondition | None = Field(None, **_absent)
    facet: dict[str, MisCondition] = Field(default_factory=dict, description="per recipe",
                                           **_empty)
    random: dict[str, MisCondition] = Field(default_factory=dict, description="per recipe",
                                            **_empty)
    verdict: str | None = Field(None, description="do the facet pictures teach as much as "
                                "the photos?", **_absent)


class TargetMetrics(_Part):
    """A target's metrics; per recipe, its facet pictures and its random starts as groups."""

    activation_max_real: Number = Field(None, **_absent)
    mis: MisResult | None = Field(None, **_absent)
    recovery: dict[str, Number] | None = Field(None, **_absent)
    facet: dict[str, Metrics] = Field(default_factory=dict, **_empty)
    random: dict[str, Metrics] = Field(default_factory=dict, **_empty)


class TargetResult(_Shown, _Part):
    spec: str = ""
    slug: str = Field("", pattern=r"^([a-z0-9-]+-[0-9a-f]{8})?$",
                      description="the target's folder under targets/: readable text and a "
                      "digest of its definition")
    class_index: int | None = None
    class_name: str | None = None
    target: Json = Field(default_factory=dict, description="the parsed target (its terms)")
    selection: Selection | None = None
    activation_max_real: Number = None
    k_requested: int | str | None = None
    k_chosen: int | None = None
    clustering: Json | None = Field(None, **_absent)
    map: list[MapPoint] = Field(default_factory=list)
    facets: list[Facet] = Field(default_factory=list)
    baselines: dict[str, list[Visualization]] = Field(default_factory=dict,
                                                      description="random starts per recipe")
    metrics: TargetMetrics = Field(default_factory=TargetMetrics)
    negation: str | None = Field(None, description="--negative: the slug of this target's "
                                 "negation (what it shuns)", **_absent)
    negation_of: str | None = Field(None, description="--negative: the slug of the target "
                                    "this one negates", **_absent)
    _where: Where = PrivateAttr(default_factory=Where)

    @property
    def recipes(self) -> list[str]:
        """The recipes with facet pictures or metrics, in order of appearance."""
        return list(dict.fromkeys([*(r for f in self.facets for r in f.metrics),
                                   *self.metrics.facet]))

    def picture_metrics(self, recipe: str) -> list[Metrics]:
        """Each facet's metrics of `recipe`'s picture (facets without one left out)."""
        return [f.metrics[recipe] for f in self.facets if recipe in f.metrics]


    def _html(self, where: Where) -> str:
        return display.target_html(self, where)

    def _one_line(self) -> str:
        return f"TargetResult(spec={self.spec!r}, facet_sizes={[f.size for f in self.facets]})"

class Skipped(_Part):
    path: str = "?"
    reason: str = "?"


class DataInfo(_Part):
    source: str | None = None
    base: str | None = Field(None, description="what relative input paths resolve against")
    n_images: int | None = Field(None, ge=0)
    n_valid: int | None = Field(None, ge=0)
    fingerprint: str | None = None
    skipped: list[Skipped] = Field(default_factory=list)
    code_layer: str | None = None
    scan_key: str | None = Field(None, **_absent)


class ModelInfo(_Part):
    name: str | None = None
    class_: str | None = Field(None, alias="class")
    parameters: int | None = Field(None, ge=0)
    fingerprint: str | None = Field(None, description="sha256 of the architecture's parameter "
                                    "names, shapes and weights")
    preprocess: Json | None = None
    logits_layer: str | None = None
    num_classes: int | None = None


class Results(_Shown, _Part):
    """The whole of results.json. `Results.model_validate(doc)` reads one (any /2 or older
    document); `to_dict()` gives the strict-JSON dict that is written."""

    model_config = ConfigDict(title="mfv run results (RUN/results.json)")

    schema_: str = Field(SCHEMA, alias="schema", json_schema_extra={"const": SCHEMA})
    mfv_version: str = "unknown"
    created: str | None = None
    updated: str | None = None
    status: Literal["complete", "partial", "failed"] | None = Field(
        None, description="complete: every stage done for the current settings; partial: a "
        "stage command stopped early; failed: a stage raised (error says why) and the results "
        "cover what was finished")
    error: str | None = None
    stages: dict[str, Literal["done", "missing"]] = Field(default_factory=dict)
    model: ModelInfo = Field(default_factory=ModelInfo)
    device: str | None = Field(None, description="the device the run's model ran on")
    data: DataInfo | None = None
    settings: Json = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, Number] = Field(default_factory=dict, description="seconds per stage")
    targets: Annotated[list[TargetResult], BeforeValidator(lambda v: v or [])] = Field(
        default_factory=list)
    evaluation: dict[str, dict[str, Number]] | None = Field(
        None, description="per recipe: every scalar metric averaged over all facets of all "
        "targets (mfv.results.metrics)", **_absent)
    _where: Where = PrivateAttr(default_factory=Where)

    @property
    def judges(self) -> list[str]:
        """The independent networks that judged the pictures (the optimized one left out)."""
        judges = self.settings.get("judges") or []
        return [str(j) for j in judges if j != self.model.name] \
            if isinstance(judges, (list, tuple)) else []

    def to_dict(self) -> dict[str, Any]:
        """The document as results.json holds it: plain JSON types, no NaN."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """results.json's text (strict JSON: a NaN anywhere would raise)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @property
    def root(self) -> Path | None:
        """The run directory these results came from (None until `at` says)."""
        return self._where.root

    def at(self, root: str | Path) -> Results:
        """These results located in run directory `root`, so that the relative paths of every
        target and facet resolve (for display); returns self."""
        where = Where(Path(root).resolve(), self.data.base if self.data else None)
        self._where = where
        for target in self.targets:
            target._where = where
            for facet in target.facets:
                facet._where = where
        return self


    def _html(self, where: Where) -> str:
        return display.results_html(self, where)

    def _one_line(self) -> str:
        root = None if self.root is None else str(self.root)
        return (f"Results(status={self.status!r}, root={root!r}, "
                f"targets={[t.spec for t in self.targets]})")

class Interval(_Part):
    mean: Number = None
    low: Number = None
    high: Number = None


class Chance(_Part):
    mean: Number = None
    std: Number = None
    draws: int | None = None


class Trend(_Part):
    """Does a measure grow with depth: the slope of its layer means, its 95 % interval, the
    first and last quarter of the layers, its chance level."""

    slope: Number = None
    low: Number = None
    high: Number = None
    first_quarter: Number = None
    last_quarter: Number = None
    chance: Number = None
    with_power: Json | None = None  # the same over the layers where the measure has power


class ExampleFacet(_Part):
    rank: int = 0
    size: int | None = None
    mean_image: str | None = None
    members: list[str] = Field(default_factory=list)
    representatives: list[str] = Field(default_factory=list)  # what the mean image averages
    boxes: list[list[int]] = Field(default_factory=list)  # patch units: the representatives'


class ExampleUnit(_Part):
    unit: int | str | None = None
    k: int | None = None
    facets: list[ExampleFacet] = Field(default_factory=list)


class Power(_Part):
    """A layer's calibration of one measure: two-kind constructed units against one-kind ones
    (docs/sweep.md)."""

    one: Number = None
    two: Number = None
    difference: Number = None
    low: Number = None
    high: Number = None
    power: bool | None = None
    pairs: int = 0
    units: int = 0


class Calibration(_Part):
    pairs: list[list[int]] = Field(default_factory=list)
    two_kind: list[Json] = Field(default_factory=list)
    measures: dict[str, Power] = Field(default_factory=dict)


class SweepLayer(_Part):
    layer: str = ""
    depth: int | None = None
    region: str | None = None
    patch_side: int | None = None
    units: list[Json] = Field(default_factory=list)
    chance: dict[str, Chance] = Field(default_factory=dict)
    calibration: Calibration | None = None
    summary: dict[str, Interval] = Field(default_factory=dict)
    examples: list[ExampleUnit] = Field(default_factory=list)


class Sweep(_Part):
    """`RUN/sweep/sweep.json` (format mfv.sweep/1, docs/sweep.md), what the Layers page reads."""

    format: str = "mfv.sweep/1"
    model: ModelInfo = Field(default_factory=ModelInfo)
    device: str | None = None
    settings: Json = Field(default_factory=dict)
    data: DataInfo | None = None
    embedder: str | None = None
    measures: list[str] | None = None
    chance: dict[str, Chance] = Field(default_factory=dict)
    plot: dict[str, str] = Field(default_factory=dict)
    layers: list[SweepLayer] = Field(default_factory=list)
    answer: dict[str, Trend] = Field(default_factory=dict)
    timings: dict[str, Number] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


def json_schema() -> dict[str, Any]:
    """The JSON schema of results.json, as `docs/results.schema.json` holds it."""
    schema = Results.model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA,
            "description": "Paths of generated files are relative to the run directory; input "
            "image paths are as given (relative ones resolve against data.base). Generated "
            "from mfv.results.model: python -m mfv.results.model", **schema}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # regenerate docs/results.schema.json
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_FILE
    target.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {target}")

"""The Layers page's context: `RUN/sweep/sweep.json` (format mfv.sweep/1, read as
`mfv.results.model.Sweep`) as plain values for `layers.html`.

The page answers the sweep's question (does multifacetedness grow with depth?) in plain
sentences, one per measure, under the plot; a table gives each layer's mean and interval of
every measure against its chance level; per layer, its example units show their facets (mean
image, size, a strip of member thumbnails) and link to the unit's section of the run page when
the sweep rendered it too (`--render`: a target of results.json named "LAYER:UNIT"). Measures
are named and explained by `mfv.results.metrics.SWEEP_MEASURES`; everything the template shows
is decided here, and the template escapes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mfv.report.pages as pages
from mfv.report.pages import KV, Img, Links, colour, duration, fmt, section_id
from mfv.report.thumbs import Thumb
from mfv.results.metrics import SWEEP_MEASURES, Metric, describe, format_value
from mfv.results.model import (
    DataInfo,
    ExampleFacet,
    ExampleUnit,
    Results,
    Sweep,
    SweepLayer,
    Trend,
)

ANSWER_DIGITS = 2  # significant digits of the answer's numbers
TINY = 1e-9  # relative to a measure's scale: below it a slope or bound reads as 0 (round-off)
TRENDS = {  # what a slope's interval says, as the sentence's verb
    "grows": "grows with depth", "shrinks": "shrinks with depth",
    "unclear": "shows no clear trend with depth", "flat": "does not change with depth",
}


# ------------------------------------------------------------------------- helpers
def _plain(value: float, scale: float) -> float:
    """`value`, or 0 when it is round-off against `scale` (a constant measure's slope)."""
    return 0.0 if abs(value) < TINY * max(1.0, scale) else value


def plain_number(value: float, digits: int = ANSWER_DIGITS) -> str:
    """A number to `digits` significant digits in plain decimals (0.0000051, not 5.1e-06),
    trailing zeros dropped, a real minus sign."""
    if not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    places = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text.replace("-", "−")


def _signed(value: float) -> str:
    return ("+" if value > 0 else "") + plain_number(value)


def _interval(low: str, high: str) -> str:
    """"0.008–0.016"; "−0.1 to 0.2" where a dash would read as a minus."""
    return f"{low} to {high}" if low.startswith("−") or high.startswith("−") else f"{low}–{high}"


def measure_info(key: str) -> Metric:
    """A sweep measure's plain name, explanation and format (a stand-in for an unknown one)."""
    return describe(key, SWEEP_MEASURES)


def answer_sentence(label: str, answer: Trend | Mapping[str, Any]) -> tuple[str, str]:
    """(trend, sentence) for one measure's entry of the sweep's `answer`: the slope of its layer
    means against depth with the slope's 95 % interval, its first vs last quarter and its
    chance level, e.g. "1 − MonoScore grows with depth: +0.012 per layer (95 % CI
    0.008–0.016), 0.21 in the first quarter vs 0.34 in the last; chance 0.35". The trend is
    "grows" or "shrinks" when the interval excludes 0, "flat" when slope and interval are 0,
    "unclear" otherwise, "unknown" without a slope."""
    subject = label[:1].upper() + label[1:]
    a = answer if isinstance(answer, Trend) else Trend.model_validate(answer)
    slope, low, high, first, last = a.slope, a.low, a.high, a.first_quarter, a.last_quarter
    chance = a.chance
    if slope is None:
        return "unknown", f"{subject}: too few layers with measured units to tell a trend."
    scale = max([abs(v) for v in (first, last) if v is not None] or [1.0])
    slope = _plain(slope, scale)
    low = _plain(low, scale) if low is not None else None
    high = _plain(high, scale) if high is not None else None
    if low is not None and low > 0:
        trend = "grows"
    elif high is not None and high < 0:
        trend = "shrinks"
    elif slope == 0 and low == 0 and high == 0:
        trend = "flat"
    else:
        trend = "unclear"
    parts = []
    if trend != "flat":
        ci = (f" (95 % CI {_interval(plain_number(low), plain_number(high))})"
              if low is not None and high is not None else "")
        parts.append(f"{_signed(slope)} per layer{ci}")
    if first is not None and last is not None:
        parts.append(f"{plain_number(first)} in the first quarter vs {plain_number(last)} in "
                     "the last")
    text = f"{subject} {TRENDS[trend]}: {', '.join(parts)}" if parts else \
        f"{subject} {TRENDS[trend]}"
    if chance is not None:
        text += f"; chance {plain_number(chance)}"
    return trend, text


def example_strip(f: ExampleFacet, frame: tuple[int, int] | None
                  ) -> list[tuple[str, str, str | None]]:
    """An example facet's strip (`strip_keys`): the representatives its mean image averages
    first; for patch units their crops, as the run's report shows them."""
    boxes = dict(zip(f.representatives, f.boxes, strict=True)) if f.boxes else {}
    return pages.strip_keys(f.representatives, f.members, boxes, frame)


def layers_thumb_paths(doc: Sweep) -> list[str]:
    """Every input image (or crop) the page shows: the example units' facet strips."""
    frame = pages.frame_of(doc.model.preprocess)
    return [k for e in doc.layers for u in e.examples for f in u.facets
            for _, *keys in example_strip(f, frame) for k in keys if k]


def run_sections(results: Results, run_page_url: str) -> dict[str, str]:
    """The URL of each target's section of the run page, by its spec ("LAYER:UNIT" for the
    units the sweep rendered)."""
    return {t.spec: f"{run_page_url}#{section_id(t.slug, i)}"
            for i, t in enumerate(results.targets) if t.spec}


def layer_id(layer: str, depth: int) -> str:
    """The id of a layer's section: `l<depth>-<layer reduced to safe characters>`."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", layer).strip("-")[:60]
    return f"l{depth}-{safe}" if safe else f"l{depth}"


# ------------------------------------------------------------------------- view objects
@dataclass(frozen=True)
class Measure:
    """A measure as the page names it (a column of the table, a line of the answer)."""

    key: str
    label: str
    explanation: str
    chance: str  # its chance level, mean ± std over the random sets
    chance_title: str


@dataclass(frozen=True)
class Answer:
    key: str
    label: str
    explanation: str
    trend: str
    text: str
    power: str = ""  # the same question over the layers where the measure has power


@dataclass(frozen=True)
class Cell:
    """One measure of one layer: its mean over the layer's units and the mean's interval."""

    value: str
    interval: str
    title: str
    power: str = ""  # "no power" where the layer's calibration failed for the measure


@dataclass(frozen=True)
class LayerRow:
    sid: str
    layer: str
    depth: int
    units: int
    cells: list[Cell]


@dataclass(frozen=True)
class FacetView:
    rank: int
    colour: str
    size: str
    mean: Img
    strip: list[Img]
    more: int


@dataclass(frozen=True)
class UnitView:
    spec: str  # "LAYER:UNIT"
    unit: str
    meta: str
    link: str | None  # its section of the run page, when it was rendered
    facets: list[FacetView]


@dataclass(frozen=True)
class LayerView:
    sid: str
    depth: int
    layer: str
    chips: list[KV]
    units: list[UnitView]
    measured: int


# ------------------------------------------------------------------------- the builder
class LayersPage:
    """Builds the Layers page's context from a sweep document, the thumbnails of its example
    members and the run page's sections of rendered units (`run_sections`)."""

    def __init__(self, doc: Sweep, links: Links, thumbs: Mapping[str, Thumb],
                 rendered: Mapping[str, str] | None = None) -> None:
        self.doc = doc
        self.links = links
        self.thumbs = thumbs
        self.rendered = rendered or {}
        self.keys = doc.measures if doc.measures is not None else list(SWEEP_MEASURES)

    def context(self) -> dict[str, Any]:
        doc = self.doc
        measures = [self.measure(k) for k in self.keys]
        return {
            "title": f"mfv layers — {doc.model.name or 'sweep'}",
            "subtitle": self.subtitle(),
            "plot": Img(self.links.file(doc.plot.get("png")), "the measures against depth",
                        "plot", missing="plot not written"),
            "plot_svg": self.links.file(doc.plot.get("svg")),
            "answers": [self.answer(m) for m in measures],
            "method": self.method(),
            "measures": measures,
            "rows": [self.row(e, i) for i, e in enumerate(doc.layers)],
            "layers": [self.layer(e, i) for i, e in enumerate(doc.layers)],
            "info": self.info(),
            "glossary": [*(KV(m.label, m.explanation) for m in measures),
                         KV("chance", "The same measure on random sets of images as large as "
                            "a unit's top images, drawn from all the images: what it reads "
                            "for images the unit did not choose."),
                         KV("95 % CI", "A percentile-bootstrap interval: the layer's units "
                            "resampled 1000 times; for a slope, every layer's units at once.")],
            "footer": {"format": doc.format or "?"},
        }

    # ------------------------------------------------------------------ the answer
    def measure(self, key: str) -> Measure:
        info = measure_info(key)
        chance = self.doc.chance.get(key)
        mean, std = (chance.mean, chance.std) if chance else (None, None)
        text = format_value(mean, info.kind) if mean is not None else "–"
        if mean is not None and std is not None:
            text += f" ± {format_value(std, info.kind)}"
        title = (f"{info.label} on {fmt(chance.draws if chance else None)} random image sets "
                 f"of {self.top_n()}: mean ± standard deviation")
        return Measure(key, info.label, info.explanation, text, title)

    def answer(self, m: Measure) -> Answer:
        entry = self.doc.answer.get(m.key) or Trend()
        chance = self.doc.chance.get(m.key)
        if entry.chance is None and chance is not None:
            entry = entry.model_copy(update={"chance": chance.mean})
        trend, text = answer_sentence(m.label, entry)
        return Answer(m.key, m.label, m.explanation, trend, text, self.power_sentence(m, entry))

    def power_sentence(self, m: Measure, entry: Trend) -> str:
        """Where the measure can be read at all: the layers whose calibration (two-kind
        constructed units above one-kind ones) gives it power, and its trend over them."""
        powered = entry.with_power
        calibrated = [e for e in self.doc.layers if e.calibration is not None
                      and m.key in e.calibration.measures
                      and e.calibration.measures[m.key].power is not None]
        if powered is None or not calibrated:
            return ""
        names = powered.get("layers") or []
        text = (f"The calibration gives {m.label} power at {len(names)} of the "
                f"{len(calibrated)} calibrated layers")
        blind = [e.layer for e in calibrated if not e.calibration.measures[m.key].power]
        if blind:
            text += f" (none at {', '.join(blind)})"
        slope, low, high = (powered.get(k) for k in ("slope", "low", "high"))
        if len(names) < 2 or slope is None:
            return text + ": too few to tell a trend."
        if low is not None and low > 0:
            verb = "it grows with depth"
        elif high is not None and high < 0:
            verb = "it shrinks with depth"
        else:
            verb = "it shows no clear trend"
        ci = (f" (95 % CI {_interval(plain_number(low), plain_number(high))})"
              if low is not None and high is not None else "")
        return f"{text}; over them {verb}: {_signed(slope)} per layer{ci}."

    def top_n(self) -> str:
        return fmt(self.doc.settings.get("top_n"))

    def method(self) -> str:
        names = [e.layer for e in self.doc.layers]
        quarter = max(1, len(names) // 4)
        first = ", ".join(names[:quarter])
        last = ", ".join(names[-quarter:]) if names else ""
        chance = self.doc.chance.get(self.keys[0]) if self.keys else None
        draws = fmt(chance.draws if chance else None)
        return (f"Slopes per layer of depth (0 = the first layer swept), of a straight line "
                f"through the layers' means; the first quarter of the layers is {first}, the "
                f"last {last}; chance: the measure on {draws} random sets of {self.top_n()} "
                "images.")

    # ------------------------------------------------------------------ the table
    def row(self, entry: SweepLayer, i: int) -> LayerRow:
        layer = entry.layer or f"layer {i}"
        depth = entry.depth if entry.depth is not None else i
        units = len(entry.units)
        cells = []
        for key in self.keys:
            info = measure_info(key)
            s = entry.summary.get(key)
            value = format_value(s.mean, info.kind) if s else "–"
            interval = (_interval(format_value(s.low, info.kind), format_value(s.high, info.kind))
                        if s and s.low is not None and s.high is not None else "")
            title = f"{info.label} on {layer}: mean {value} over {units} units"
            if interval:
                title += f", 95 % CI {interval}"
            power = self.power(entry, key)
            if power:
                title += (f"; {power}: constructed units that fire for two kinds do not read "
                          "higher than those that fire for one")
            cells.append(Cell(value, interval, title, power))
        return LayerRow(layer_id(layer, depth), layer, depth, units, cells)

    @staticmethod
    def power(entry: SweepLayer, key: str) -> str:
        """"no power" when the layer's calibration of the measure failed, else ""."""
        c = entry.calibration.measures.get(key) if entry.calibration is not None else None
        return "no power" if c is not None and c.power is False else ""

    # ------------------------------------------------------------------ a layer
    def layer(self, entry: SweepLayer, i: int) -> LayerView:
        row = self.row(entry, i)
        chips = [KV(f"{row.units} unit{'s' if row.units != 1 else ''} measured", "")]
        if entry.region == "patch" and entry.patch_side:
            chips.append(KV(f"crops of {entry.patch_side} px around each peak", "",
                            "the facets and measures are of what the unit sees: the crop around "
                            "its peak at the layer's receptive-field size"))
        chips += [KV(f"{measure_info(k).label} {c.value}", c.title)
                  for k, c in zip(self.keys, row.cells, strict=True)]
        chips += self.calibration_chips(entry)
        units = [self.unit(row.layer, u) for u in entry.examples]
        return LayerView(row.sid, row.depth, row.layer, chips, units, row.units)

    def calibration_chips(self, entry: SweepLayer) -> list[KV]:
        """Per calibrated measure: two-kind vs one-kind constructed units, and the verdict."""
        if entry.calibration is None:
            return []
        out = []
        for key, c in entry.calibration.measures.items():
            if c.power is None or c.one is None or c.two is None:
                continue
            info = measure_info(key)
            verdict = "power" if c.power else "no power"
            out.append(KV(f"{info.label}: two kinds {format_value(c.two, info.kind)} vs one "
                          f"{format_value(c.one, info.kind)} — {verdict}", "",
                          f"calibration over {c.pairs} constructed units max(a, b) of two of "
                          f"{f'{c.units} of ' if c.units else ''}this layer's units against a "
                          f"and b: mean difference "
                          f"{plain_number(c.difference or 0.0)} (95 % CI "
                          f"{_interval(plain_number(c.low), plain_number(c.high))})"))
        return out

    def unit(self, layer: str, u: ExampleUnit) -> UnitView:
        unit = fmt(u.unit)
        spec = f"{layer}:{unit}"
        facets = [self.facet(spec, f) for f in u.facets]
        k = u.k if u.k is not None else len(facets)
        meta = f"{fmt(k)} facet{'s' if k != 1 else ''}"
        return UnitView(spec, unit, meta, self.rendered.get(spec), facets)

    def facet(self, spec: str, f: ExampleFacet) -> FacetView:
        shown = example_strip(f, pages.frame_of(self.doc.model.preprocess))
        label = f"{spec} facet {f.rank}"
        mean = Img(self.links.file(f.mean_image), f"{label}: mean image", "vis",
                   f"{label}: mean of its images nearest the facet's centre")
        strip = []
        for path, key, opens in shown:
            thumb = self.thumbs.get(key) or Thumb(None, "no thumbnail")
            href = self.links.thumb(self.thumbs.get(opens)) if opens else None
            title = path + (pages.CROP_TITLE if opens else "")
            strip.append(Img(self.links.thumb(thumb), path.replace("\\", "/").rsplit("/", 1)[-1],
                             "thumb", title, thumb.reason or "", True, href))
        more = max(0, f.size - len(shown)) if f.size is not None else 0
        return FacetView(f.rank, colour(f.rank), fmt(f.size), mean, strip, more)

    # ------------------------------------------------------------------ overview
    def subtitle(self) -> list[tuple[str, str]]:
        """(plain, bold) pieces: the template bolds the model's name."""
        doc = self.doc
        n = len(doc.layers)
        parts = [("model ", doc.model.name or "?")]
        if doc.device:
            parts.append((f"on {doc.device}", ""))
        parts.append((f"{n} layer{'s' if n != 1 else ''}", ""))
        if doc.data is not None and doc.data.n_valid is not None:
            parts.append((f"{fmt(doc.data.n_valid)} images", ""))
        parts.append((f"top {self.top_n()} images per unit", ""))
        return parts

    def info(self) -> dict[str, list[KV]]:
        doc = self.doc
        data = doc.data or DataInfo()
        settings = doc.settings
        units = settings.get("units")
        sweep = [
            KV("model", fmt(doc.model.name)),
            KV("parameters", fmt(doc.model.parameters)),
            KV("device", fmt(doc.device)),
            KV("images", fmt(data.source)),
            KV("images read", f"{fmt(data.n_valid)} of {fmt(data.n_images)}"),
            KV("units per layer", "all" if units == "all" else f"up to {fmt(units)}",
               "a seeded sample of each layer's units; units no image activates are left out"),
            KV("top images per unit", self.top_n()),
            KV("clustering space", fmt(settings.get("embedding")),
               "where the paper's clustering ran (and the silhouette is taken)"),
            KV("independent embedding", fmt(doc.embedder),
               "the network whose penultimate features score 1 − MonoScore and the "
               "separation ratio"),
            KV("seed", fmt(settings.get("seed"))),
        ]
        return {"sweep": sweep, "timings": [KV(k, duration(v)) for k, v in doc.timings.items()]}

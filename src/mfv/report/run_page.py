"""The run page's context: the typed results (`mfv.results.Results`) as plain values for
`run.html`.

Everything the template shows is decided here (which image or placeholder, formatted numbers,
plain metric names, verdicts, chart geometry); the template only lays it out, and escapes it.
Missing parts of a partial run (no facets yet, no pictures, no metrics) give placeholders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mfv.core.io import load_npy
from mfv.report.charts import MapLayout, Sparkline, sparkline
from mfv.report.glossary import VIEWS, MetricTable, metric_table
from mfv.report.pages import (
    CROP_TITLE,
    KV,
    STRIP_MAX,
    Img,
    Links,
    colour,
    duration,
    fmt,
    frame_of,
    section_id,
    strip_keys,
)
from mfv.report.thumbs import Thumb
from mfv.report.verdict import Verdict, verdicts
from mfv.results.metrics import METRICS, describe, format_value, means
from mfv.results.model import Facet, Results, TargetResult, Visualization

EAGER_TARGETS = 4  # images of later targets load lazily, as they scroll into view
SKIPPED_MAX = 2000  # skipped files listed in the data summary
MAP_W, MAP_H, MAP_PAD = 640.0, 440.0, 14.0
__all__ = ["EAGER_TARGETS", "STRIP_MAX", "RunPage", "thumb_paths"]


def shown_members(f: Facet, frame: tuple[int, int] | None) -> list[tuple[str, str, str | None]]:
    """A facet card's strip (`strip_keys`): patch facets show each member's crop."""
    boxes = dict(zip(f.members, f.boxes, strict=True)) if f.boxes else {}
    return strip_keys(f.representatives, f.members, boxes, frame)


def thumb_paths(results: Results) -> list[str]:
    """Every input image (or crop) the report shows as a thumbnail (facet strips and map
    points)."""
    paths: list[str] = []
    frame = frame_of(results.model.preprocess)
    for t in results.targets:
        for f in t.facets:
            paths += [k for _, *keys in shown_members(f, frame) for k in keys if k]
        paths += [p.path for p in t.map]
    return paths


# ------------------------------------------------------------------------- view objects
@dataclass(frozen=True)
class Figure:
    """A generated picture: caption, activation, its trace as a chart, its transparency map."""

    img: Img
    caption: str
    value: str
    spark: Sparkline | None = None
    spark_title: str = ""
    spark_ends: str = ""
    trace_url: str | None = None
    alpha: Img | None = None


@dataclass(frozen=True)
class FacetCard:
    rank: int
    colour: str
    size: str
    figures: list[Figure]
    mean: Img | None
    mean_caption: str
    strip: list[Img]
    more: int
    real: list[KV]
    metrics: MetricTable | None


@dataclass(frozen=True)
class Baseline:
    recipe: str
    figures: list[Figure]


@dataclass(frozen=True)
class MapView:
    sid: str
    count: int
    width: float
    height: float
    circles: list[dict[str, Any]]
    legend: list[dict[str, Any]]


@dataclass(frozen=True)
class Tile:
    sid: str
    spec: str
    meta: str
    pictures: list[tuple[str, Img]]  # (facet colour, picture)


@dataclass(frozen=True)
class MisView:
    """The MIS task's scores per reference set, its verdict and what it rests on."""

    rows: list[list[str]]  # references, negative side, per side, share right, σ(αΔ)
    verdict: str | None
    note: str


@dataclass(frozen=True)
class PairView:
    """The other side of a --negative pair: its section and (for the positive) the pictures
    of what the target shuns."""

    sid: str
    spec: str
    pictures: list[Img]


@dataclass(frozen=True)
class TargetView:
    sid: str
    number: int
    spec: str
    chips: list[KV]
    verdicts: list[Verdict]
    facets: list[FacetCard]
    columns: int  # recipes per facet card (for the cards' width)
    baselines: list[Baseline]
    metrics: MetricTable | None
    map: MapView | None
    mis: MisView | None = None
    shuns: PairView | None = None  # a positive target's negation
    negation_of: PairView | None = None  # a negation's positive target


@dataclass
class _Shown:
    """The metrics the page shows (in tables and chips), for the glossary at its end."""

    keys: set[str] = field(default_factory=set)
    central: bool = False

    def table(self, table: MetricTable) -> MetricTable | None:
        """`table`, noted, or None when it has no rows."""
        if not table.rows:
            return None
        self.keys |= table.keys
        self.central |= table.has_central
        return table


def _rows(values: Mapping[str, Any], show: Callable[[Any], str] = fmt) -> list[KV]:
    """Key/value rows of a mapping, its values shown by `show`."""
    return [KV(str(k), show(v)) for k, v in values.items()]


MIS_NOTE = ("Two-alternative task (Zimmermann et al. 2024): in each of {trials} trials the "
            "observer ({observer}) sees references of what drives the target and of what it "
            "shuns, and must tell which of two photos (one of the 20 most, one of the 20 least "
            "activating) drives it more; 0.5 = chance. σ(αΔ) uses the published α = {alpha}, "
            "fitted on human answers with another observer (DreamSim): not comparable to "
            "human accuracy here. The queries are photos the facets may also contain.")


def mis_view(t: TargetResult) -> MisView | None:
    """The MIS table of a target (None when it was not measured)."""
    m = t.metrics.mis
    if m is None:
        return None
    if m.skipped:
        return MisView([], None, f"No MIS: {m.skipped}.")
    negative = {"pictures": "its negation's pictures", "photos": "least activating photos",
                None: "least activating photos"}
    rows = []
    groups = [("photos (natural exemplars)", m.natural)] if m.natural else []
    groups += [(f"{recipe}: facet pictures", c) for recipe, c in m.facet.items()]
    groups += [(f"{recipe}: random starts", c) for recipe, c in m.random.items()]
    for label, c in groups:
        rows.append([label, negative[c.negative], fmt(c.references),
                     format_value(c.mis, "share"), format_value(c.mis_soft, "unit")])
    return MisView(rows, m.verdict, MIS_NOTE.format(trials=fmt(m.trials),
                                                    observer=m.observer or "?",
                                                    alpha=fmt(m.alpha)))


# ------------------------------------------------------------------------- the builder
class RunPage:
    """Builds the run page's context from the typed results and the run's thumbnails."""

    def __init__(self, results: Results, links: Links, thumbs: Mapping[str, Thumb]) -> None:
        self.r = results
        self.links = links
        self.thumbs = thumbs
        self.shown = _Shown()
        self.points: dict[str, Any] = {}

    def context(self) -> dict[str, Any]:
        r = self.r
        views = [self.target(t, i) for i, t in enumerate(r.targets)]
        summary = self.shown.table(metric_table(r.evaluation or {}))
        glossary = [KV(METRICS[k].label, METRICS[k].explanation) for k in METRICS
                    if k in self.shown.keys]
        if glossary and self.shown.central:
            glossary += [KV(view, text) for view, text in VIEWS.items()]
        extra = r.model_extra or {}
        return {
            "title": f"mfv report — {r.model.name or 'run'}",
            "subtitle": self.subtitle(),
            "stages": list(r.stages.items()),
            "status": r.status,
            "error": r.error or None,
            "tiles": [self.tile(t, i) for i, t in enumerate(r.targets)],
            "info": self.info(),
            "summary": summary,
            "targets": views,
            "glossary": glossary,
            "extra": json.dumps(extra, indent=2, ensure_ascii=False, default=str) if extra
            else None,
            "footer": {"schema": r.schema_ or "?", "updated": r.updated or "?"},
            "script_data": {"targets": self.points},
        }

    # ------------------------------------------------------------------ images
    def img(self, rel: str | None, alt: str, cls: str, title: str = "", *, lazy: bool = False
            ) -> Img:
        return Img(self.links.file(rel), alt, cls, title, "not available", lazy)

    def input_img(self, path: str, cls: str, title: str, lazy: bool, key: str | None = None,
                  opens: str | None = None) -> Img:
        """An input image's thumbnail (or that of the crop `key` names; a click `opens`
        another thumbnail, the whole photo with the crop outlined)."""
        thumb = self.thumbs.get(key or path) or Thumb(None, "no thumbnail")
        href = self.links.thumb(self.thumbs.get(opens)) if opens else None
        return Img(self.links.thumb(thumb), os.path.basename(path), cls, title,
                   thumb.reason or "", lazy, href)

    def figure(self, v: Visualization, caption: str, alt: str, reference: float | None,
               reference_name: str, lazy: bool) -> Figure:
        value = fmt(v.activation)
        pic = self.img(v.path, alt, "vis", f"{caption}: activation {value}", lazy=lazy)
        alpha = None
        if v.alpha:
            alpha = self.img(v.alpha, f"{alt}: transparency map", "vis alpha",
                             f"{caption}: transparency map (white where the target's gradients "
                             "gathered: the parts of the picture that matter)", lazy=lazy)
        spark, spark_title, ends = None, "", ""
        trace_url = self.links.file(v.trace)
        if trace_url is not None:
            try:
                spark = sparkline(load_npy(self.links.root / v.trace), reference=reference)
            except (OSError, ValueError):
                spark = None
        if spark is not None:
            ends = f"{format_value(spark.start, 'value')} → {format_value(spark.end, 'value')}"
            spark_title = f"the target's value per optimization step ({spark.steps} steps): {ends}"
            if spark.reference_y is not None:
                spark_title += f"; dashed: {reference_name} ({format_value(reference, 'value')})"
        return Figure(pic, caption, value, spark, spark_title, ends, trace_url, alpha)

    # ------------------------------------------------------------------ overview
    def subtitle(self) -> list[tuple[str, str]]:
        """(plain, bold) pieces: the template bolds the model's name."""
        r = self.r
        n = len(r.targets)
        parts = [("model ", r.model.name or "?")]
        if r.device:
            parts.append((f"on {r.device}", ""))
        if r.data is not None and r.data.n_valid is not None:
            parts.append((f"{fmt(r.data.n_valid)} images", ""))
        parts.append((f"{n} target{'s' if n != 1 else ''}", ""))
        if r.updated:
            parts.append((f"updated {r.updated}", ""))
        return parts

    def info(self) -> dict[str, Any]:
        r = self.r
        model = r.model.model_dump(mode="json", exclude_unset=True)
        preprocess = model.pop("preprocess", None)
        model_rows = _rows(model)
        if preprocess is not None:
            model_rows.append(KV("preprocess", fmt(preprocess)))
        timing_rows = _rows(r.timings, duration)
        numeric = [v for v in r.timings.values() if v is not None]
        if len(numeric) > 1:
            timing_rows.append(KV("total", duration(sum(numeric))))
        data = r.data.model_dump(mode="json", exclude_unset=True) if r.data else {}
        skipped = r.data.skipped if r.data else []
        data.pop("skipped", None)
        fp = data.get("fingerprint")
        if isinstance(fp, str) and len(fp) > 20:
            data["fingerprint"] = fp[:20] + "…"
        return {
            "model": model_rows,
            "data": [*_rows(data), KV("skipped", str(len(skipped)))],
            "skipped": [(s.path, s.reason) for s in skipped[:SKIPPED_MAX]],
            "skipped_count": len(skipped),
            "skipped_more": max(0, len(skipped) - SKIPPED_MAX),
            "settings": _rows(r.settings),
            "timings": timing_rows,
            "versions": _rows(r.versions),
        }

    def tile(self, t: TargetResult, i: int) -> Tile:
        lazy = i >= 6 * EAGER_TARGETS
        pics = []
        for f in t.facets:
            first = next(iter(f.visualizations.values()), None)
            label = f"facet {f.rank} ({fmt(f.size)} images)"
            rel = first.path if first and self.links.file(first.path) else f.mean_image
            if self.links.file(rel) is None and f.representatives:
                pic = self.input_img(f.representatives[0], "tile-img", label, lazy)
            else:
                pic = self.img(rel, label, "tile-img", label, lazy=lazy)
            pics.append((colour(f.rank), pic))
        n = len(t.facets)
        meta = f"{n} facet{'s' if n != 1 else ''}" if n else "facets not computed yet"
        if t.selection is not None and t.selection.n is not None:
            meta += f" · {fmt(t.selection.n)} images"
        if t.class_name:
            meta = f"{t.class_name} · {meta}"
        return Tile(section_id(t.slug, i), t.spec or f"target {i}", meta, pics)

    # ------------------------------------------------------------------ targets
    def target(self, t: TargetResult, i: int) -> TargetView:
        lazy = i >= EAGER_TARGETS
        sid = section_id(t.slug, i)
        activation: dict[str, Any] = {}
        for p in t.map:
            activation.setdefault(p.path, p.activation)
        cards = [self.facet_card(f, activation, lazy) for f in t.facets]
        baselines = [
            Baseline(recipe, [
                self.figure(b, f"random {k}", f"random start {k}, {recipe}",
                            t.activation_max_real, "the best photo", lazy)
                for k, b in enumerate(items)])
            for recipe, items in t.baselines.items()]
        columns = max([len(f.visualizations) for f in t.facets] or [1])
        return TargetView(sid, i + 1, t.spec or "?", self.chips(t),
                          verdicts(t, self.r.model.name), cards, max(columns, 1),
                          [b for b in baselines if b.figures], self.target_table(t),
                          self.facet_map(t, sid), mis_view(t), self.pair(t.negation, True),
                          self.pair(t.negation_of, False))

    def pair(self, slug: str | None, pictures: bool) -> PairView | None:
        """The other target of a --negative pair, by its slug (with its facet pictures)."""
        found = [(k, o) for k, o in enumerate(self.r.targets) if slug and o.slug == slug]
        if not found:
            return None
        k, other = found[0]
        shown = []
        for f in other.facets if pictures else ():
            first = next(iter(f.visualizations.values()), None)
            rel = first.path if first and self.links.file(first.path) else f.mean_image
            shown.append(self.img(rel, f"what it shuns: facet {f.rank}", "tile-img",
                                  f"facet {f.rank} of {other.spec} ({f.size} photos)"))
        return PairView(section_id(other.slug, k), other.spec, shown)

    def chips(self, t: TargetResult) -> list[KV]:
        """The target's facts in a line: (text, explanation on hover) as KV(label, "", title)."""
        chips: list[tuple[str, str]] = []
        if t.class_name is not None or t.class_index is not None:
            chips.append((f"class {fmt(t.class_name)} (#{fmt(t.class_index)})", ""))
        if t.selection is not None:
            names = {"policy": "policy {}", "n": "{} photos", "top_n": "top-N {}"}
            sel = t.selection.model_dump(mode="json", exclude_unset=True)
            text = ", ".join(names.get(k, k.replace("_", " ") + " {}").format(fmt(v))
                             for k, v in sel.items())
            chips.append((f"selection: {text}", "which photos were clustered: by class or the "
                          "top activating ones, how many, and the top-N asked for"))
        best = t.activation_max_real
        best = t.metrics.activation_max_real if best is None else best
        if best is not None:
            chips.append(self.metric_chip("activation_max_real", best))
        if t.k_chosen is not None:
            chips.append((f"{fmt(t.k_chosen)} facets (asked {fmt(t.k_requested)})",
                          "the facets the clustering found, and the number asked for"))
        chips += [self.metric_chip(f"recovery.{k}", v)
                  for k, v in (t.metrics.recovery or {}).items()]
        return [KV(text, "", title) for text, title in chips]

    def metric_chip(self, key: str, value: Any) -> tuple[str, str]:
        """(text, explanation) of a target-level metric, noted for the glossary."""
        info = describe(key)
        self.shown.keys.add(key)
        return f"{info.label} {format_value(value, info.kind)}", info.explanation

    def target_table(self, t: TargetResult) -> MetricTable | None:
        """Per recipe, MFV's facet pictures (means over facets) next to its random starts."""
        facet_level, random_level = t.metrics.facet, t.metrics.random
        columns: dict[str, dict[str, Any]] = {}
        for recipe in dict.fromkeys([*t.recipes, *random_level]):
            pics = t.picture_metrics(recipe)
            if pics or recipe in facet_level:
                columns[f"{recipe}: facets"] = {**means(pics), **facet_level.get(recipe, {})}
            if recipe in random_level:
                columns[f"{recipe}: random starts"] = random_level[recipe]
        return self.shown.table(metric_table(columns, judges=self.r.judges))

    def facet_card(self, f: Facet, activation: dict[str, Any], lazy: bool) -> FacetCard:
        rank, act = f.rank, f.activation_real
        figures = [self.figure(v, recipe, f"facet {rank}, {recipe}", act.max,
                               "the facet's best photo", lazy)
                   for recipe, v in f.visualizations.items()]
        mean = (self.img(f.mean_image, f"facet {rank} mean image", "vis", lazy=lazy)
                if f.mean_image else None)
        shown = shown_members(f, frame_of(self.r.model.preprocess))
        thumbs = [self.input_img(p, "thumb", f"{p} — activation {fmt(activation.get(p))}"
                                 + (CROP_TITLE if opens else ""), lazy, key, opens)
                  for p, key, opens in shown]
        real = [KV("photos' activation, mean", fmt(act.mean),
                   "the target's mean value on this facet's photos"),
                KV("best photo's activation", fmt(act.max),
                   "the target's highest value on this facet's photos")]
        table = self.shown.table(metric_table(f.metrics, judges=self.r.judges))
        return FacetCard(rank, colour(rank), fmt(f.size), figures, mean,
                         f"of {len(f.representatives) or '?'}", thumbs,
                         max(0, f.size - len(shown)), real, table)

    def facet_map(self, t: TargetResult, sid: str) -> MapView | None:
        keep = [p for p in t.map if p.x is not None and p.y is not None]
        if not keep:
            return None
        layout = MapLayout.fit([p.x for p in keep], [p.y for p in keep], MAP_W, MAP_H, MAP_PAD)
        circles, info = [], []
        for k, p in enumerate(keep):
            cx, cy = layout.place(p.x, p.y)
            circles.append({"i": k, "f": p.facet, "cx": cx, "cy": cy, "fill": colour(p.facet)})
            thumb = self.thumbs.get(p.path)
            info.append({"p": p.path, "t": self.links.thumb(thumb),
                         "r": thumb.reason if thumb else "no thumbnail",
                         "a": p.activation, "f": p.facet,
                         "l": None if p.label is None else str(p.label)})
        self.points[sid] = {"points": info}
        ranks = sorted({f.rank for f in t.facets} | {i["f"] for i in info if i["f"] >= 0})
        sizes = {f.rank: f.size for f in t.facets}
        legend = [{"rank": r, "colour": colour(r), "size": fmt(sizes.get(r))} for r in ranks]
        return MapView(sid, len(keep), MAP_W, MAP_H, circles, legend)

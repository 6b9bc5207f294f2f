"""The run page's context: results.json (schema mfv.results/2) as plain values for `run.html`.

Everything the template shows is decided here (which image or placeholder, formatted numbers,
plain metric names, verdicts, chart geometry); the template only lays it out, and escapes it.
Missing parts of a partial run (no facets yet, no pictures, no metrics) give placeholders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mfv.core.io import load_npy
from mfv.report.charts import MapLayout, Sparkline, sparkline
from mfv.report.glossary import (
    METRICS,
    VIEWS,
    MetricTable,
    describe,
    facet_means,
    format_value,
    metric_table,
)
from mfv.report.pages import KV, Img, Links
from mfv.report.thumbs import Thumb
from mfv.report.verdict import Verdict, verdicts

STRIP_MAX = 12  # real member images shown per facet
EAGER_TARGETS = 4  # images of later targets load lazily, as they scroll into view
SKIPPED_MAX = 2000  # skipped files listed in the data summary
MAP_W, MAP_H, MAP_PAD = 640.0, 440.0, 14.0
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#79706e",
    "#1f4e79", "#b35806", "#8e1b2a", "#2a7f7a", "#2f6b2a",
    "#a88a0c", "#6a3d7c", "#c95f7a", "#5c4033", "#3d3d3d",
)
NO_FACET = "#b8bcc4"
KNOWN_KEYS = {
    "schema", "mfv_version", "created", "updated", "stages", "model", "data", "settings",
    "versions", "timings", "targets", "status", "error", "evaluation", "device",
}
TARGET_LEVEL = {"activation_max_real", "recovery"}  # shown as the target's chips


def colour(facet: int) -> str:
    """The fixed colour of a facet (by rank); grey for points outside every facet."""
    return PALETTE[facet % len(PALETTE)] if facet >= 0 else NO_FACET


def fmt(value: Any) -> str:
    """A short, readable rendering of a number or other value (escaped by the template)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if value == value else "nan"
    if isinstance(value, (list, tuple)) and all(
        not isinstance(v, (dict, list, tuple)) for v in value
    ):
        return ", ".join(fmt(v) for v in value) or "–"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return fmt(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def section_id(target: Mapping[str, Any], index: int) -> str:
    """The id of a target's section: `t<index>-<slug>` (slug reduced to safe characters)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", str(target.get("slug") or ""))[:60]
    return f"t{index}-{slug}" if slug else f"t{index}"


def _int(value: Any, default: int = -1) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _maps(items: Any) -> list[Mapping[str, Any]]:
    return [x for x in items or [] if isinstance(x, Mapping)]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def strip(representatives: list[str], members: list[str]) -> list[str]:
    """The member images a facet card shows: representatives first, at most STRIP_MAX."""
    return list(dict.fromkeys([*representatives, *members]))[:STRIP_MAX]


def thumb_paths(results: Mapping[str, Any]) -> list[str]:
    """Every input image the report shows as a thumbnail (facet strips and map points)."""
    paths: list[str] = []
    for t in _maps(results.get("targets")):
        for f in _maps(t.get("facets")):
            reps = [p for p in (f.get("representatives") or []) if isinstance(p, str)]
            members = [p for p in (f.get("members") or []) if isinstance(p, str)]
            paths += strip(reps, members)
        paths += [str(p["path"]) for p in _maps(t.get("map")) if p.get("path") is not None]
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


# ------------------------------------------------------------------------- the builder
class RunPage:
    """Builds the run page's context from a results dict and the run's thumbnails."""

    def __init__(self, results: Mapping[str, Any], links: Links, thumbs: Mapping[str, Thumb]):
        self.r = results
        self.links = links
        self.thumbs = thumbs
        self.shown = _Shown()
        self.points: dict[str, Any] = {}
        model = _mapping(results.get("model"))
        self.model_name = model.get("name") if isinstance(model.get("name"), str) else None
        judges = _mapping(results.get("settings")).get("judges") or []
        self.judges = [str(j) for j in judges if j != self.model_name] \
            if isinstance(judges, (list, tuple)) else []

    def context(self) -> dict[str, Any]:
        r = self.r
        model = _mapping(r.get("model"))
        targets = _maps(r.get("targets"))
        views = [self.target(t, i) for i, t in enumerate(targets)]
        summary = self.shown.table(metric_table(_mapping(r.get("evaluation"))))
        glossary = [KV(METRICS[k].label, METRICS[k].explanation) for k in METRICS
                    if k in self.shown.keys]
        if glossary and self.shown.central:
            glossary += [KV(view, text) for view, text in VIEWS.items()]
        extra = {k: v for k, v in r.items() if k not in KNOWN_KEYS}
        return {
            "title": f"mfv report — {model.get('name') or 'run'}",
            "subtitle": self.subtitle(targets),
            "stages": [(str(k), str(v)) for k, v in _mapping(r.get("stages")).items()],
            "status": r.get("status") if isinstance(r.get("status"), str) else None,
            "error": str(r["error"]) if r.get("error") else None,
            "tiles": [self.tile(t, i) for i, t in enumerate(targets)],
            "info": self.info(),
            "summary": summary,
            "targets": views,
            "glossary": glossary,
            "extra": json.dumps(extra, indent=2, ensure_ascii=False, default=str) if extra
            else None,
            "footer": {"schema": r.get("schema") or "?", "updated": r.get("updated") or "?"},
            "script_data": {"targets": self.points},
        }

    # ------------------------------------------------------------------ images
    def img(self, rel: Any, alt: str, cls: str, title: str = "", *, lazy: bool = False,
            missing: str = "not available") -> Img:
        return Img(self.links.file(rel), alt, cls, title, missing, lazy)

    def input_img(self, path: str, cls: str, title: str, lazy: bool) -> Img:
        thumb = self.thumbs.get(path) or Thumb(None, "no thumbnail")
        return Img(self.links.thumb(thumb), os.path.basename(path), cls, title,
                   thumb.reason or "", lazy)

    def figure(self, v: Mapping[str, Any], caption: str, alt: str, reference: float | None,
               reference_name: str, lazy: bool) -> Figure:
        value = fmt(v.get("activation"))
        pic = self.img(v.get("path"), alt, "vis", f"{caption}: activation {value}", lazy=lazy)
        alpha = None
        if v.get("alpha"):
            alpha = self.img(v.get("alpha"), f"{alt}: transparency map", "vis alpha",
                             f"{caption}: transparency map (white where the target's gradients "
                             "gathered: the parts of the picture that matter)", lazy=lazy)
        spark, spark_title, ends = None, "", ""
        trace_url = self.links.file(v.get("trace"))
        if trace_url is not None:
            try:
                spark = sparkline(load_npy(self.links.root / v["trace"]), reference=reference)
            except (OSError, ValueError):
                spark = None
        if spark is not None:
            ends = f"{format_value(spark.start, 'value')} → {format_value(spark.end, 'value')}"
            spark_title = f"the target's value per optimization step ({spark.steps} steps): {ends}"
            if spark.reference_y is not None:
                spark_title += f"; dashed: {reference_name} ({format_value(reference, 'value')})"
        return Figure(pic, caption, value, spark, spark_title, ends, trace_url, alpha)

    # ------------------------------------------------------------------ overview
    def subtitle(self, targets: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
        """(plain, bold) pieces: the template bolds the model's name."""
        model = _mapping(self.r.get("model"))
        data = _mapping(self.r.get("data"))
        parts = [("model ", str(model.get("name") or "?"))]
        if self.r.get("device"):
            parts.append((f"on {self.r['device']}", ""))
        if data.get("n_valid") is not None:
            parts.append((f"{fmt(data.get('n_valid'))} images", ""))
        parts.append((f"{len(targets)} target{'s' if len(targets) != 1 else ''}", ""))
        if self.r.get("updated"):
            parts.append((f"updated {self.r['updated']}", ""))
        return parts

    def info(self) -> dict[str, Any]:
        r = self.r
        model = dict(_mapping(r.get("model")))
        preprocess = model.pop("preprocess", None)
        model_rows = [KV(str(k), fmt(v)) for k, v in model.items()]
        if preprocess is not None:
            model_rows.append(KV("preprocess", fmt(preprocess)))
        timings = _mapping(r.get("timings"))
        timing_rows = [KV(str(k), duration(v)) for k, v in timings.items()]
        numeric = [v for v in timings.values() if _float(v) is not None]
        if len(numeric) > 1:
            timing_rows.append(KV("total", duration(sum(numeric))))
        data = dict(_mapping(r.get("data")))
        skipped = data.pop("skipped", None) or []
        fp = data.get("fingerprint")
        if isinstance(fp, str) and len(fp) > 20:
            data["fingerprint"] = fp[:20] + "…"
        data_rows = [KV(str(k), fmt(v)) for k, v in data.items()]
        data_rows.append(KV("skipped", str(len(skipped))))
        skipped_items = [(str(s.get("path", "?")), str(s.get("reason", "?")))
                         if isinstance(s, Mapping) else (str(s), "")
                         for s in skipped[:SKIPPED_MAX]]
        return {
            "model": model_rows,
            "data": data_rows,
            "skipped": skipped_items,
            "skipped_count": len(skipped),
            "skipped_more": max(0, len(skipped) - SKIPPED_MAX),
            "settings": [KV(str(k), fmt(v)) for k, v in _mapping(r.get("settings")).items()],
            "timings": timing_rows,
            "versions": [KV(str(k), fmt(v)) for k, v in _mapping(r.get("versions")).items()],
        }

    def tile(self, t: Mapping[str, Any], i: int) -> Tile:
        lazy = i >= 6 * EAGER_TARGETS
        pics = []
        for f in _maps(t.get("facets")):
            rank = _int(f.get("rank"), len(pics))
            vis = _mapping(f.get("visualizations"))
            first = next((v for v in vis.values() if isinstance(v, Mapping)), None)
            label = f"facet {rank} ({fmt(f.get('size'))} images)"
            rel = first.get("path") if first and self.links.file(first.get("path")) else None
            rel = rel or f.get("mean_image")
            if self.links.file(rel) is None and f.get("representatives"):
                pic = self.input_img(str(f["representatives"][0]), "tile-img", label, lazy)
            else:
                pic = self.img(rel, label, "tile-img", label, lazy=lazy)
            pics.append((colour(rank), pic))
        facets = t.get("facets")
        meta = (f"{len(facets)} facet{'s' if len(facets) != 1 else ''}" if facets
                else "facets not computed yet")
        n = _mapping(t.get("selection")).get("n")
        if n is not None:
            meta += f" · {fmt(n)} images"
        if t.get("class_name"):
            meta = f"{t['class_name']} · {meta}"
        return Tile(section_id(t, i), str(t.get("spec", f"target {i}")), meta, pics)

    # ------------------------------------------------------------------ targets
    def target(self, t: Mapping[str, Any], i: int) -> TargetView:
        lazy = i >= EAGER_TARGETS
        sid = section_id(t, i)
        facets = _maps(t.get("facets"))
        activation: dict[str, Any] = {}
        for p in _maps(t.get("map")):
            if "path" in p:
                activation.setdefault(p["path"], p.get("activation"))
        metrics = _mapping(t.get("metrics"))
        chips = self.chips(t, metrics)
        cards = [self.facet_card(f, j, activation, lazy) for j, f in enumerate(facets)]
        real_max = _float(t.get("activation_max_real"))
        baselines = [
            Baseline(str(recipe), [
                self.figure(b, f"random {k}", f"random start {k}, {recipe}", real_max,
                            "the best photo", lazy)
                for k, b in enumerate(_maps(items))])
            for recipe, items in _mapping(t.get("baselines")).items()]
        columns = max([len(_mapping(f.get("visualizations"))) for f in facets] or [1])
        return TargetView(sid, i + 1, str(t.get("spec", "?")), chips,
                          verdicts(t, self.model_name), cards, max(columns, 1),
                          [b for b in baselines if b.figures], self.target_table(t, metrics),
                          self.facet_map(t, facets, sid))

    def chips(self, t: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[KV]:
        """The target's facts in a line: (text, explanation on hover) as KV(label, "", title)."""
        chips: list[tuple[str, str]] = []
        if t.get("class_name") is not None or t.get("class_index") is not None:
            chips.append((f"class {fmt(t.get('class_name'))} (#{fmt(t.get('class_index'))})",
                          ""))
        sel = _mapping(t.get("selection"))
        if sel:
            names = {"policy": "policy {}", "n": "{} photos", "top_n": "top-N {}"}
            text = ", ".join(names.get(str(k), str(k).replace("_", " ") + " {}").format(fmt(v))
                             for k, v in sel.items())
            chips.append((f"selection: {text}", "which photos were clustered: by class or the "
                          "top activating ones, how many, and the top-N asked for"))
        best = t.get("activation_max_real", metrics.get("activation_max_real"))
        if best is not None:
            info = METRICS["activation_max_real"]
            chips.append((f"{info.label} {format_value(best, info.kind)}", info.explanation))
            self.shown.keys.add("activation_max_real")
        if t.get("k_chosen") is not None:
            chips.append((f"{fmt(t.get('k_chosen'))} facets (asked {fmt(t.get('k_requested'))})",
                          "the facets the clustering found, and the number asked for"))
        for key, value in _mapping(metrics.get("recovery")).items():
            info = describe(f"recovery.{key}")
            self.shown.keys.add(f"recovery.{key}")
            chips.append((f"{info.label} {format_value(value, info.kind)}", info.explanation))
        return [KV(text, "", title) for text, title in chips]

    def target_table(self, t: Mapping[str, Any], metrics: Mapping[str, Any]
                     ) -> MetricTable | None:
        """Per recipe, MFV's facet pictures (means over facets) next to its random starts."""
        facet_level = _mapping(metrics.get("facet"))
        random_level = _mapping(metrics.get("random"))
        per_facet = [_mapping(f.get("metrics")) for f in _maps(t.get("facets"))]
        recipes = list(dict.fromkeys([*(r for m in per_facet for r in m
                                        if isinstance(m[r], Mapping)),
                                      *facet_level, *random_level]))
        columns: dict[str, Mapping[str, Any]] = {}
        for recipe in recipes:
            pics = [m[recipe] for m in per_facet if isinstance(m.get(recipe), Mapping)]
            if pics or recipe in facet_level:
                columns[f"{recipe}: facets"] = {**facet_means(pics),
                                                **_mapping(facet_level.get(recipe))}
            if recipe in random_level:
                columns[f"{recipe}: random starts"] = _mapping(random_level.get(recipe))
        flat_extra = {k: v for k, v in metrics.items()
                      if k not in ("facet", "random", *TARGET_LEVEL)}
        if flat_extra:  # metrics written flat (an older layout): one column of their own
            columns["target"] = flat_extra
        columns = {k: {m: v for m, v in c.items() if m not in TARGET_LEVEL}
                   for k, c in columns.items()}
        return self.shown.table(metric_table(columns, judges=self.judges))

    def facet_card(self, f: Mapping[str, Any], j: int, activation: Mapping[str, Any],
                   lazy: bool) -> FacetCard:
        rank = _int(f.get("rank"), j)
        act = _mapping(f.get("activation_real"))
        best = _float(act.get("max"))
        figures = [self.figure(v, str(recipe), f"facet {rank}, {recipe}", best,
                               "the facet's best photo", lazy)
                   for recipe, v in _mapping(f.get("visualizations")).items()
                   if isinstance(v, Mapping)]
        reps = [p for p in (f.get("representatives") or []) if isinstance(p, str)]
        mean = (self.img(f.get("mean_image"), f"facet {rank} mean image", "vis", lazy=lazy)
                if f.get("mean_image") else None)
        members = [p for p in (f.get("members") or []) if isinstance(p, str)]
        shown = strip(reps, members)
        thumbs = [self.input_img(p, "thumb", f"{p} — activation {fmt(activation.get(p))}", lazy)
                  for p in shown]
        size = f.get("size", len(members))
        real = [KV("photos' activation, mean", fmt(act.get("mean")),
                   "the target's mean value on this facet's photos"),
                KV("best photo's activation", fmt(act.get("max")),
                   "the target's highest value on this facet's photos")]
        metrics = _mapping(f.get("metrics"))
        if metrics and not all(isinstance(v, Mapping) for v in metrics.values()):
            metrics = {"": metrics}  # flat metrics (an older layout): one unnamed column
        table = self.shown.table(metric_table(metrics, judges=self.judges))
        return FacetCard(rank, colour(rank), fmt(size), figures, mean,
                         f"of {len(reps) or '?'}", thumbs,
                         max(0, _int(size, len(members)) - len(shown)), real, table)

    def facet_map(self, t: Mapping[str, Any], facets: Sequence[Mapping[str, Any]], sid: str
                  ) -> MapView | None:
        xy = [(p, _float(p.get("x")), _float(p.get("y"))) for p in _maps(t.get("map"))]
        keep = [(p, x, y) for p, x, y in xy if x is not None and y is not None]
        if not keep:
            return None
        layout = MapLayout.fit([x for _, x, _ in keep], [y for _, _, y in keep],
                               MAP_W, MAP_H, MAP_PAD)
        circles, info = [], []
        for k, (p, x, y) in enumerate(keep):
            fct = _int(p.get("facet"))
            cx, cy = layout.place(x, y)
            circles.append({"i": k, "f": fct, "cx": cx, "cy": cy, "fill": colour(fct)})
            path = str(p.get("path", ""))
            thumb = self.thumbs.get(path)
            info.append({"p": path, "t": self.links.thumb(thumb),
                         "r": thumb.reason if thumb else "no thumbnail",
                         "a": _float(p.get("activation")), "f": fct,
                         "l": None if p.get("label") is None else str(p.get("label"))})
        self.points[sid] = {"points": info}
        ranks = sorted({_int(f.get("rank"), j) for j, f in enumerate(facets)}
                       | {i["f"] for i in info if i["f"] >= 0})
        sizes = {_int(f.get("rank"), j): f.get("size") for j, f in enumerate(facets)}
        legend = [{"rank": r, "colour": colour(r), "size": fmt(sizes.get(r))} for r in ranks]
        return MapView(sid, len(keep), MAP_W, MAP_H, circles, legend)


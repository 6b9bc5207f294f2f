"""The report page: results.json rendered as one self-contained HTML file.

Every string that comes from the user or the file system goes through `_e` (HTML-escaped,
quotes too); data for the page's script is embedded as JSON with `<`, `>` and `&` escaped so
no file name can close the script element; file URLs are percent-quoted.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mfv.report.thumbs import Thumb

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
    "versions", "timings", "targets",
}


def colour(facet: int) -> str:
    """The fixed colour of a facet (by rank); grey for points outside every facet."""
    return PALETTE[facet % len(PALETTE)] if facet >= 0 else NO_FACET


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a <script> element whatever strings it holds."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(value: Any) -> str:
    """A short, readable rendering of a number or other value (not yet escaped)."""
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
        return ", ".join(_fmt(v) for v in value) or "–"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return _fmt(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _slug_id(target: Mapping[str, Any], index: int) -> str:
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


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics ({recipe: {name: value}}) as readable rows: "name · recipe"."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{key} · " if not prefix else f"{prefix}{key} · ")
        elif isinstance(value, list):
            rows.append((f"{prefix}{key}", ", ".join(_fmt(v) for v in value)))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(rows: Iterable[tuple[str, Any]], *, raw: bool = False) -> str:
    """A two-column key/value table; values are formatted and escaped unless `raw`."""
    body = "".join(
        f"<tr><th>{_e(k)}</th><td>{v if raw else _e(_fmt(v))}</td></tr>" for k, v in rows
    )
    return f'<table class="kv">{body}</table>' if body else '<p class="muted">–</p>'


def _asset(name: str) -> str:
    return resources.files("mfv.report").joinpath(name).read_text(encoding="utf-8")


class Page:
    """Builds the HTML of one report from a results dict and the run's thumbnails."""

    def __init__(self, run_dir: Path, results: Mapping[str, Any], thumbs: Mapping[str, Thumb]):
        self.run_dir = run_dir
        self.r = results
        self.thumbs = thumbs
        self.script_data: dict[str, Any] = {"targets": {}}
        self.lazy = False  # whether images being rendered now load lazily

    # ------------------------------------------------------------------ images

    def run_url(self, rel: Any) -> str | None:
        """A percent-quoted URL, relative to the run dir, of a generated file that exists."""
        if not rel or not isinstance(rel, str):
            return None
        p = self.run_dir / rel
        if not p.is_file():
            return None
        try:
            rel_path = os.path.relpath(p, self.run_dir)
        except ValueError:  # another drive on Windows
            return p.resolve().as_uri()
        return quote(rel_path.replace(os.sep, "/"))

    def img(self, url: str | None, alt: str, cls: str, title: str = "",
            missing: str = "not available") -> str:
        title_attr = f' title="{_e(title)}"' if title else ""
        if url is None:
            return (f'<div class="ph {cls}" role="img" aria-label="{_e(alt)}: {_e(missing)}"'
                    f' title="{_e(title + " — " if title else "")}{_e(missing)}">'
                    f"<span>{_e(missing)}</span></div>")
        lazy = ' loading="lazy"' if self.lazy else ""
        return (f'<img class="{cls}" src="{_e(url)}" alt="{_e(alt)}"{title_attr}{lazy}'
                ' decoding="async">')

    def input_img(self, path: str, cls: str, title: str) -> str:
        thumb = self.thumbs.get(path) or Thumb(None, "no thumbnail")
        url = quote(thumb.url) if thumb.url else None
        return self.img(url, os.path.basename(path), cls, title, thumb.reason or "")

    # ------------------------------------------------------------------ page

    def render(self) -> str:
        r = self.r
        model = r.get("model") or {}
        targets = [t for t in (r.get("targets") or []) if isinstance(t, Mapping)]
        title = f"mfv report — {model.get('name') or 'run'}"
        sections = "".join(self.target_section(t, i) for i, t in enumerate(targets))
        nav = "".join(
            f'<a href="#{_e(_slug_id(t, i))}">{_e(t.get("spec", f"target {i}"))}</a>'
            for i, t in enumerate(targets)
        )
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_asset("report.css")}</style>
</head>
<body>
<header class="top"><div class="wrap">
<h1>Multifaceted feature visualization</h1>
<p class="sub">{self.subtitle(targets)}</p>
{self.stages()}
<nav class="tnav"><a href="#overview">Overview</a>{nav}</nav>
</div></header>
<main class="wrap">
{self.overview(targets)}
{sections}
{self.extras()}
</main>
<footer class="wrap muted">Generated by mfv {_e(r.get("mfv_version") or "")}
· schema {_e(r.get("schema") or "?")} · updated {_e(r.get("updated") or "?")}</footer>
<script type="application/json" id="mfv-data">{_json_for_script(self.script_data)}</script>
<script>{_asset("report.js")}</script>
</body>
</html>
"""

    def subtitle(self, targets: list[Mapping[str, Any]]) -> str:
        model = self.r.get("model") or {}
        data = self.r.get("data") or {}
        parts = [f"model <b>{_e(model.get('name') or '?')}</b>"]
        if data.get("n_valid") is not None:
            parts.append(f"{_e(_fmt(data.get('n_valid')))} images")
        parts.append(f"{len(targets)} target{'s' if len(targets) != 1 else ''}")
        if self.r.get("updated"):
            parts.append(f"updated {_e(self.r['updated'])}")
        return " · ".join(parts)

    def stages(self) -> str:
        stages = self.r.get("stages") or {}
        pills = "".join(
            f'<span class="pill {"ok" if state == "done" else "no"}">{_e(name)}: {_e(state)}</span>'
            for name, state in stages.items()
        )
        return f'<div class="stages">{pills}</div>' if pills else ""

    # ------------------------------------------------------------------ overview

    def overview(self, targets: list[Mapping[str, Any]]) -> str:
        r = self.r
        model = dict(r.get("model") or {})
        preprocess = model.pop("preprocess", None)
        model_rows = list(model.items())
        if preprocess is not None:
            model_rows.append(("preprocess", preprocess))
        timings = r.get("timings") or {}
        timing_rows = [(k, _duration(v)) for k, v in timings.items()]
        numeric = [v for v in timings.values() if _float(v) is not None]
        if len(numeric) > 1:
            timing_rows.append(("total", _duration(sum(numeric))))
        grid = "".join(self.target_tile(t, i) for i, t in enumerate(targets))
        grid = (f'<div class="tgrid">{grid}</div>' if grid
                else '<p class="muted">No targets yet.</p>')
        # the pictures first; what produced them right below
        return f"""<section id="overview">
<h2>Targets</h2>
{grid}
<h2>Run</h2>
<div class="info">
<div class="card"><h3>Model</h3>{_table(model_rows)}</div>
<div class="card"><h3>Data</h3>{self.data_summary()}</div>
<div class="card"><h3>Settings</h3>{_table((r.get("settings") or {}).items())}</div>
<div class="card"><h3>Timings</h3>{_table(timing_rows)}
<h3>Versions</h3>{_table((r.get("versions") or {}).items())}</div>
</div>
</section>"""

    def data_summary(self) -> str:
        data = dict(self.r.get("data") or {})
        skipped = data.pop("skipped", None) or []
        fp = data.get("fingerprint")
        if isinstance(fp, str) and len(fp) > 20:
            data["fingerprint"] = fp[:20] + "…"
        rows = list(data.items())
        rows.append(("skipped", len(skipped)))
        out = _table(rows)
        if skipped:
            items = "".join(
                f'<li><code>{_e(s.get("path", "?"))}</code> — {_e(s.get("reason", "?"))}</li>'
                if isinstance(s, Mapping) else f"<li>{_e(s)}</li>"
                for s in skipped[:SKIPPED_MAX]
            )
            if len(skipped) > SKIPPED_MAX:
                items += f'<li class="muted">… and {len(skipped) - SKIPPED_MAX} more</li>'
            plural = "s" if len(skipped) != 1 else ""
            out += (f'<details class="skipped"><summary>{len(skipped)} skipped file{plural}'
                    f" and why</summary><ul>{items}</ul></details>")
        return out

    def target_tile(self, t: Mapping[str, Any], i: int) -> str:
        self.lazy = i >= 6 * EAGER_TARGETS
        pics = []
        for f in t.get("facets") or []:
            rank = _int(f.get("rank"), len(pics))
            vis = f.get("visualizations") or {}
            first = next((v for v in vis.values() if isinstance(v, Mapping)), None)
            url = self.run_url(first.get("path")) if first else None
            url = url or self.run_url(f.get("mean_image"))
            label = f"facet {rank} ({_fmt(f.get('size'))} images)"
            if url is None and f.get("representatives"):
                pic = self.input_img(f["representatives"][0], "tile-img", label)
            else:
                pic = self.img(url, label, "tile-img", label)
            pics.append(f'<span class="tile" style="--fc:{colour(rank)}">{pic}</span>')
        facets = t.get("facets")
        meta = (f"{len(facets)} facet{'s' if len(facets) != 1 else ''}" if facets
                else "facets not computed yet")
        n = (t.get("selection") or {}).get("n")
        if n is not None:
            meta += f" · {_fmt(n)} images"
        if t.get("class_name"):
            meta = f"{t['class_name']} · {meta}"
        return (f'<a class="card tcard" href="#{_e(_slug_id(t, i))}">'
                f'<span class="tspec">{_e(t.get("spec", f"target {i}"))}</span>'
                f'<span class="muted small">{_e(meta)}</span>'
                f'<span class="tiles">{"".join(pics)}</span></a>')

    # ------------------------------------------------------------------ targets

    def target_section(self, t: Mapping[str, Any], i: int) -> str:
        self.lazy = i >= EAGER_TARGETS
        sid = _slug_id(t, i)
        facets = [f for f in (t.get("facets") or []) if isinstance(f, Mapping)]
        activation = {}
        for p in t.get("map") or []:
            if isinstance(p, Mapping) and "path" in p:
                activation.setdefault(p["path"], p.get("activation"))
        chips = []
        if t.get("class_name") is not None or t.get("class_index") is not None:
            chips.append(f"class {_fmt(t.get('class_name'))} (#{_fmt(t.get('class_index'))})")
        sel = t.get("selection") or {}
        if sel:
            chips.append("selection: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sel.items()))
        if t.get("activation_max_real") is not None:
            chips.append(f"max activation on real images {_fmt(t.get('activation_max_real'))}")
        if t.get("k_chosen") is not None:
            chips.append(f"{_fmt(t.get('k_chosen'))} facets (asked {_fmt(t.get('k_requested'))})")
        for k, v in _flatten(t.get("metrics") or {}):
            chips.append(f"{k} {_fmt(v)}")
        chip_html = "".join(f'<span class="chip">{_e(c)}</span>' for c in chips)
        cards = "".join(self.facet_card(f, j, activation) for j, f in enumerate(facets))
        cards += self.baselines(t.get("baselines") or {})
        if not cards:
            cards = '<p class="muted">Facets not computed yet.</p>'
        return f"""<section class="target" id="{_e(sid)}" data-target="{_e(sid)}">
<div class="thead"><h2><span class="num">{i + 1}</span><code>{_e(t.get("spec", "?"))}</code></h2>
<a class="top-link" href="#overview">↑ overview</a></div>
<div class="chips">{chip_html}</div>
<div class="facets">{cards}</div>
{self.facet_map(t, facets, sid)}
</section>"""

    def facet_card(self, f: Mapping[str, Any], j: int, activation: Mapping[str, Any]) -> str:
        rank = _int(f.get("rank"), j)
        figs = []
        for recipe, v in (f.get("visualizations") or {}).items():
            if not isinstance(v, Mapping):
                continue
            cap = f"{_e(recipe)}<br><b>{_e(_fmt(v.get('activation')))}</b>"
            trace = self.run_url(v.get("trace"))
            if trace:
                cap += f' <a href="{_e(trace)}" class="small">trace</a>'
            pic = self.img(self.run_url(v.get("path")), f"facet {rank}, {recipe}", "vis",
                           f"{recipe}: activation {_fmt(v.get('activation'))}")
            figs.append(f"<figure>{pic}<figcaption>{cap}</figcaption></figure>")
        if not figs:
            figs.append('<figure><div class="ph vis"><span>not rendered yet</span></div>'
                        "<figcaption>visualization</figcaption></figure>")
        reps = [p for p in (f.get("representatives") or []) if isinstance(p, str)]
        if f.get("mean_image"):
            pic = self.img(self.run_url(f.get("mean_image")), f"facet {rank} mean image", "vis")
            figs.append(f"<figure>{pic}<figcaption>mean image<br>of {len(reps) or '?'}"
                        "</figcaption></figure>")
        members = [p for p in (f.get("members") or []) if isinstance(p, str)]
        strip_paths = strip(reps, members)
        strip_html = "".join(
            self.input_img(p, "thumb", f"{p} — activation {_fmt(activation.get(p))}")
            for p in strip_paths
        )
        size = f.get("size", len(members))
        more = _int(size, len(members)) - len(strip_paths)
        if more > 0:
            strip_html += f'<span class="more">+{more}</span>'
        act = f.get("activation_real") or {}
        rows = [("activation on real, mean", act.get("mean")),
                ("activation on real, max", act.get("max"))]
        rows += _flatten(f.get("metrics") or {})
        return f"""<article class="card facet" data-facet="{rank}" style="--fc:{colour(rank)}"
 title="click to highlight this facet on the map">
<header><span class="sw"></span><b>Facet {rank}</b>
<span class="muted">{_e(_fmt(size))} images</span></header>
<div class="figs">{"".join(figs)}</div>
<div class="strip">{strip_html}</div>
{_table(rows)}
</article>"""

    def baselines(self, baselines: Mapping[str, Any]) -> str:
        blocks = []
        for recipe, items in baselines.items():
            figs = "".join(
                "<figure>"
                + self.img(self.run_url(b.get("path")), f"random start {k}, {recipe}", "vis",
                           f"random start {k}: activation {_fmt(b.get('activation'))}")
                + f"<figcaption>random {k}<br><b>{_e(_fmt(b.get('activation')))}</b>"
                  "</figcaption></figure>"
                for k, b in enumerate(items or []) if isinstance(b, Mapping)
            )
            blocks.append(f'<div class="muted small">{_e(recipe)}</div>'
                          f'<div class="figs">{figs}</div>')
        if not blocks:
            return ""
        return ('<article class="card baseline"><header><b>Random starts</b>'
                '<span class="muted">baseline</span></header>' + "".join(blocks) + "</article>")

    def facet_map(self, t: Mapping[str, Any], facets: list[Mapping[str, Any]], sid: str) -> str:
        points = [p for p in (t.get("map") or []) if isinstance(p, Mapping)]
        xy = [(p, _float(p.get("x")), _float(p.get("y"))) for p in points]
        keep = [(p, x, y) for p, x, y in xy if x is not None and y is not None]
        if not keep:
            return ""
        xs, ys = [x for _, x, _ in keep], [y for _, _, y in keep]
        dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        scale = min((MAP_W - 2 * MAP_PAD) / dx, (MAP_H - 2 * MAP_PAD) / dy)
        ox = (MAP_W - dx * scale) / 2 - min(xs) * scale
        oy = (MAP_H - dy * scale) / 2 + max(ys) * scale  # y grows upwards on the map
        circles, info = [], []
        for k, (p, x, y) in enumerate(keep):
            fct = _int(p.get("facet"))
            circles.append(f'<circle class="pt" data-i="{k}" data-f="{fct}" '
                           f'cx="{ox + x * scale:.1f}" cy="{oy - y * scale:.1f}" r="4.5" '
                           f'fill="{colour(fct)}"/>')
            path = str(p.get("path", ""))
            thumb = self.thumbs.get(path)
            info.append({"p": path, "t": quote(thumb.url) if thumb and thumb.url else None,
                         "r": thumb.reason if thumb else "no thumbnail",
                         "a": _float(p.get("activation")), "f": fct,
                         "l": None if p.get("label") is None else str(p.get("label"))})
        self.script_data["targets"][sid] = {"points": info}
        ranks = sorted({_int(f.get("rank"), j) for j, f in enumerate(facets)}
                       | {i["f"] for i in info if i["f"] >= 0})
        sizes = {_int(f.get("rank"), j): f.get("size") for j, f in enumerate(facets)}
        legend = "".join(
            f'<button type="button" class="lg" data-facet="{r}" style="--fc:{colour(r)}">'
            f'<span class="sw"></span>Facet {r}'
            f'<span class="muted"> {_e(_fmt(sizes.get(r)))}</span></button>'
            for r in ranks
        )
        return f"""<div class="card mapcard">
<h3>Facet map <span class="muted small">{len(keep)} activating images, embedded in 2-D;
hover a point to see the image, click a facet to highlight its members</span></h3>
<div class="mapbox" data-target="{_e(sid)}">
<svg class="map" viewBox="0 0 {MAP_W:.0f} {MAP_H:.0f}" role="img"
 aria-label="facet map">{"".join(circles)}</svg>
<div class="legend">{legend}</div>
</div></div>"""

    def extras(self) -> str:
        extra = {k: v for k, v in self.r.items() if k not in KNOWN_KEYS}
        if not extra:
            return ""
        body = _e(json.dumps(extra, indent=2, ensure_ascii=False, default=str))
        return (f'<section class="card"><details><summary>Other results</summary>'
                f"<pre>{body}</pre></details></section>")


def strip(representatives: list[str], members: list[str]) -> list[str]:
    """The member images a facet card shows: representatives first, at most STRIP_MAX."""
    return list(dict.fromkeys([*representatives, *members]))[:STRIP_MAX]


def thumb_paths(results: Mapping[str, Any]) -> list[str]:
    """Every input image the report shows as a thumbnail (facet strips and map points)."""
    paths: list[str] = []
    for t in results.get("targets") or []:
        if not isinstance(t, Mapping):
            continue
        for f in t.get("facets") or []:
            if isinstance(f, Mapping):
                reps = [p for p in (f.get("representatives") or []) if isinstance(p, str)]
                members = [p for p in (f.get("members") or []) if isinstance(p, str)]
                paths += strip(reps, members)
        paths += [str(p["path"]) for p in (t.get("map") or [])
                  if isinstance(p, Mapping) and p.get("path") is not None]
    return paths

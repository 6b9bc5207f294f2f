"""Inline display in Jupyter: the HTML that `Results`, a target, a facet (and `mfv.visualize`'s
pictures) show as their `_repr_html_`, and their one line of plain text (`summary`).

Each piece is self-contained: pictures, mean images and member photos are small thumbnails
inlined as base64 data URIs (the notebook keeps them when the run directory moves), the facet
map is an inline SVG scatter of the 2-D embedding coloured by facet (as the report draws it,
without its interaction), and every string that comes from the user or the run (target specs,
class names, paths, labels) is escaped. Relative paths resolve through the `Where` the results
were given (`Results.at`); a picture that cannot be read shows why instead.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from mfv.results.metrics import describe, format_value, means, number

PICTURE_PX = 128  # a generated picture's or mean image's thumbnail
PHOTO_PX = 56  # a member photo's thumbnail
STRIP = 8  # member photos shown per facet
MAP_W, MAP_H, MAP_PAD, MAP_POINTS = 240.0, 180.0, 8.0, 2000
TARGETS_SHOWN = 12  # a run's targets shown inline (the report shows them all)
KEY_METRICS = ("activation_ratio", "fidelity", "path_similarity", "plausibility",
               "transfer_top1")
FACET_COLOURS = (  # by facet rank, in the notebook and the report (mfv.report.pages)
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#79706e",
    "#1f4e79", "#b35806", "#8e1b2a", "#2a7f7a", "#2f6b2a",
    "#a88a0c", "#6a3d7c", "#c95f7a", "#5c4033", "#3d3d3d",
)
NO_FACET = "#b8bcc4"
_ROW = "display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start"
_FIG = "margin:0;text-align:center;font-size:11px"
_MUTED = "color:#666;font-size:12px"


def facet_colour(rank: int) -> str:
    """A facet's colour (by rank), grey for points outside every facet."""
    return FACET_COLOURS[rank % len(FACET_COLOURS)] if rank >= 0 else NO_FACET


# ------------------------------------------------------------------------------ pictures
def data_uri(image: Image.Image | np.ndarray, size: int, fmt: str = "PNG") -> str:
    """`image` shrunk to fit `size` px, as a `data:` URI (PNG, or JPEG for photos)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _file_uri(path: Path, size: int, fmt: str) -> str:
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG decodes at a fraction of its size
        return data_uri(ImageOps.exif_transpose(image), size, fmt)


def img(path: Path | None, size: int, alt: str, title: str = "", fmt: str = "PNG") -> str:
    """An inlined `<img>` of the file at `path`, or a placeholder saying why there is none."""
    if path is None:
        return _placeholder(size, "no file", title)
    try:
        src = _file_uri(path, size, fmt)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = "missing" if not path.exists() else f"unreadable ({type(error).__name__})"
        return _placeholder(size, reason, f"{title} {path}".strip())
    return (f'<img src="{src}" alt="{escape(alt)}" title="{escape(title or alt)}" '
            f'style="max-width:{size}px;max-height:{size}px;image-rendering:auto">')


def _placeholder(size: int, reason: str, title: str) -> str:
    return (f'<span title="{escape(title)}" style="display:inline-flex;width:{size}px;'
            f'height:{size}px;align-items:center;justify-content:center;background:#eee;'
            f'{_MUTED}">{escape(reason)}</span>')


def _figure(picture: str, *caption: str) -> str:
    lines = "<br>".join(escape(c) for c in caption if c)
    return f'<figure style="{_FIG}">{picture}<figcaption>{lines}</figcaption></figure>'


def pictures_html(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str],
                  title: str = "", size: int = 160) -> str:
    """A small grid of pictures with a caption each (`mfv.visualize`'s pictures)."""
    figures = [_figure(f'<img src="{data_uri(image, size)}" alt="{escape(caption)}" '
                       f'style="max-width:{size}px">', caption)
               for image, caption in zip(images, captions, strict=True)]
    head = f"<div><b>{escape(title)}</b></div>" if title else ""
    return f'<div class="mfv-pictures">{head}<div style="{_ROW}">{"".join(figures)}</div></div>'


# -------------------------------------------------------------------------------- facets
def _metric_rows(columns: dict[str, dict[str, Any]], keys: Iterable[str] = KEY_METRICS) -> str:
    """A small table: a row per key metric present, a column per recipe; '' when none."""
    shown = [k for k in keys if any(k in c for c in columns.values())]
    if not shown:
        return ""
    head = "".join(f"<th style='padding:0 6px'>{escape(name)}</th>" for name in columns)
    rows = []
    for key in shown:
        info = describe(key)
        cells = "".join(f"<td style='padding:0 6px'>{escape(format_value(c.get(key), info.kind))}"
                        "</td>" for c in columns.values())
        rows.append(f"<tr><td title='{escape(info.explanation)}'>{escape(info.label)}</td>"
                    f"{cells}</tr>")
    return (f"<table style='font-size:11px;border-collapse:collapse'><tr><th></th>{head}</tr>"
            f"{''.join(rows)}</table>")


def facet_html(facet: Any, where: Any, activations: dict[str, float] | None = None) -> str:
    """One facet side by side: its picture per recipe, its mean image, a strip of its member
    photos, its size and its photos' activations, and its key metrics per recipe."""
    act = facet.activation_real
    pictures = [_figure(img(where.generated(v.path), PICTURE_PX, f"facet {facet.rank}, {recipe}"),
                        recipe, f"activation {number(v.activation, 4)}")
                for recipe, v in facet.visualizations.items()]
    if facet.mean_image:
        pictures.append(_figure(img(where.generated(facet.mean_image), PICTURE_PX,
                                    f"facet {facet.rank} mean image"), "mean image",
                                f"of {len(facet.representatives) or '?'} photos"))
    members = list(dict.fromkeys([*facet.representatives, *facet.members]))
    activations = activations or {}
    strip = "".join(img(where.photo(p), PHOTO_PX, p, f"{p}, activation "
                        f"{number(activations.get(p), 4)}", fmt="JPEG")
                    for p in members[:STRIP])
    more = len(members) - STRIP
    if more > 0:
        strip += f"<span style='{_MUTED}'>+{more} more</span>"
    facts = (f"{facet.size} photos · photos' activation mean {number(act.mean, 4)}, "
             f"best {number(act.max, 4)}")
    width = max(2, len(pictures)) * (PICTURE_PX + 12)  # the strip wraps below the pictures
    return (f'<div class="mfv-facet" style="border-left:4px solid {facet_colour(facet.rank)};'
            f'padding:2px 8px;max-width:{width}px"><div><b>facet {facet.rank}</b> '
            f"<span style='{_MUTED}'>{escape(facts)}</span></div>"
            f'<div style="{_ROW}">{"".join(pictures)}</div>'
            f'<div style="display:flex;flex-wrap:wrap;gap:2px;margin:4px 0">{strip}</div>'
            f"{_metric_rows(facet.metrics)}</div>")


def facet_map(target: Any) -> str:
    """The target's photos embedded in 2-D, one dot per photo coloured by its facet, as an
    inline SVG with a legend; '' when the run has no map (yet)."""
    points = [p for p in target.map if p.x is not None and p.y is not None][:MAP_POINTS]
    if not points:
        return ""
    xs, ys = [p.x for p in points], [p.y for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    scale = min((MAP_W - 2 * MAP_PAD) / dx, (MAP_H - 2 * MAP_PAD) / dy)
    ox, oy = (MAP_W - dx * scale) / 2 - min(xs) * scale, (MAP_H - dy * scale) / 2 + max(ys) * scale
    dots = "".join(
        f'<circle cx="{ox + p.x * scale:.1f}" cy="{oy - p.y * scale:.1f}" r="3" '
        f'fill="{facet_colour(p.facet)}"><title>{escape(p.path)} (facet {p.facet}, activation '
        f"{escape(number(p.activation, 4))})</title></circle>" for p in points)
    sizes = {f.rank: f.size for f in target.facets}
    ranks = sorted({*sizes, *(p.facet for p in points if p.facet >= 0)})
    legend = "".join(
        f"<span style='margin-right:8px'><span style='color:{facet_colour(r)}'>&#9632;</span> "
        f"facet {r} ({sizes.get(r, '?')})</span>" for r in ranks)
    return (f'<figure class="mfv-map" style="{_FIG}"><svg width="{MAP_W:.0f}" '
            f'height="{MAP_H:.0f}" viewBox="0 0 {MAP_W:.0f} {MAP_H:.0f}" role="img" '
            f'style="background:#fafafa;border:1px solid #ddd">{dots}</svg>'
            f"<figcaption>facet map: {len(points)} photos in 2-D<br>{legend}</figcaption>"
            "</figure>")


# ------------------------------------------------------------------------------- targets
def target_html(target: Any, where: Any) -> str:
    """A target: its facts, its facet map and its facets side by side, its random starts."""
    facts = []
    if target.class_name is not None or target.class_index is not None:
        facts.append(f"class {target.class_name or '?'} (#{target.class_index})")
    if target.k_chosen is not None:
        facts.append(f"{target.k_chosen} facets (asked {target.k_requested})")
    if target.selection is not None and target.selection.n is not None:
        facts.append(f"{target.selection.n} photos clustered ({target.selection.policy})")
    best = target.activation_max_real
    if best is not None:
        facts.append(f"best photo's activation {number(best, 4)}")
    activations = {p.path: p.activation for p in target.map}
    facets = "".join(facet_html(f, where, activations) for f in target.facets) or \
        f"<span style='{_MUTED}'>no facets yet (the run stopped before its facets stage)</span>"
    baselines = [_figure(img(where.generated(v.path), PICTURE_PX // 2, f"random start, {recipe}"),
                         recipe, number(v.activation, 3))
                 for recipe, items in target.baselines.items() for v in items]
    random = (f"<div style='{_MUTED}'>random starts (for comparison)</div>"
              f'<div style="{_ROW}">{"".join(baselines)}</div>') if baselines else ""
    table = _metric_rows(_target_columns(target))
    if table:
        table = f"<div style='{_MUTED}'>per recipe, mean over the target's facets</div>{table}"
    mis = target.metrics.mis
    verdict = (f"<div><b>MIS</b> {escape(mis.verdict)}</div>"
               if mis is not None and mis.verdict else "")
    return (f'<div class="mfv-target" style="margin:6px 0 14px 0">'
            f"<div style='font-size:15px'><b>{escape(target.spec or '?')}</b> "
            f"<span style='{_MUTED}'>{escape(' · '.join(facts))}</span></div>"
            f'<div style="{_ROW}">{facet_map(target)}{facets}</div>{random}{table}{verdict}'
            "</div>")


def _target_columns(target: Any) -> dict[str, dict[str, Any]]:
    """Per recipe, the facet pictures' metrics averaged, next to its random starts'."""
    columns: dict[str, dict[str, Any]] = {}
    for recipe in dict.fromkeys([*target.recipes, *target.metrics.random]):
        pictures = target.picture_metrics(recipe)
        if pictures or recipe in target.metrics.facet:
            columns[f"{recipe}: facets"] = {**means(pictures),
                                           **target.metrics.facet.get(recipe, {})}
        if recipe in target.metrics.random:
            columns[f"{recipe}: random starts"] = target.metrics.random[recipe]
    return columns if len(columns) > 1 or any(len(c) for c in columns.values()) else {}


# ------------------------------------------------------------------------------- a run
def results_html(results: Any, where: Any) -> str:
    """A run: where it is, its status, model and data, the evaluation's key metrics per recipe,
    and its targets (the first `TARGETS_SHOWN`)."""
    m, d = results.model, results.data
    seconds = sum(v for v in results.timings.values() if v is not None and math.isfinite(v))
    facts = [f"status {results.status or '?'}",
             f"model {m.name or '?'} ({m.class_ or '?'}, {m.parameters or 0:,} parameters)",
             f"device {results.device or '?'}",
             f"{len(results.targets)} target{'' if len(results.targets) == 1 else 's'}"]
    if d is not None:
        facts.append(f"{number(d.n_valid)} of {number(d.n_images)} photos read")
    facts.append(f"{seconds:.0f} s")
    done = [s for s, state in results.stages.items() if state == "done"]
    error = (f"<div style='color:#b00020'>error: {escape(results.error)}</div>"
             if results.error else "")
    evaluation = _metric_rows(results.evaluation or {})
    if evaluation:
        evaluation = f"<div style='{_MUTED}'>per recipe, mean over all facets</div>{evaluation}"
    shown = "".join(target_html(t, where) for t in results.targets[:TARGETS_SHOWN])
    hidden = len(results.targets) - TARGETS_SHOWN
    if hidden > 0:
        shown += f"<div style='{_MUTED}'>{hidden} more targets: see the report</div>"
    place = f"mfv run {where.root}" if where.root else "mfv run"
    report = f" · report: {where.root / 'index.html'}" if where.root else ""
    return (f'<div class="mfv-results" style="font-family:sans-serif">'
            f"<div style='font-size:16px'><b>{escape(place)}</b></div>"
            f"<div style='{_MUTED}'>{escape(' · '.join(facts))} · stages done: "
            f"{escape(', '.join(done) or 'none')}{escape(report)}</div>{error}"
            f"{evaluation}{shown}</div>")

"""The report's pages: Jinja2 templates with autoescaping on one base layout.

Every page is a template in `mfv/report/templates/` that extends `base.html` (the header, the
navigation between the run's pages, the inline CSS and script, the footer) and fills its
`content` block; `macros.html` holds the pieces pages share (pictures with placeholders, member
strips, key/value and metric tables, sparklines). Autoescaping is on for every template, so any
string a context holds (file names, class names, labels, targets) reaches the page as text;
data for the page's script goes through the `script_json` filter, which no string can break out
of. Pages need no network: CSS and script are inline, images are files of the run directory,
linked relative to the page (`Links`).

Adding a page (e.g. the "Layers" page of `mfv sweep`):

1. write `templates/<name>.html`: `{% extends "base.html" %}`, fill `{% block content %}`
   (optionally `header`, under the page's heading, and `footer`), and import what it needs
   from `macros.html` (`picture`, `member_strip`, `kv_table`, `metric_table`, `sparkline`);
2. add `PageSpec("<name>", "<nav label>", attrgetter("<RunLayout path property>"))` to `PAGES`
   (their order is the navigation's; a page is listed once its file exists, so the run page
   links to the Layers page only in runs that have one);
3. build the context: `title`, what the template uses (`Img` pictures with URLs from
   `Links(run, PAGES["<name>"])`, thumbnails from `mfv.report.thumbs.make_thumbs`, `KV` rows),
   optionally `script_data` for report.js; then `write_page(run, "<name>", context)`.

report.js runs on every page: a `section.target` with `.card.facet[data-facet]` cards and a
`.mapbox` gets the run page's highlighting and map tooltips there too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from mfv.core.io import atomic_write_text
from mfv.core.layout import RunLayout
from mfv.report.thumbs import Thumb, region_key
from mfv.results.display import facet_colour


@dataclass(frozen=True)
class PageSpec:
    """One page of the report: its template `<name>.html`, its label in the navigation and
    where the run directory keeps it."""

    name: str
    label: str
    file: Callable[[RunLayout], Path]

    @property
    def template(self) -> str:
        return f"{self.name}.html"


PAGES: Mapping[str, PageSpec] = MappingProxyType({
    "run": PageSpec("run", "Run", attrgetter("report_file")),
    "layers": PageSpec("layers", "Layers", attrgetter("layers_page")),
})


@dataclass(frozen=True)
class Img:
    """An image for `macros.picture`, or the placeholder (saying why) for a missing one."""

    url: str | None  # from `Links`; None: show the placeholder
    alt: str
    cls: str
    title: str = ""
    missing: str = "not available"
    lazy: bool = False
    href: str | None = None  # where a click leads (a crop's whole photo, its box outlined)


STRIP_MAX = 12  # real member images shown per facet
CROP_TITLE = " — the crop its unit saw (click: the whole photo)"  # after a crop's path


def strip_keys(representatives: list[str], members: list[str],
               boxes: Mapping[str, list[int]], frame: tuple[int, int] | None
               ) -> list[tuple[str, str, str | None]]:
    """A facet's strip, representatives first, at most STRIP_MAX: (path, thumbnail key, key of
    the picture a click opens). A member with a box (patch facets) shows the crop its unit saw
    and opens the whole photo with the crop outlined."""
    shown = list(dict.fromkeys([*representatives, *members]))[:STRIP_MAX]
    return [(p, region_key(p, boxes[p], frame), region_key(p, boxes[p], frame, whole=True))
            if p in boxes and frame else (p, p, None) for p in shown]


def frame_of(preprocess: object) -> tuple[int, int] | None:
    """The scanned frame (resize size, input size) that patch facets' boxes are in, from a
    model's preprocessing as results record it."""
    pre = preprocess if isinstance(preprocess, dict) else {}
    return (int(pre["resize_size"]), int(pre["input_size"])) if "resize_size" in pre and \
        "input_size" in pre else None


colour = facet_colour  # a facet's fixed colour, the same in the notebook (mfv.results.display)


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


def section_id(slug: str, index: int) -> str:
    """The id of a target's section: `t<index>-<slug>` (slug reduced to safe characters)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", slug)[:60]
    return f"t{index}-{slug}" if slug else f"t{index}"


@dataclass(frozen=True)
class KV:
    """A row of `macros.kv_table` (or a chip): a label, its value, an explanation on hover."""

    label: str
    value: str
    title: str = ""


def script_json(obj: Any) -> Markup:
    """JSON that is safe inside a <script> element whatever strings it holds (no '<', '>' or
    '&' left, so nothing can close the element or open a comment); NaN is refused."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def environment() -> jinja2.Environment:
    """The templates, autoescaped, strict about undefined names."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mfv.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters["script_json"] = script_json
    return env


def _asset(name: str) -> Markup:
    """Our own CSS or script, inlined verbatim (it is not user data)."""
    return Markup(resources.files("mfv.report").joinpath(name).read_text(encoding="utf-8"))


class Links:
    """URLs from one page to the files of its run directory (percent-quoted, relative to the
    page, only for files that exist), so the page works from file:// anywhere it is copied with
    its run directory."""

    def __init__(self, run: RunLayout, page: PageSpec) -> None:
        self.run = run
        self.root = run.root
        self.base = page.file(run).parent

    def _url(self, path: Path) -> str:
        try:
            rel = os.path.relpath(path, self.base)
        except ValueError:  # another drive on Windows
            return path.resolve().as_uri()
        return quote(rel.replace(os.sep, "/"))

    def file(self, rel: Any) -> str | None:
        """The URL of a generated file given relative to the run directory, if it exists."""
        if not rel or not isinstance(rel, str):
            return None
        path = self.root / rel
        return self._url(path) if path.is_file() else None

    def thumb(self, thumb: Thumb | None) -> str | None:
        """The URL of a thumbnail (`Thumb.url` is relative to the run directory)."""
        return self._url(self.root / thumb.url) if thumb and thumb.url else None

    def page(self, spec: PageSpec) -> str:
        """The URL of another page of the report."""
        return self._url(spec.file(self.run))


def _version() -> str:
    try:
        return metadata.version("mfv")
    except metadata.PackageNotFoundError:
        return "unknown"


def render_page(run: RunLayout, name: str, context: Mapping[str, Any]) -> str:
    """The HTML of page `name` of `PAGES` for `context`, which gives what the page's template
    needs (`title` for every page; `script_data` for the page's script, an empty object if
    absent); the navigation, CSS, script and mfv's version come from here."""
    spec = PAGES[name]
    links = Links(run, spec)
    pages = [{"label": p.label, "url": links.page(p), "current": p.name == name}
             for p in PAGES.values() if p.name == name or p.file(run).is_file()]
    base = {"pages": pages, "css": _asset("report.css"), "js": _asset("report.js"),
            "script_data": {}, "mfv_version": _version()}
    return environment().get_template(spec.template).render({**base, **context})


def write_page(run: RunLayout, name: str, context: Mapping[str, Any]) -> Path:
    """Render page `name` and write it (atomically) where the run directory keeps it."""
    return atomic_write_text(PAGES[name].file(run), render_page(run, name, context))

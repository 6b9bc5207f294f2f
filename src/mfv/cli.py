"""The `mfv` command: a thin layer over the Python API (`mfv.run`, `mfv.demo`, `mfv.sweep`).

Every run option comes from `mfv.runtime.settings.Settings` (its flag, help text, type and
choices), so the command line, a TOML file and Python keywords accept the same values with the
same checks; each command lists the settings of the stages it runs (`SECTIONS`), by section.
A user's mistake prints one line and exits with status 2; `--debug` (or MFV_DEBUG=1) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import typing
from collections.abc import Iterator
from typing import Any

from mfv.core.allocator import keep_freed_memory
from mfv.core.errors import MfvError

STAGE_HELP = {
    "run": "the whole pipeline: scan, facets, render, evaluate, report",
    "scan": "record every target's activations and each image's code",
    "facets": "cluster each target's activating images into facets (runs scan if needed)",
    "render": "synthesize one visualization per facet (runs earlier stages if needed)",
    "evaluate": "measure the quality of facets and visualizations",
    "report": "write RUN/index.html and RUN/results.json (runs earlier stages if needed)",
}
_ALL = ("scan", "facets", "render", "evaluate", "backend")
SECTIONS = {  # the settings' sections each command uses, besides the common ones
    "run": _ALL, "scan": ("scan",), "facets": ("scan", "facets"),
    "render": ("scan", "facets", "render", "backend"), "evaluate": _ALL, "report": _ALL,
    "demo": _ALL, "sweep": ("scan", "facets", "render", "backend", "sweep")}
HIDDEN = {  # settings a command decides itself
    "demo": ("model", "weights", "images", "targets"),
    "sweep": ("targets", "facets", "baseline", "steps", "as_written", "anchor_weight",
              "match_weight", "match_layers", "match_every", "min_facet_size", "merge", "selection",
              "scan_mode")}  # --mean-resize stays: the Layers page's mean images follow it


def _number(text: str) -> int | str:
    """An integer option's value as an int; anything else stays text, so that the settings model
    rejects it with the message a settings file or a Python keyword gets for the same value."""
    try:
        return int(text)
    except ValueError:
        return text


def _real(text: str) -> float | str:
    """A decimal option's value as a float; anything else stays text (as `_number`)."""
    try:
        return float(text)
    except ValueError:
        return text


def _judges_value(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    return () if names == ("none",) else names


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed strings of a Literal (also inside a tuple or an Optional)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if arg is int:  # a number or a word ('auto', 'all'): its metavar says so
            return None
        found = _choices(arg)
        if found:
            return found
    return None


def _scalar(annotation: Any) -> Any:
    """How an option's text is read: `_number` for integer settings, `_real` for decimal ones
    (also Optional ones), else as it is."""
    kinds = {annotation, *typing.get_args(annotation)}
    return _number if int in kinds else _real if float in kinds else str


def _add_settings(p: argparse.ArgumentParser, command: str) -> None:
    """One option per setting that has a flag and that `command` uses, grouped by section
    (defaults stay None: unset means the default)."""
    from mfv.runtime.settings import SECTIONS as KINDS
    from mfv.runtime.settings import Settings

    p.add_argument("--config", help="TOML file with settings (options given here win)")
    fields = [(None, name, info) for name, info in Settings.model_fields.items()
              if name not in KINDS]
    fields += [(section, flat, KINDS[section].model_fields[attribute])
               for section in SECTIONS[command]
               for flat, attribute in KINDS[section].flat_names().items()]
    groups: dict[str | None, Any] = {}
    seen = set(HIDDEN.get(command, ()))
    for section, name, info in fields:
        extra = info.json_schema_extra or {}
        if not extra.get("flag") or name in seen:
            continue
        seen.add(name)
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section or 'common'} options")
        _add_option(groups[section], name, info, extra)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_option(p: Any, name: str, info: Any, extra: dict) -> None:
    flag, help_text = extra["flag"], info.description
    choices = _choices(info.annotation)  # shown in the help; checked by Settings, like a file's
    shown = extra.get("metavar") or ("{" + ",".join(choices) + "}" if choices else None)
    if extra.get("negate"):
        p.add_argument(flag, dest=name, action="store_false", default=None, help=help_text)
    elif info.annotation is bool:
        p.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
    elif extra.get("repeat"):
        p.add_argument(flag, dest=name, action="append", help=help_text,
                       metavar=shown or flag.strip("-").upper())
    elif extra.get("judges"):
        p.add_argument(flag, dest=name, type=_judges_value, help=help_text)
    else:
        p.add_argument(flag, dest=name, type=_scalar(info.annotation), metavar=shown,
                       help=help_text)


def _settings(args: argparse.Namespace):
    from mfv.runtime.settings import locations, make_settings

    options = {name: getattr(args, name, None) for name in locations()}
    return make_settings(args.config, **options)


def _cmd_layers(args: argparse.Namespace) -> None:
    from mfv.models import load_model
    from mfv.models.receptive import receptive_fields
    from mfv.models.targets import LayerRef

    model = load_model(args.model, device=args.device)
    if args.size:
        model.preprocess = model.preprocess.resized(args.size)
    infos = model.layers()
    fields = receptive_fields(model, [LayerRef(i.path) for i in infos], measure=args.erf)
    width = max(len(i.path) for i in infos)
    print(f"{'layer':<{width}}  {'kind':<18} {'output shape':<18} {'units':>6}  stride  RF (px)"
          + ("  ERF 90% (px)" if args.erf else ""))
    for info in infos:
        shape = "x".join(map(str, info.shape))
        rf = fields.get(info.path)
        where = f"{rf.stride:>6}  {rf.theoretical:>7}" if rf else ""
        if rf and args.erf:
            where += f"  {rf.effective if rf.effective is not None else '-':>12}"
        print(f"{info.path:<{width}}  {info.kind:<18} {shape:<18} {info.units:>6}  {where}"
              .rstrip())
    print(f"\nRF: the theoretical receptive field at {model.preprocess.input_size} px input "
          "(kernels and strides up to the layer)" + ("; ERF: the effective one, the square "
          "holding 90% of |d centre unit / d input| over 4 random images" if args.erf else
          "; --erf also measures the effective one (a backward pass per layer)"))
    if model.logits_layer:
        print(f"\naliases: logits = {model.logits_layer}, penultimate = input of "
              f"{model.logits_layer}")


def _cmd_stage(args: argparse.Namespace) -> None:
    import mfv.runtime.pipeline

    started = time.perf_counter()
    until = "report" if args.command == "run" else args.command
    results = mfv.runtime.pipeline.run(_settings(args), until=until)
    _summary(results, time.perf_counter() - started)


def _cmd_demo(args: argparse.Namespace) -> None:
    from mfv.demo import demo

    started = time.perf_counter()
    results = demo(_settings(args))
    _summary(results, time.perf_counter() - started)


def _cmd_sweep(args: argparse.Namespace) -> None:
    from mfv.study.layers import sweep, sweep_summary

    started = time.perf_counter()
    doc = sweep(_settings(args))
    for row in sweep_summary(doc):
        cells = "  ".join(f"{name} {_mean_text(row[name]['mean'])}" for name in doc["measures"])
        print(f"{row['layer']}: {row['units']} units  {cells}")
    out = doc["settings"]["out"]
    print(f"sweep: {out}/sweep/sweep.json  plot: {out}/{doc['plot']['png']}  "
          f"({time.perf_counter() - started:.0f} s)")


def _mean_text(value: float | None) -> str:
    """A measure's layer mean as the summary prints it; "–" where no unit has one (e.g. the
    silhouette of a layer whose units all have one facet)."""
    return "–" if value is None else f"{value:.3g}"


def _summary(results: Any, seconds: float) -> None:
    """What a run made, in a few lines (`results`: the typed results `mfv.run` returns)."""
    out = results.settings["out"]
    for target in results.targets:
        sizes = ", ".join(str(f.size) for f in target.facets)
        print(f"{target.spec}: {len(target.facets)} facets ({sizes})")
    print(f"report: {out}/index.html  results: {out}/results.json  ({seconds:.0f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfv", description="Multifaceted Feature Visualization: one picture per facet of "
        "a neuron.")
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers", help="list every addressable layer of a model")
    layers.add_argument("model", nargs="?", default="efficientnet_lite0")
    layers.add_argument("--size", type=int, default=None, help="input size (default: model's)")
    layers.add_argument("--erf", action="store_true", help="also measure each spatial layer's "
                        "effective receptive field (a backward pass per layer)")
    layers.add_argument("--device", default="auto")
    layers.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    layers.set_defaults(func=_cmd_layers)
    for name, text in STAGE_HELP.items():
        stage = sub.add_parser(name, help=text, description=text)
        _add_settings(stage, name)
        stage.set_defaults(func=_cmd_stage)
    demo = sub.add_parser("demo", help="the whole pipeline on EfficientNet-Lite0 and the "
                          "built-in photo pool (offline, a few minutes on a CPU)")
    _add_settings(demo, "demo")
    demo.set_defaults(func=_cmd_demo)
    text = "how multifaceted is each layer: facets of sampled units per layer, measured"
    sweep = sub.add_parser("sweep", help=text, description=text)
    _add_settings(sweep, "sweep")
    sweep.set_defaults(func=_cmd_sweep)
    return parser


@contextlib.contextmanager
def _messages() -> Iterator[None]:
    """The library's messages (its `logging` records) as plain lines while a command runs: what
    it did (INFO) on stdout, warnings on stderr."""
    logger = logging.getLogger("mfv")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    level = logger.level
    logger.addHandler(out)
    logger.addHandler(err)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(out)
        logger.removeHandler(err)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MFV_DEBUG") == "1"
    keep_freed_memory()  # the command owns its process, so it tunes the allocator (a library not)
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write fails (WriteError), not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with _messages():
            args.func(args)
    except MfvError as exc:
        if debug:
            raise
        print(f"mfv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmfv: interrupted; finished work is kept: run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

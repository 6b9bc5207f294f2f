"""The `mfv` command: a thin layer over the Python API (`mfv.run`, `mfv.models`, ...)."""

from __future__ import annotations

import argparse
import sys
import time

from mfv.errors import MfvError

STAGE_HELP = {
    "run": "the whole pipeline: scan, facets, render, evaluate, report",
    "scan": "record every target's activations and each image's code",
    "facets": "cluster each target's activating images into facets (runs scan if needed)",
    "render": "synthesize one visualization per facet (runs earlier stages if needed)",
    "evaluate": "measure the quality of facets and visualizations",
    "report": "write RUN/index.html and RUN/results.json (runs earlier stages if needed)",
}


def _cmd_layers(args: argparse.Namespace) -> None:
    from mfv.models import load_model

    model = load_model(args.model, device=args.device)
    infos = model.layers(args.size)
    width = max(len(i.path) for i in infos)
    print(f"{'layer':<{width}}  {'kind':<18} {'output shape':<18} units")
    for info in infos:
        shape = "x".join(map(str, info.shape))
        print(f"{info.path:<{width}}  {info.kind:<18} {shape:<18} {info.units}")
    if model.logits_layer:
        print(f"\naliases: logits = {model.logits_layer}, penultimate = input of "
              f"{model.logits_layer}")


def _facets_value(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a number or 'auto'") from None


def _judges_value(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    return () if names == ("none",) else names


def _add_run_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--out", help="run directory (default: mfv-run, demo: mfv-demo)")
    p.add_argument("--config", help="TOML file with settings (options given here win)")
    if not demo:
        p.add_argument("--model", help="efficientnet_lite0 (default), torchvision:NAME, "
                       "timm:NAME or a TorchScript file")
        p.add_argument("--weights", help="state dict (.safetensors / .pt) for the model")
        p.add_argument("--images", help="folder (class subfolders = labels), .txt list, or demo")
        p.add_argument("--target", dest="targets", action="append", metavar="TARGET",
                       help="LAYER:UNIT, a class name, or a sum like '_fc:0 + _fc:701' "
                       "(repeatable; LAYER:* = every unit)")
    p.add_argument("--facets", type=_facets_value, help="number of facets k, or 'auto' "
                   "(default 10, the paper's)")
    p.add_argument("--mean-of", type=int, dest="mean_of", help="images per mean image (15)")
    p.add_argument("--selection", choices=["auto", "class", "top"],
                   help="which images a target's facets come from (default auto: the class's "
                   "images for class logits when labels exist, else the top-N)")
    p.add_argument("--top-n", type=int, dest="top_n", help="N for the top-N selection (200)")
    p.add_argument("--embedding", choices=["tsne", "pca", "umap"])
    p.add_argument("--min-facet-size", type=int, dest="min_facet_size")
    p.add_argument("--recipe", dest="recipes", action="append",
                   choices=["paper-mean", "paper-center", "fourier"],
                   help="synthesis recipe (repeatable; default paper-mean)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", default=None,
                   help="skip the random-start baseline visualizations")
    p.add_argument("--steps", type=int, help="total optimization steps (default: the recipe's)")
    p.add_argument("--as-written", dest="quirks", action="store_false", default=None,
                   help="use the paper's schedules as written, not as the authors' code ran")
    p.add_argument("--reduction", choices=["center", "max", "mean", "cls"],
                   help="how a spatial map gives one number (default center, the paper's)")
    p.add_argument("--activation", choices=["pre", "post"])
    p.add_argument("--code-layer", dest="code_layer", help="layer whose outputs are clustered")
    p.add_argument("--mean-resize", dest="mean_resize", choices=["crop", "squash"])
    p.add_argument("--judges", type=_judges_value, help="models that judge transferability, "
                   "comma-separated, or 'none' (default: efficientnet_lite1,efficientnet_lite2)")
    p.add_argument("--size", type=int, help="the model's input size in pixels for scanning, mean "
                   "images and synthesis (default: the model's own, 224 for Lite0; the paper's "
                   "CaffeNet used 227)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="synthesis batch size")
    p.add_argument("--scan-batch-size", type=int, dest="scan_batch_size")
    p.add_argument("--workers", type=int, help="image decoding processes (default 1)")
    p.add_argument("--quiet", dest="progress", action="store_false", default=None)


_OPTION_NAMES = ("out", "model", "weights", "images", "targets", "facets", "mean_of", "selection",
                 "top_n", "embedding", "min_facet_size", "recipes", "baseline", "steps",
                 "quirks", "reduction", "activation", "code_layer", "mean_resize", "judges",
                 "size", "seed", "device", "batch_size", "scan_batch_size", "workers", "progress")


def _settings(args: argparse.Namespace):
    from mfv.settings import make_settings

    options = {name: getattr(args, name, None) for name in _OPTION_NAMES}
    return make_settings(args.config, **options)


def _cmd_stage(args: argparse.Namespace) -> None:
    import mfv.pipeline

    started = time.perf_counter()
    until = "report" if args.command == "run" else args.command
    results = mfv.pipeline.run(_settings(args), until=until)
    _summary(results, args, time.perf_counter() - started)


def _cmd_demo(args: argparse.Namespace) -> None:
    from mfv.demo import demo

    started = time.perf_counter()
    results = demo(_settings(args))
    _summary(results, args, time.perf_counter() - started)


def _summary(results: dict, args: argparse.Namespace, seconds: float) -> None:
    out = results["settings"]["out"]
    for target in results["targets"]:
        sizes = ", ".join(str(f["size"]) for f in target["facets"])
        print(f"{target['spec']}: {len(target['facets'])} facets ({sizes})")
    print(f"report: {out}/index.html  results: {out}/results.json  ({seconds:.0f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfv", description="Multifaceted Feature Visualization: one picture per facet of "
        "a neuron.")
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers", help="list every addressable layer of a model")
    layers.add_argument("model", nargs="?", default="efficientnet_lite0")
    layers.add_argument("--size", type=int, default=None, help="input size (default: model's)")
    layers.add_argument("--device", default="cpu")
    layers.set_defaults(func=_cmd_layers)
    for name, text in STAGE_HELP.items():
        stage = sub.add_parser(name, help=text, description=text)
        _add_run_options(stage)
        stage.set_defaults(func=_cmd_stage)
    demo = sub.add_parser("demo", help="the whole pipeline on EfficientNet-Lite0 and the "
                          "built-in photo pool (offline, a few minutes on a CPU)")
    _add_run_options(demo, demo=True)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MfvError as exc:
        print(f"mfv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmfv: interrupted; finished work is kept: run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

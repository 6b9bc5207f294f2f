"""The `mfv` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from mfv.errors import MfvError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfv", description=__doc__.splitlines()[0] if __doc__
                                     else None)
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers", help="list every addressable layer of a model")
    layers.add_argument("model", nargs="?", default="efficientnet_lite0")
    layers.add_argument("--size", type=int, default=None, help="input size (default: model's)")
    layers.add_argument("--device", default="cpu")
    layers.set_defaults(func=_cmd_layers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MfvError as exc:
        print(f"mfv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mfv: interrupted; finished work is kept, run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

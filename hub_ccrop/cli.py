"""The ``hub-ccrop`` command: train, show, evaluate, fine-tune, export and publish."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands through an ``add_cli(subparsers)`` function, in help order.
COMMAND_MODULES = ("hub_ccrop.show", "hub_ccrop.evaluate", "hub_ccrop.detection", "hub_ccrop.hub")


def build_parser() -> argparse.ArgumentParser:
    from hub_ccrop import __version__, train

    parser = argparse.ArgumentParser(prog="hub-ccrop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hub-ccrop {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = subparsers.add_parser("train", help="train a recipe (also: accelerate launch -m hub_ccrop.train)",
                                         description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.run_from_args)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``hub-ccrop train RECIPE`` (also ``accelerate launch -m hub_ccrop train RECIPE`` for several processes):
train a recipe, with ``--set key=value`` overrides, into a run folder; ``--resume`` continues it exactly."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hub_ccrop.recipe import load_recipe
from hub_ccrop.training import NonFiniteLossError, train

__all__ = ["add_arguments", "add_cli", "run_from_args"]


def add_cli(subparsers: Any) -> None:
    """``hub-ccrop train``."""
    parser = subparsers.add_parser("train", help="train a recipe (also: accelerate launch -m hub_ccrop train)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.epochs=20 (repeatable)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")


def run_from_args(args: argparse.Namespace) -> int:
    """``hub-ccrop train``; user mistakes raise (the caller's :func:`~hub_ccrop.errors.run_command` reports them)."""
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        train(recipe, args.output_dir, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0

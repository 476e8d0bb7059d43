"""The ``hub-ccrop`` command: train, show, evaluate, fine-tune, export and publish.

A mistake in the input (a missing file, a bad recipe key, the Hub out of reach) prints one line and exits
with code 2; add --debug (anywhere on the line) for the traceback. An interrupted training run exits
with 130 (Ctrl-C) or 143 (SIGTERM) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub_ccrop.errors import run_command

__all__ = ["add_dataset_args", "build_parser", "default_output_dir", "main", "parse_data_files", "write_results"]

# Modules that contribute subcommands through an ``add_cli(subparsers)`` function, in help order.
COMMAND_MODULES = ("hub_ccrop.show", "hub_ccrop.evaluate", "hub_ccrop.detection", "hub_ccrop.hub")


def build_parser() -> argparse.ArgumentParser:
    from hub_ccrop import __version__
    from hub_ccrop.commands import train

    parser = argparse.ArgumentParser(prog="hub-ccrop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hub-ccrop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_parser = subparsers.add_parser("train", help="train a recipe (also: accelerate launch -m hub_ccrop train)",
                                         description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.run_from_args)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


# -- helpers shared by the subcommands (eval, finetune, detection) ---------------------------------------
def add_dataset_args(parser: argparse.ArgumentParser, *, dataset_help: str) -> None:
    """``--dataset/--config-name/--data-dir/--data-files`` and ``--image-column``."""
    parser.add_argument("--dataset", required=True, help=dataset_help)
    parser.add_argument("--config-name", default=None, help="dataset configuration name")
    parser.add_argument("--data-dir", default=None, help="local copy of the dataset (a folder)")
    parser.add_argument(
        "--data-files", action="append", default=None, metavar="[SPLIT=]PATH", help="repeatable; bare: train"
    )
    parser.add_argument("--image-column", default=None, help="default: the dataset spec's (else 'image')")


def parse_data_files(values: Sequence[str] | None) -> dict[str, list[str]] | None:
    """``--data-files`` values (``SPLIT=PATH``; a bare ``PATH`` belongs to ``train``) as ``{split: [paths]}``."""
    if not values:
        return None
    files: dict[str, list[str]] = {}
    for item in values:
        key, _, path = item.rpartition("=")
        files.setdefault(key or "train", []).append(path)
    return files


def default_output_dir(source: str, output: str | None, *, subfolder: str | None = None) -> Path:
    """Results go next to the run (a local source folder; else ``.``), in ``subfolder`` of it when given,
    unless ``--output`` says otherwise."""
    if output:
        return Path(output)
    base = Path(source) if Path(source).is_dir() else Path(".")
    return base / subfolder if subfolder else base


def write_results(output_dir: str | Path, filename: str, results: dict[str, Any]) -> Path:
    """Write ``results`` (+ the UTC date) as JSON to ``output_dir/filename``; returns the path."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**results, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the subcommand too, where users type it
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv:  # a newcomer's first try: the list of commands, not an argparse error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # e.g. `hub-ccrop eval` without its subcommand
        parser.parse_args([*argv, "--help"])
    return run_command(lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())

"""The ``hub-ccrop`` command: train, show, evaluate, fine-tune, export and publish.

A mistake in the input (a missing file, a bad recipe key, the Hub out of reach) prints one line and exits
with code 2; add --debug (anywhere on the line) for the traceback. An interrupted training run exits
with 130 (Ctrl-C) or 143 (SIGTERM) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hub_ccrop.errors import run_command

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

# All argparse of the project lives in this package (library code never imports it). Each module below,
# hub_ccrop.commands.<name>, defines ``add_cli(subparsers)`` and adds its subcommands; help lists them in
# this order. A new command module is one line here.
COMMAND_MODULES = (
    "train",
    "show",
    "evaluate",
    "detection",
    "hub",
    "recipe",
)


def build_parser() -> argparse.ArgumentParser:
    from hub_ccrop import __version__

    parser = argparse.ArgumentParser(prog="hub-ccrop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hub-ccrop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also after the command)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_cli(subparsers)
    return parser


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

"""What the subcommands share: adding one to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_command"]


def add_command(subparsers: Any, name: str, run: Callable[[argparse.Namespace], int | None], *, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser that runs ``run(args)``; ``description`` (e.g. a module docstring) keeps its lines."""
    parser = subparsers.add_parser(name, help=help, description=description or help,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run)
    return parser

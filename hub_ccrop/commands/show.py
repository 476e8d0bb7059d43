"""``hub-ccrop show``: heatmaps, boxes and crop pairs of a backbone on a run's or your own images."""

from __future__ import annotations

import argparse
from typing import Any

from hub_ccrop.commands.common import add_command


def add_cli(subparsers: Any) -> None:
    from hub_ccrop import show

    parser = add_command(subparsers, "show", run, description=show.__doc__,
                         help="draw heatmaps, boxes and crop pairs for a backbone on images")
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="run folder, export folder, local-dir:DIR or hf-hub:ORG/NAME")
    parser.add_argument("--input", nargs="+", default=None, help="image files or folders (default: the run's data)")
    parser.add_argument("--images", type=int, default=8, help="how many images (default 8)")
    parser.add_argument("--k", type=float, default=None, help="heatmap threshold (default: the run's, else 0.1)")
    parser.add_argument("--alpha", type=float, default=None, help="Beta(alpha, alpha) of the crops (default: the run's)")
    parser.add_argument("--out", default=None,
                        help="PNG path (default: RUN/pictures/show_NNNN.png or ./show_NNNN.png, the next free number)")


def run(args: argparse.Namespace) -> int:
    from hub_ccrop.show import show

    show(args.source, inputs=args.input, num_images=args.images, k=args.k, alpha=args.alpha, out=args.out)
    return 0

"""``hub-ccrop export`` and ``hub-ccrop publish``: a run as a timm Hub repo folder, uploaded to the Hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hub_ccrop.commands.common import add_command


def add_cli(subparsers: Any) -> None:
    add_export_arguments(add_command(subparsers, "export", run_export,
                                     help="write a timm Hub repo folder (weights, boxes, card) for a run"))
    add_publish_arguments(add_command(subparsers, "publish", run_publish,
                                      help="export a run and upload it to the Hugging Face Hub"))


def add_sharing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--license`` and ``--with-pictures``: what the export shares besides the weights."""
    parser.add_argument("--license", default=None, metavar="ID",
                        help="the weights' licence, a Hub licence id (apache-2.0, mit, cc-by-nc-4.0, other, ...); "
                             "default: the training data's terms (ImageNet's for ImageNet and the sets cut from it, "
                             "'other' for your own images, with a line on the card asking you to choose)")
    parser.add_argument("--with-pictures", action="store_true",
                        help="include the picture of training images (heatmaps, boxes, crops) even when the training "
                             "data is not a public dataset (by default only public datasets' images are shown)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder written by training")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    parser.add_argument("--repo-id", default=None, help="ORG/NAME used in the card's usage snippets")
    parser.add_argument("--template", default=None, help="model card template (default: model_cards/template.md)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    add_sharing_arguments(parser)


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (exported first) or an existing export folder (uploaded as is)")
    parser.add_argument("--repo-id", required=True, help="model repo ORG/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    parser.add_argument("--boxes-repo-id", default=None, help="also publish the box table as this dataset repo")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--template", default=None, help="model card template (default: model_cards/template.md)")
    add_sharing_arguments(parser)


def run_export(args: argparse.Namespace) -> int:
    from hub_ccrop.hub import export_run

    out = args.out or Path(args.run) / "export"
    export_run(args.run, out, repo_id=args.repo_id, template=args.template, overwrite=args.force,
               license=args.license, with_pictures=args.with_pictures)
    print(f"exported {args.run} -> {out} ({_shared(out)})")
    print(f"load it with: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def _shared(folder: Path) -> str:
    """What an export shares besides the weights, as its card and files say: the licence, the picture."""
    from huggingface_hub import metadata_load

    from hub_ccrop.hub.export import PICTURE_NAME

    license_id = (metadata_load(folder / "README.md") or {}).get("license")
    picture = "with" if (folder / PICTURE_NAME).is_file() else "no"
    return f"licence {license_id}, {picture} picture of training images"


def run_publish(args: argparse.Namespace) -> int:
    from hub_ccrop.hub import PublishError, publish_run

    try:
        result = publish_run(
            args.run, args.repo_id, private=args.private, revision=args.revision, export_dir=args.out,
            boxes_repo_id=args.boxes_repo_id, commit_message=args.message, template=args.template,
            license=args.license, with_pictures=args.with_pictures,
        )
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"published {result.export_dir} -> {result.repo_url} ({_shared(result.export_dir)})")
    print(f"commit: {result.commit_url}")
    if result.boxes_repo_url:
        print(f"box table: {result.boxes_repo_url}")
    print(f"load it with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    return 0

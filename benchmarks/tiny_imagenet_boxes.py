"""Tiny ImageNet photos with object boxes (issue 25): the spec, and training runs on a subset.

The sample (20,000 photos, 64 px, one ``gt_box`` each, rows shuffled) lives outside the repository, at
``$HUB_CCROP_SHARED/data/tiny_imagenet_boxes`` (``--data`` moves it). Runs pretrain on the first ``--rows``
rows; the kNN monitor uses them as its bank and the last 2,000 rows as its test images (never trained on).

    .venv/bin/python benchmarks/tiny_imagenet_boxes.py train --out /tmp/boxes_runs/tin_ccrop_s0 --seed 0
    .venv/bin/python benchmarks/tiny_imagenet_boxes.py train --out RUN --mode rcrop --epochs 16

The recipe is ``recipes/quickstart.yaml`` (SimCLR, ``resnet_tiny_cifar``, 32 px, k 0.5), or ``--recipe``, with the
dataset pointed at the photos; ``--set KEY=VALUE`` adds overrides.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from hub_ccrop.data import DatasetSpec, register_spec  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402

NAME = "tiny_imagenet_boxes"
TEST_ROWS = 2000  # the last rows: the kNN monitor's test images


def default_data_dir() -> Path:
    return Path(os.environ.get("HUB_CCROP_SHARED", REPO.parent / "shared")) / "data" / NAME


def register(data_dir: Path | None = None, rows: int = 8000) -> DatasetSpec:
    """Register the photos as the spec ``tiny_imagenet_boxes``: pretraining on ``train[:rows]``, ground truth kept."""
    data_dir = data_dir or default_data_dir()
    if not (data_dir / "data").is_dir():
        raise SystemExit(f"no Tiny ImageNet box sample at {data_dir} (set HUB_CCROP_SHARED or --data)")
    return register_spec(DatasetSpec(
        name=NAME, data_dir=str(data_dir), image_size=64, mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262), num_classes=200, extra_columns=("gt_box",),
        pretrain_splits=(f"train[:{rows}]",), train_split=f"train[:{rows}]", test_split=f"train[-{TEST_ROWS}:]",
    ))


def make_recipe(name: str, overrides: list[str], base: Path = REPO / "recipes" / "quickstart.yaml") -> Recipe:
    raw = yaml.safe_load(base.read_text())
    raw["name"] = name
    return load_recipe(raw, [f"data.dataset={NAME}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the quickstart recipe on the photos")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--rows", type=int, default=8000)
    t.add_argument("--data", type=Path, default=None)
    t.add_argument("--mode", default="ccrop", choices=("ccrop", "rcrop"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    args = parser.parse_args()
    register(args.data, args.rows)
    from hub_ccrop.training import train

    recipe = make_recipe(args.out.name, [f"crop.mode={args.mode}", f"train.seed={args.seed}",
                                         f"train.epochs={args.epochs}", "train.keep_checkpoints=1",
                                         *args.overrides], args.recipe)
    train(recipe, args.out)


if __name__ == "__main__":
    main()

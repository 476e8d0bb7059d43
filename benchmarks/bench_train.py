"""Training-loop benchmarks (issue 5), on this machine's CPU:

(a) one localization pass over the pretraining set / one training epoch (target <= 0.25);
(b) training throughput of ``hub_ccrop.training`` / a minimal hand-written PyTorch loop of the same
    method, model, data pipeline and batch (target >= 0.95);
(c) the quickstart: wall time, box IoU with the ground truth, and the share of view pairs in which a
    view misses the object, RandomResizedCrop vs ContrastiveCrop.

    python benchmarks/bench_train.py --part ab --rows 2048     # CIFAR-10 parquet from ../shared
    python benchmarks/bench_train.py --part c                  # the README's quickstart

Results go to benchmarks/bench_train.json (merged with earlier parts) and are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def _recipe(rows: int, batch: int, workers: int, model: str) -> dict:
    return {
        "name": "bench", "model": {"name": model}, "method": {"name": "simclr"},
        "data": {"dataset": "cifar10", "data_dir": str(CIFAR), "splits": [f"train[:{rows}]"], "batch_size": batch,
                 "num_workers": workers},
        "crop": {"warmup_epochs": 1, "loc_epochs": [1], "alpha": 0.1},
        "optim": {"lr": 0.5},
        "train": {"epochs": 2, "knn_every": 0, "log_every": 1000, "show_images": 0},
    }


def hand_written_loop(recipe, steps: int) -> float:
    """Images/s of the plainest loop: the same collate, DataLoader, method and SGD; nothing else."""
    from torch.utils.data import DataLoader

    from hub_ccrop.boxes import BoxTable
    from hub_ccrop.data import get_spec, load_images, num_ids
    from hub_ccrop.methods import build_method
    from hub_ccrop.models import create_backbone
    from hub_ccrop.views import ViewCollate

    spec = get_spec("cifar10", data_dir=str(CIFAR), pretrain_splits=tuple(recipe.data.splits))
    collate = ViewCollate.from_spec(spec, BoxTable(num_ids(spec)), alpha=0.1, mode="ccrop")
    loader = DataLoader(load_images(spec), batch_size=recipe.data.batch_size, shuffle=True, drop_last=True,
                        num_workers=recipe.data.num_workers, persistent_workers=recipe.data.num_workers > 0,
                        collate_fn=collate)
    method = build_method("simclr", create_backbone(recipe.model.name)).train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    done, start = 0, None
    while done < steps:
        for view1, view2, _, _ in loader:
            if start is None and done == 1:  # skip the first step (worker start-up)
                start, seen = time.perf_counter(), 0
            loss, _ = method(view1, view2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if start is not None:
                seen += view1.shape[0]
            done += 1
            if done >= steps:
                break
    return seen / (time.perf_counter() - start)


def part_ab(rows: int, batch: int, workers: int, model: str) -> dict:
    from hub_ccrop.recipe import load_recipe
    from hub_ccrop.training import train

    recipe = load_recipe(_recipe(rows, batch, workers, model))
    with tempfile.TemporaryDirectory() as out:
        train(recipe, out)
        history = json.loads((Path(out) / "metrics.json").read_text())["history"]
    epoch2 = history[1]  # the ContrastiveCrop epoch (epoch 1 includes worker start-up)
    steps = rows // batch
    hand = hand_written_loop(recipe, steps + 1)
    return {
        "setting": f"SimCLR {model}, CIFAR-10 train[:{rows}] (32 px), batch {batch}, {workers} workers, "
                   f"{torch.get_num_threads()} threads",
        "localization_seconds": history[0]["loc_seconds"],
        "epoch_seconds": epoch2["epoch_seconds"],
        "pass_over_epoch": history[0]["loc_seconds"] / epoch2["epoch_seconds"],
        "loop_images_per_s": epoch2["images_per_s"],
        "hand_written_images_per_s": hand,
        "loop_over_hand_written": epoch2["images_per_s"] / hand,
    }


def part_c() -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hub_ccrop.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
                        "--output-dir", out], check=True)
        wall = time.perf_counter() - start
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    keep = ("knn_top1", "box_iou", "box_area", "miss_rate_rcrop", "miss_rate_ccrop", "train_images_per_s")
    return {"command": "hub-ccrop train recipes/quickstart.yaml", "wall_seconds": wall} | {k: metrics[k] for k in keep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="abc", help="which parts to run: any of a/b (together) and c")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="resnet18_cifar")
    args = parser.parse_args()
    path = HERE / "bench_train.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
                       f"threads, no GPU", "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    if "a" in args.part or "b" in args.part:
        results["loop"] = part_ab(args.rows, args.batch, args.workers, args.model)
    if "c" in args.part:
        results["quickstart"] = part_c()
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

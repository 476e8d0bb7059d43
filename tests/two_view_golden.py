"""Seeded two-view training runs whose final weights were recorded before the view groups landed.

A recipe without ``views:`` must train exactly as the two-view code did (issue 21). Each case trains
2 epochs x 4 steps (warm-up with RandomResizedCrop, a localization pass, ContrastiveCrop) on one thread
and digests the backbone. ``python tests/two_view_golden.py`` prints the digests for
``tests/two_view_golden.json`` (recorded at commit 503d51e, the last two-view commit).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hub_ccrop.recipe import load_recipe
from hub_ccrop.synthetic import small_objects_dir
from hub_ccrop.training import train

GOLDEN = Path(__file__).with_name("two_view_golden.json")
METHODS = ("simclr", "moco_v2", "byol", "simsiam")
PATHS = ("per_image", "batched")
OPTIONS: dict[str, dict[str, Any]] = {"moco_v2": {"queue_size": 64}}


def case_recipe(data_dir: Path, method: str, path: str):
    return load_recipe({
        "name": f"golden_{method}_{path}",
        "model": {"name": "resnet_tiny_cifar"},
        "method": {"name": method, "options": OPTIONS.get(method, {})},
        "data": {"dataset": "small_objects", "data_dir": str(data_dir), "batch_size": 16, "num_workers": 0,
                 "image_size": 32, "batched_views": path == "batched"},
        # heatmap_flip: the golden weights were recorded with the paper's heatmaps (before issue 25 made flip the default)
        "crop": {"alpha": 0.6, "k": 0.5, "warmup_epochs": 1, "loc_interval": 1, "heatmap_flip": False},
        "optim": {"lr": 0.1},
        "train": {"epochs": 2, "knn_every": 0, "log_every": 4, "show_images": 0, "seed": 3},
    })


def digest(run: Path) -> dict[str, Any]:
    """sha256 of the backbone's tensors (sorted by name) and their float64 sum, for a readable mismatch."""
    weights = load_file(str(run / "backbone.safetensors"))
    h = hashlib.sha256()
    total = 0.0
    for name in sorted(weights):
        tensor = weights[name].contiguous()
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
        total += float(tensor.double().sum())
    return {"sha256": h.hexdigest(), "sum": total}


def run_case(root: Path, data_dir: Path, method: str, path: str) -> dict[str, Any]:
    out = root / f"{method}_{path}"
    train(case_recipe(data_dir, method, path), out)
    return digest(out)


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = small_objects_dir(root / "data", train=64, test=16)
        cases = {f"{m}/{p}": run_case(root, data_dir, m, p) for m in METHODS for p in PATHS}
    record = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__.split("+")[0],
              "cases": cases}
    json.dump(record, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

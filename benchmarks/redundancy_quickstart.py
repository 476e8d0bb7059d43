"""Barlow Twins and VICReg on the quickstart (issue 23): kNN against chance and against the untrained
network, and whether the representation collapsed.

Each method trains ``recipes/quickstart.yaml`` (small-objects set, ``resnet_tiny_cifar``, batch 128, 8
epochs, R-Crop warm-up then ContrastiveCrop) through the real loop, with the official optimizer of both
methods (LARS, lr 0.2 x batch / 256 with Barlow's biases at 0.0048 / 0.2 of it, weight decay 1e-6 without
biases and norms, per-step cosine to 0.001 x lr; warm-up 1 epoch instead of 10 of 1000) and a 512-wide
expander (8192 is the official width: minutes per epoch on a CPU). Then, from the run folder:

- kNN top-1 in % (k 200, T 0.1) on the 1,000 test images (the loop's monitor), chance 10%, and the same kNN
  with the untrained backbone (same seed), since random convolutional features are above chance already;
- collapse: the per-dimension std over the test images of the L2-normalized backbone features and of
  the expander's embeddings, times sqrt(dim) (about 1 when the directions spread evenly, 0 at collapse);
  the floor checked is 0.1 for both means, and no embedding dimension below 0.01 (the backbone's smallest
  is not checked: a ReLU channel that never fires has std 0, in the untrained network too).

    .venv/bin/python benchmarks/redundancy_quickstart.py            # both methods, ~the quickstart's time each
    .venv/bin/python benchmarks/redundancy_quickstart.py --methods vicreg --set train.epochs=2 \
        --set crop.warmup_epochs=1 --set "crop.loc_epochs=[1]" --set train.knn_every=2 --tag smoke

Writes ``benchmarks/redundancy_quickstart.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from evidence_small_objects import backbone_from_state, features, machine  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hub_ccrop.evaluate import knn_accuracy  # noqa: E402
from hub_ccrop.methods import build_method  # noqa: E402
from hub_ccrop.models import create_backbone  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402
from hub_ccrop.training import build_data, train  # noqa: E402

STD_FLOOR, DIM_FLOOR = 0.1, 0.01  # mean per-dimension std x sqrt(dim); the embedding's smallest
OVERRIDES = [
    "method.options={projector: [512, 512, 512]}",
    "optim.name=lars", "optim.lr=0.2", "optim.lr_scaling=linear", "optim.weight_decay=1.0e-6",
    "optim.weight_decay_filter=no_norm_bias", "optim.per_step=true", "optim.warmup_epochs=1",
    "optim.final_lr_ratio=0.001",
]


def spread(x: torch.Tensor) -> dict[str, float]:
    """Per-dimension std of the L2-normalized rows, times sqrt(dim): mean and smallest."""
    std = torch.nn.functional.normalize(x.float(), dim=1).std(0) * math.sqrt(x.shape[1])
    return {"dim": x.shape[1], "mean_std_x_sqrt_dim": float(std.mean()), "min_std_x_sqrt_dim": float(std.min())}


def knn(backbone: torch.nn.Module, run_data: Any, recipe: Recipe) -> tuple[float, torch.Tensor]:
    """The loop's kNN (normalized features, k and T of the recipe) and the raw test features."""
    norm = torch.nn.functional.normalize
    train_x, train_y = features(backbone, run_data.knn_train, run_data, 0, normalize=False)
    test_x, test_y = features(backbone, run_data.knn_test, run_data, 0, normalize=False)
    result = knn_accuracy(norm(train_x, dim=1), train_y, norm(test_x, dim=1), test_y,
                          num_classes=run_data.spec.num_classes, k=recipe.train.knn_k,
                          temperature=recipe.train.knn_temperature)
    return result["top1"], test_x


@torch.no_grad()
def embeddings(recipe: Recipe, run: Path, run_data: Any) -> torch.Tensor:
    """The expander's output on the test images, from the last checkpoint's method state."""
    method = build_method(recipe.method.name, create_backbone(recipe.model.name, **recipe.model.args),
                          **recipe.method.options)
    last = sorted((run / "checkpoints").glob("checkpoint_*"))[-1]
    method.load_state_dict(load_file(str(last / "model.safetensors")))
    return features(method.encoder.eval(), run_data.knn_test, run_data, 0, normalize=False)[0]


def run_method(name: str, out_root: Path, extra: list[str]) -> dict[str, Any]:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"method.name={name}", *OVERRIDES, *extra])
    run = out_root / f"quickstart_{name}"
    tic = time.perf_counter()
    metrics = train(recipe, run)
    seconds = time.perf_counter() - tic
    run_data = build_data(recipe)
    trained_knn, trained_x = knn(backbone_from_state(recipe, load_file(str(run / "backbone.safetensors"))),
                                 run_data, recipe)
    torch.manual_seed(recipe.train.seed)  # the untrained network of the same seed
    untrained_knn, untrained_x = knn(create_backbone(recipe.model.name, **recipe.model.args).eval(), run_data, recipe)
    result = {
        "method": name, "overrides": [f"method.name={name}", *OVERRIDES, *extra], "seconds": round(seconds, 1),
        "knn_top1_monitor": metrics.get("knn_top1"), "knn_top1": trained_knn, "knn_top1_untrained": untrained_knn,
        "chance": 100 / run_data.spec.num_classes, "box_iou": metrics.get("box_iou"), "final_loss": metrics["final_loss"],
        "backbone_spread": spread(trained_x), "backbone_spread_untrained": spread(untrained_x),
        "embedding_spread": spread(embeddings(recipe, run, run_data)),
    }
    result["collapsed"] = collapsed(result)
    return result


def collapsed(result: dict[str, Any]) -> bool:
    backbone, embedding = result["backbone_spread"], result["embedding_spread"]
    return (backbone["mean_std_x_sqrt_dim"] < STD_FLOOR or embedding["mean_std_x_sqrt_dim"] < STD_FLOOR
            or embedding["min_std_x_sqrt_dim"] < DIM_FLOOR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["barlow_twins", "vicreg"])
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="where the run folders go")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more recipe overrides (smoke tests)")
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    results = [run_method(name, args.runs, args.extra) for name in args.methods]
    out = HERE / f"redundancy_quickstart{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"machine": machine(), "std_floor": STD_FLOOR, "dim_floor": DIM_FLOOR,
                               "runs": results}, indent=2) + "\n")
    for r in results:
        print(f"{r['method']}: kNN {r['knn_top1']:.1f}% (untrained {r['knn_top1_untrained']:.1f}%, chance "
              f"{r['chance']:.0f}%); spread x sqrt(d): backbone {r['backbone_spread']['mean_std_x_sqrt_dim']:.2f} "
              f"(min {r['backbone_spread']['min_std_x_sqrt_dim']:.2f}), embedding "
              f"{r['embedding_spread']['mean_std_x_sqrt_dim']:.2f} (min {r['embedding_spread']['min_std_x_sqrt_dim']:.2f}); "
              f"collapsed: {r['collapsed']}; {r['seconds']:.0f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The localization threshold k (issue 12 point 3): box IoU and box area per k after one training.

Takes finished run folders (``backbone.safetensors`` + ``recipe.yaml``, e.g. of ``hub-ccrop train
recipes/quickstart.yaml``) and re-localizes every pretraining image of the run's data with
``localize.localize_boxes`` at each k, from the same final backbone:

- small objects (ground-truth boxes): mean IoU of the boxes with the objects' boxes, mean box area,
  and the share of ContrastiveCrop view pairs that miss the object (``crop.object_miss_rate``, the
  run's alpha); also a threshold with no hand-set k, relative to each map (``--relative``: the
  map's own mean after min-max normalization);
- CIFAR-10 (``--cifar-run``, no ground truth): mean box area per k.

    .venv/bin/python benchmarks/evidence_k_study.py --run runs/quickstart --cifar-run /tmp/evidence_runs/cifar10_ccrop

Writes ``benchmarks/evidence/k_study[_TAG].json`` and ``k_study[_TAG].png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from evidence_small_objects import EVIDENCE, backbone_from_state, loader, machine  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hub_ccrop.boxes import pairwise_box_iou  # noqa: E402
from hub_ccrop.crop import object_miss_rate  # noqa: E402
from hub_ccrop.localize import heatmaps, localize_boxes, model_boxes, normalize_heatmaps  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402
from hub_ccrop.training import RunData, build_data  # noqa: E402
from hub_ccrop.views import EvalCollate  # noqa: E402

KS = (0.05, 0.1, 0.2, 0.3, 0.5)


RELATIVE = "map_mean"  # the threshold with no hand-set k: each min-max normalized map's own mean


def open_run(run: Path, rows: int | None) -> tuple[Recipe, torch.nn.Module, RunData, Any]:
    recipe = load_recipe(run / "recipe.yaml", ["train.knn_every=0"])
    backbone = backbone_from_state(recipe, load_file(str(run / "backbone.safetensors")))
    run_data = build_data(recipe)
    rows_ds = run_data.pretrain if rows is None else run_data.pretrain.select(range(min(rows, len(run_data.pretrain))))
    return recipe, backbone, run_data, rows_ds


@torch.no_grad()
def boxes_at(backbone: torch.nn.Module, run_data: RunData, rows: Any, k: float | str, workers: int,
             alignment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, boxes)`` of ``rows`` localized at threshold ``k`` (the project's localization pass), or with
    each map's own mean as its threshold (``k=RELATIVE``)."""
    batches = loader(rows, EvalCollate(run_data.spec, purpose="localize"), 512, workers)
    if k != RELATIVE:
        return localize_boxes(backbone, batches, k=k, alignment=alignment, progress=False)
    all_ids, all_boxes = [], []
    for images, ids, _ in batches:
        raw = heatmaps(backbone, images)
        own_k = normalize_heatmaps(raw)[0].mean(dim=(1, 2))[:, None, None]  # broadcasts over the upsampled map
        all_ids.append(ids)
        all_boxes.append(model_boxes(backbone, raw, tuple(images.shape[-2:]), own_k, alignment))
    return torch.cat(all_ids), torch.cat(all_boxes)


def study(run: Path, ks: list[float | str], workers: int, rows: int | None) -> dict[str, Any]:
    recipe, backbone, run_data, data = open_run(run, rows)
    c = recipe.crop
    out: dict[str, Any] = {"run": str(run), "dataset": recipe.data.dataset, "images": len(data),
                           "recipe_k": c.k, "alpha": c.alpha, "alignment": c.heatmap_alignment, "per_k": []}
    for k in ks:
        tic = time.perf_counter()
        ids, boxes = boxes_at(backbone, run_data, data, k, workers, c.heatmap_alignment)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        record: dict[str, Any] = {"k": k, "box_area": float(area.mean()), "whole_image_share": float((area > 0.99).float().mean()),
                                  "seconds": time.perf_counter() - tic}
        if run_data.gt_boxes is not None:
            gt = run_data.gt_boxes[ids]
            sizes = torch.tensor([[run_data.spec.image_size] * 2]).expand(len(ids), 2)
            miss = object_miss_rate(gt, boxes, sizes, scale=c.scale, ratio=c.ratio, alpha=c.alpha)
            gt_area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
            record |= {"box_iou": float(pairwise_box_iou(boxes, gt).mean()), "gt_area": float(gt_area.mean()),
                       "miss_rate_ccrop": miss["ccrop"], "miss_rate_rcrop": miss["rcrop"]}
        out["per_k"].append(record)
        print(record, flush=True)
    return out


def picture(run: Path, ks: list[float | str], result: dict[str, Any], cifar: dict[str, Any] | None,
            path: Path, n: int = 6) -> None:
    """Left: IoU and box area vs k; right: the boxes of ``n`` images at each k (yellow) and the objects (cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hub_ccrop.viz import to_uint8

    recipe, backbone, run_data, data = open_run(run, None)
    rows = data.select(torch.linspace(0, len(data) - 1, n).long().tolist())
    images, ids, _ = EvalCollate(run_data.spec, purpose="localize")(list(rows))
    pixels = to_uint8(images, run_data.spec.mean, run_data.spec.std).permute(0, 2, 3, 1).numpy()
    fig = plt.figure(figsize=(3.2 + 1.3 * len(ks), 1.3 * n + 0.6))
    grid = fig.add_gridspec(n, len(ks) + 2, width_ratios=[2.4, 0.3] + [1] * len(ks))
    ax = fig.add_subplot(grid[:, 0])
    per_k = [r for r in result["per_k"] if r["k"] != RELATIVE]
    xs = [r["k"] for r in per_k]
    ax.plot(xs, [r["box_iou"] for r in per_k], "o-", color="tab:red", label="IoU with the object (small objects)")
    ax.plot(xs, [r["box_area"] for r in per_k], "s--", color="tab:red", alpha=0.6, label="box area (small objects)")
    ax.axhline(per_k[0]["gt_area"], color="tab:cyan", lw=1, label="object area (ground truth)")
    if cifar is not None:
        fixed = [r for r in cifar["per_k"] if r["k"] != RELATIVE]
        ax.plot([r["k"] for r in fixed], [r["box_area"] for r in fixed], "s--", color="tab:gray",
                label="box area (CIFAR-10)")
    relative = next((r for r in result["per_k"] if r["k"] == RELATIVE), None)
    if relative is not None:
        ax.axhline(relative["box_iou"], color="tab:purple", ls=":", label=f"IoU, k = each map's mean ({RELATIVE})")
    ax.set(xlabel="threshold k", ylim=(0, 1.02), title="localization threshold k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    size = run_data.spec.image_size
    for col, k in enumerate(ks):
        _, boxes = boxes_at(backbone, run_data, rows, k, 0, recipe.crop.heatmap_alignment)
        for row in range(n):
            a = fig.add_subplot(grid[row, col + 2])
            a.imshow(pixels[row])
            for box, color in ((run_data.gt_boxes[int(ids[row])], "cyan"), (boxes[row], "yellow")):
                x0, y0, x1, y1 = (float(v) * size for v in box)
                a.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=color, lw=1.2))
            a.set_xticks([])
            a.set_yticks([])
            if row == 0:
                a.set_title(f"k={k}" if k != RELATIVE else "k=map mean", fontsize=8)
    fig.suptitle(f"{recipe.name}: boxes of the final backbone per threshold k (yellow) vs objects (cyan)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a finished small-objects run folder")
    parser.add_argument("--cifar-run", type=Path, default=None, help="a finished CIFAR-10 run folder")
    parser.add_argument("--cifar-rows", type=int, default=5000, help="CIFAR-10 pretraining rows to localize")
    parser.add_argument("--ks", type=float, nargs="+", default=list(KS))
    parser.add_argument("--no-relative", action="store_true", help="skip the per-map relative threshold")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    tag = f"_{args.tag}" if args.tag else ""
    started = time.perf_counter()
    result = {"meta": {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                       "command": " ".join([".venv/bin/python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                       "notes": ["boxes: localize.localize_boxes on every pretraining image, final backbone of the run",
                                 "miss_rate_*: share of view pairs (4 x N pairs, seed 0) where a view covers < 20% "
                                 "of the object; ccrop with these boxes and the run's alpha"]},
              }
    ks = [*args.ks, *([] if args.no_relative else [RELATIVE])]
    result["small_objects"] = study(args.run, ks, args.workers, None)
    if args.cifar_run is not None:
        result["cifar10"] = study(args.cifar_run, ks, args.workers, args.cifar_rows)
    picture(args.run, ks, result["small_objects"], result.get("cifar10"),
            EVIDENCE / f"k_study{tag}.png")
    result["meta"]["total_seconds"] = time.perf_counter() - started
    (EVIDENCE / f"k_study{tag}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {EVIDENCE / f'k_study{tag}.json'}")


if __name__ == "__main__":
    main()

"""The end of a run: ``run.json``, ``metrics.json``, the backbone and boxes, and the summary printed (what
each number means, beside its baseline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hub_ccrop import data as data_lib
from hub_ccrop.box_quality import BOX_KEYS, box_verdict, quality_line
from hub_ccrop.crop import FULL_BOX, object_miss_rate
from hub_ccrop.hub.sharing import data_terms
from hub_ccrop.localize import TRAINED_BACKBONE
from hub_ccrop.recipe import Recipe
from hub_ccrop.run_info import RunInfo, Schedule
from hub_ccrop.training.data_source import RunData
from hub_ccrop.training.state import TrainState


def run_info(recipe: Recipe, run_data: RunData, backbone, num_processes: int) -> RunInfo:
    cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    spec = run_data.spec
    if spec.data_dir is not None:  # absolute, so `show` and `eval` find the data from any working folder
        spec = spec.replace(data_dir=str(Path(spec.data_dir).expanduser().resolve()))
    size = spec.image_size
    return RunInfo(
        model=recipe.model.name, model_args=recipe.model.args,
        input_size=(3, size, size), mean=spec.mean, std=spec.std,
        interpolation=cfg.get("interpolation", "bilinear"), crop_pct=1.0 if spec.eval_resize is None else 0.875,
        method=recipe.method.name, method_options=recipe.method.options,
        dataset=spec, num_rows=run_data.num_rows, fingerprint=run_data.fingerprint,
        epochs=recipe.train.epochs, batch_size=recipe.data.batch_size, num_processes=num_processes,
        grad_accum=recipe.train.grad_accum, per_process_batch_size=recipe.per_process_batch_size(num_processes),
        schedule=Schedule(crop=recipe.crop.mode, warmup_epochs=recipe.crop.warmup_epochs,
                          loc_epochs=tuple(recipe.localization_epochs()), k=recipe.crop.k, alpha=recipe.crop.alpha,
                          heatmap_alignment=recipe.crop.heatmap_alignment, box_rule=recipe.crop.box_rule,
                          heatmap_flip=recipe.crop.heatmap_flip, localizer=recipe.crop.localizer),
        license=data_terms(spec, lookup=False).license, target=recipe.target,
    )


def write_skipped(out: Path, run_data: RunData, ids: list[int]) -> None:
    """``skipped.json``: the undecodable pretraining images (by sample id), written only when there are some."""
    if ids:
        (out / "skipped.json").write_text(json.dumps({
            "count": len(ids), "ids": ids, "dataset": run_data.spec.hub_id or run_data.spec.name,
            "splits": list(run_data.spec.pretrain_splits),
            "note": "sample ids are row positions in the unshuffled pretraining data (row-index-v1); the "
                    "training log's warnings name each id's file; these images were left out of training",
        }, indent=2))


def final_metrics(recipe: Recipe, run_data: RunData, state: TrainState, images_per_s: float, wall: float,
                   skipped: int) -> dict[str, Any]:
    c = recipe.crop
    metrics: dict[str, Any] = {"epochs": recipe.train.epochs, "train_images_per_s": images_per_s,
                               "wall_seconds": wall, "final_loss": state.history[-1]["loss"], "skipped_images": skipped}
    for record in reversed(state.history):  # the latest value of each monitored number
        for key in ("knn_top1", "knn_top5", *BOX_KEYS, "localizer"):
            if key in record:
                metrics.setdefault(key, record[key])
    if "knn_top1" in metrics:
        metrics |= {"knn_k": recipe.train.knn_k, "knn_temperature": recipe.train.knn_temperature,
                    "eval_split": run_data.spec.test_split, "knn_chance": 100 / run_data.spec.num_classes}
    if run_data.gt_boxes is not None:
        # IoU of whole-image boxes with the objects = the objects' mean area: the no-localization baseline.
        gt = run_data.gt_boxes
        metrics["box_iou_whole_image"] = data_lib.mean_matched_iou(torch.tensor([FULL_BOX]).expand(len(gt), 4), gt)
        rows, objects = data_lib.single_objects(gt)  # the miss rate needs one object per image
        sizes = torch.tensor([[run_data.spec.image_size] * 2]).expand(len(rows), 2)
        if len(rows):
            miss = object_miss_rate(objects, state.boxes.boxes[rows], sizes, scale=c.scale, ratio=c.ratio,
                                    alpha=c.alpha)
            metrics["miss_rate_rcrop"] = miss["rcrop"]
            if c.mode == "ccrop":  # an R-Crop run has no learned boxes to judge
                metrics["miss_rate_ccrop"] = miss["ccrop"]
    return metrics


def summary(recipe: Recipe, metrics: dict[str, Any], out: Path) -> str:
    lines = [f"\n{recipe.name} finished in {metrics['wall_seconds'] / 60:.1f} min "
             f"({metrics['train_images_per_s']:.0f} images/s in training)"]
    if "knn_top1" in metrics:
        lines.append(f"  kNN top-1 (k={recipe.train.knn_k}, T={recipe.train.knn_temperature}): {metrics['knn_top1']:.2f}% "
                     f"(chance {metrics['knn_chance']:.3g}%): test images classified by their nearest training "
                     "images in the frozen backbone's features, no labels used in training")
    if "box_area" in metrics:
        lines.append(f"  learned boxes ({metrics.get('localizer', TRAINED_BACKBONE)}): {quality_line(metrics)}")
        if verdict := box_verdict(metrics):
            lines.append(f"    so {verdict}")
    if "miss_rate_ccrop" in metrics:
        lines.append(f"  view pairs where a view misses the object (< 20% of it), the false positives ContrastiveCrop "
                     f"avoids: RandomResizedCrop {metrics['miss_rate_rcrop']:.3f}, ContrastiveCrop {metrics['miss_rate_ccrop']:.3f}")
    if metrics["skipped_images"]:
        lines.append(f"  skipped {metrics['skipped_images']} undecodable images (distinct ids, listed in "
                     f"{out / 'skipped.json'})")
    if recipe.target:
        lines.append(f"  paper reference: {recipe.target}")
    lines.append(f"  run folder: {out} (backbone.safetensors, boxes.parquet, pictures/, metrics.json); "
                 f"share it with: hub-ccrop export {out} --out {out}/export")
    return "\n".join(lines)


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat

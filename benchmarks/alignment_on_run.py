"""Boxes of one trained backbone under both heatmap alignments, against ground-truth object boxes.

    PYTHONPATH=. python benchmarks/alignment_on_run.py runs/quickstart [--k 0.1]

Localizes every pretraining image of a run (data with ``gt_box``, e.g. small_objects) with the run's
final backbone, once per ``crop.heatmap_alignment`` (``receptive_field``: each feature cell on its
receptive-field centre; ``official``: the official code's boxes), and prints per alignment: mean IoU
with the objects, mean box area, the share of boxes containing their object, the median box-centre
minus object-centre offset (fraction of the image side) and the share of ContrastiveCrop view pairs
that miss the object (``crop.object_miss_rate`` with the run's scale/ratio/alpha). Results also go to
``RUN/alignment_on_run.json``. Same backbone, same images: only the alignment differs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from hub_ccrop.boxes import pairwise_box_iou
from hub_ccrop.crop import object_miss_rate
from hub_ccrop.data import load_images
from hub_ccrop.evaluate import load_backbone
from hub_ccrop.localize import ALIGNMENTS, localize_boxes
from hub_ccrop.run_info import RunInfo
from hub_ccrop.views import EvalCollate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (run.json, backbone.safetensors, recipe.yaml)")
    parser.add_argument("--k", type=float, default=None, help="heatmap threshold (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    run = RunInfo.load(args.run)
    crop = yaml.safe_load((args.run / "recipe.yaml").read_text()).get("crop", {})
    if run.dataset is None or run.schedule is None or run.input_size is None:
        raise SystemExit(f"{args.run}: run.json records no dataset, schedule or input size")
    k = run.schedule.k if args.k is None else args.k
    size = run.input_size[-1]
    spec = run.dataset.replace(image_size=size)
    rows = load_images(spec, spec.pretrain_splits)
    if "gt_box" not in rows.column_names:
        raise SystemExit(f"{spec.name}: no gt_box column, nothing to compare the boxes with")
    model = load_backbone(args.run).eval()
    loader = DataLoader(rows, batch_size=args.batch_size, collate_fn=EvalCollate(spec, purpose="localize"))
    ids = torch.as_tensor(rows["id"])
    objects = torch.as_tensor(rows["gt_box"], dtype=torch.float32)[torch.argsort(ids)]
    sizes = torch.tensor([[size, size]]).expand(len(objects), 2)
    results = {"run": str(args.run), "k": k, "images": len(objects), "input_size": size}
    for alignment in ALIGNMENTS:
        _, boxes = localize_boxes(model, loader, k=k, alignment=alignment, progress=False)
        contains = ((boxes[:, :2] <= objects[:, :2]) & (boxes[:, 2:] >= objects[:, 2:])).all(dim=1)
        offset = (boxes[:, :2] + boxes[:, 2:]) / 2 - (objects[:, :2] + objects[:, 2:]) / 2
        miss = object_miss_rate(objects, boxes, sizes, scale=crop.get("scale", (0.2, 1.0)),
                                ratio=crop.get("ratio", (3 / 4, 4 / 3)), alpha=crop.get("alpha", 0.1))
        results[alignment] = {
            "box_iou": float(pairwise_box_iou(boxes, objects).mean()),
            "box_area": float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean()),
            "contains_object": float(contains.float().mean()),
            "median_centre_offset_xy": [float(v) for v in offset.median(dim=0).values],
            "miss_rate_ccrop": miss["ccrop"], "miss_rate_rcrop": miss["rcrop"],
        }
        print(f"{alignment:>15}: " + ", ".join(f"{key} {value}" for key, value in results[alignment].items()))
    (args.run / "alignment_on_run.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

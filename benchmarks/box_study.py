"""Boxes on real photos (issue 25): where the positional prior comes from, and which heatmap/threshold rule
gives boxes that know more than a centred box.

Both studies take finished run folders trained on the Tiny ImageNet photos (``tiny_imagenet_boxes.py
train``) and re-localize their first ``--rows`` pretraining photos from the run's final backbone (or its
``--localizer``, any backbone ``load_backbone`` reads), at the run's input size.

``prior``: the mean box centre on the photos and on the same photos flipped upside down (each in its own
frame); the mean normalized heatmap per feature cell and its centre of mass on photos, flipped photos,
inputs with no content (the dataset mean, noise) and for an untrained backbone; the official cell placement.

``rules``: heatmap variants x box rules, each judged by ``box_quality`` (IoU with the objects beside the
whole-image and the centred same-size boxes, overall and on small objects) and by the flip test (boxes on
photos flipped upside down, flipped back, against the boxes on the photos: mean centre offset).

- variants: ``none`` (today's heatmap); ``flip`` (averaged with the photo rotated by 180 degrees, the
  library's ``input_heatmaps(flip=True)``); ``mean_sub`` (the mean heatmap of these photos subtracted);
  ``pad`` (the photo reflect-padded by ``PAD`` pixels, the map cropped back: zero padding moved away from it);
- rules: ``threshold`` (paper: rectangle around every pixel above k), ``largest_component`` (the largest
  connected region above k), ``quantile`` (each map's own k-quantile as its threshold).

    .venv/bin/python benchmarks/box_study.py prior --run /tmp/boxes_runs/tin_ccrop_k05_s0 --rows 4000
    .venv/bin/python benchmarks/box_study.py rules --run /tmp/boxes_runs/tin_ccrop_k05_s0 /tmp/boxes_runs/tin_rcrop_s0
    .venv/bin/python benchmarks/box_study.py tables --run /tmp/boxes_runs/tin_ccrop_k05_s*

``tables``: ``box_quality`` of the box tables each run saved (the boxes its training used).

``follow``: does the ground-truth-free ``box_follow`` score (``hub_ccrop/box_follow.py``) tell boxes that know
where the objects are from boxes that do not? For each run (any dataset with ground truth: the photos or the
generated small-objects sets), its final backbone localizes ``--rows`` images with the run's own pass settings;
the score beside the IoU gain over the centred box of the same size (``--set crop.KEY=VALUE`` changes them).

Writes ``benchmarks/evidence/box_prior[_TAG].json`` / ``box_rules[_TAG].json`` / ``box_tables[_TAG].json`` /
``box_follow[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from evidence_small_objects import EVIDENCE, backbone_from_state, machine  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_imagenet_boxes import register  # noqa: E402

from hub_ccrop.box_quality import box_centres, box_quality  # noqa: E402
from hub_ccrop.localize import boxes_from_maps, heatmaps, input_heatmaps, normalize_heatmaps  # noqa: E402
from hub_ccrop.models import create_backbone  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402
from hub_ccrop.views import EvalCollate  # noqa: E402

PAD = 8  # reflect padding of the ``pad`` variant: one cell of a stride-8 backbone
KS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
QUANTILES = (0.3, 0.5, 0.7)
Maps = tuple[torch.Tensor, torch.Tensor]


def photos(run: Path, rows: int, overrides: list[str] = ()) -> tuple[Recipe, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The run's recipe (with ``overrides``) and final backbone, the first ``rows`` pretraining photos as the
    passes see them, their boxes."""
    from hub_ccrop.training import build_data

    register(rows=rows)
    recipe = load_recipe(run / "recipe.yaml", ["train.knn_every=0", *overrides])
    backbone = backbone_from_state(recipe, load_file(str(run / "backbone.safetensors")))
    data = build_data(recipe)
    collate = EvalCollate(data.spec, purpose="localize")
    images, ids = [], []
    for start in range(0, len(data.pretrain), 1000):
        x, i, _ = collate([data.pretrain[j] for j in range(start, min(start + 1000, len(data.pretrain)))])
        images.append(x)
        ids.append(i)
    ids = torch.cat(ids)
    return recipe, backbone, torch.cat(images), data.gt_boxes[ids]


def flip_boxes_v(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes of the photos flipped upside down (and back: the map is its own inverse)."""
    return torch.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], dim=1)


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], Maps], images: torch.Tensor, batch: int = 1000) -> Maps:
    out = [fn(images[i:i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([m for m, _ in out]), torch.cat([c for _, c in out])


def centre_of_mass(maps: torch.Tensor) -> dict[str, float]:
    """Centre (x, y) of the mean map, as fractions of the image (pixel ``i`` has its centre at ``(i + 0.5) / W``)."""
    mean = maps.double().mean(dim=0)
    h, w = mean.shape
    ys, xs = (torch.arange(h, dtype=torch.float64) + 0.5) / h, (torch.arange(w, dtype=torch.float64) + 0.5) / w
    total = mean.sum()
    return {"x": float((mean.sum(0) * xs).sum() / total), "y": float((mean.sum(1) * ys).sum() / total)}


def centre(boxes: torch.Tensor) -> dict[str, float]:
    c = box_centres(boxes.double()).mean(dim=0)
    return {"x": float(c[0]), "y": float(c[1])}


def cell_map(model: torch.nn.Module, images: torch.Tensor) -> list[list[float]]:
    """The mean min-max normalized heatmap per feature cell (rounded), before any placement on pixels."""
    with torch.no_grad():
        norm, _ = normalize_heatmaps(heatmaps(model, images))
    return [[round(v, 3) for v in row] for row in norm.mean(dim=0).tolist()]


def prior(args: argparse.Namespace) -> dict[str, Any]:
    recipe, model, images, gt = photos(args.run[0], args.rows)
    k, alignment = recipe.crop.k, recipe.crop.heatmap_alignment
    out: dict[str, Any] = {"run": str(args.run[0]), "images": len(images), "k": k,
                           "objects_centre": centre(gt), "objects_centre_flipped_photos": centre(flip_boxes_v(gt))}
    maps, constant = batched(lambda x: input_heatmaps(model, x, alignment), images)
    maps_v, constant_v = batched(lambda x: input_heatmaps(model, x, alignment), images.flip(-2))
    out["box_centre"] = {"photos": centre(boxes_from_maps(maps, constant, k)),
                         "flipped_photos": centre(boxes_from_maps(maps_v, constant_v, k))}
    out["heatmap_centre_of_mass"] = {"photos": centre_of_mass(maps), "flipped_photos": centre_of_mass(maps_v)}
    g = torch.Generator().manual_seed(0)
    no_content = {"dataset_mean": torch.zeros(1, *images.shape[1:]),
                  "noise": torch.randn(256, *images.shape[1:], generator=g)}
    out["cell_map"] = {"photos": cell_map(model, images), "flipped_photos": cell_map(model, images.flip(-2))}
    for name, x in no_content.items():
        out["cell_map"][name] = cell_map(model, x)
        m, c = batched(lambda x: input_heatmaps(model, x, alignment), x)
        out["heatmap_centre_of_mass"][name] = centre_of_mass(m)
        out["box_centre"][name] = centre(boxes_from_maps(m, c, k))
    torch.manual_seed(0)
    untrained = create_backbone(recipe.model.name, **recipe.model.args).eval()
    out["cell_map"]["untrained_backbone_photos"] = cell_map(untrained, images[:1000])
    out["cell_map"]["untrained_backbone_dataset_mean"] = cell_map(untrained, no_content["dataset_mean"])
    m, c = batched(lambda x: input_heatmaps(model, x, "official"), images)
    out["box_centre"]["official_placement"] = centre(boxes_from_maps(m, c, k, alignment="official"))
    return out


# -- rules ----------------------------------------------------------------------------------------------


def padded_maps(model: torch.nn.Module, images: torch.Tensor, alignment: str) -> Maps:
    """Heatmaps of the photos reflect-padded by ``PAD`` pixels, cropped back to the photo (pixel grid: exact)."""
    maps, _ = input_heatmaps(model, F.pad(images, (PAD,) * 4, mode="reflect"), alignment)
    return normalize_heatmaps(maps[:, PAD:-PAD, PAD:-PAD])


def variants(model: torch.nn.Module, images: torch.Tensor, alignment: str) -> dict[str, Maps]:
    """Every heatmap variant of ``images`` (normalized, at the input size)."""
    none = batched(lambda x: input_heatmaps(model, x, alignment), images)
    mean = none[0].mean(dim=0, keepdim=True)
    return {
        "none": none,
        "flip": batched(lambda x: input_heatmaps(model, x, alignment, flip=True), images),
        "mean_sub": normalize_heatmaps(none[0] - mean),
        "pad": batched(lambda x: padded_maps(model, x, alignment), images),
    }


def rules() -> list[tuple[str, float]]:
    return ([("threshold", k) for k in KS] + [("largest_component", k) for k in KS]
            + [("quantile", q) for q in QUANTILES])


def rule_study(run: Path, rows: int) -> dict[str, Any]:
    recipe, model, images, gt = photos(run, rows)
    alignment = recipe.crop.heatmap_alignment
    tic = time.perf_counter()
    photos_maps = variants(model, images, alignment)
    flipped_maps = variants(model, images.flip(-2), alignment)
    seconds = time.perf_counter() - tic
    results = []
    for name, (maps, constant) in photos_maps.items():
        maps_v, constant_v = flipped_maps[name]
        for rule, k in rules():
            boxes = boxes_from_maps(maps, constant, k, rule)
            back = flip_boxes_v(boxes_from_maps(maps_v, constant_v, k, rule))  # flipped photos' boxes, flipped back
            offset = box_centres(back.double()) - box_centres(boxes.double())
            q = box_quality(boxes, gt).metrics()
            results.append({"variant": name, "rule": rule, "k": k, **q,
                            "gain": q["box_iou"] - q["box_iou_centred"],
                            "gain_small": q["box_iou_small"] - q["box_iou_centred_small"],
                            "flip_offset_x": float(offset[:, 0].mean()), "flip_offset_y": float(offset[:, 1].mean())})
    return {"run": str(run), "images": len(images), "recipe_k": recipe.crop.k, "maps_seconds": seconds,
            "results": results}


def tables(args: argparse.Namespace) -> dict[str, Any]:
    """``box_quality`` of every box table a run saved (the boxes its training used), against the objects."""
    from hub_ccrop.boxes import BoxTable
    from hub_ccrop.training import build_data

    out: dict[str, Any] = {}
    for run in args.run:
        rows = json.loads((run / "run.json").read_text())["dataset"]["num_rows"]
        register(rows=rows)
        gt = build_data(load_recipe(run / "recipe.yaml", ["train.knn_every=0"])).gt_boxes
        metrics = json.loads((run / "metrics.json").read_text())
        out[run.name] = {"knn_top1": metrics.get("knn_top1"), "tables": {}}
        for path in sorted((run / "boxes").glob("epoch_*.parquet")):
            table = BoxTable.load(path)
            out[run.name]["tables"][path.stem] = {
                "localizer": table.metadata.get("localizer"), "heatmap_flip": table.metadata.get("heatmap_flip", False),
                **box_quality(table.boxes, gt).metrics()}
    return out


def follow(args: argparse.Namespace) -> dict[str, Any]:
    """The ``box_follow`` score beside ``box_quality`` for each run's final backbone, from a pass with the run's
    settings (with ``crop.heatmap: auto`` on a ViT, the pass's choice between its two maps and both scores)."""
    from hub_ccrop.box_follow import FollowCheck
    from hub_ccrop.localize import localize_boxes
    from hub_ccrop.localizer import box_settings

    out: dict[str, Any] = {}
    for run in args.run:
        recipe, model, images, gt = photos(run, args.rows, args.overrides)
        images, gt, c = images[:args.rows], gt[:args.rows], recipe.crop
        ids = torch.arange(len(images))
        loader = [(images[i:i + 500], ids[i:i + 500]) for i in range(0, len(images), 500)]
        check = FollowCheck(images=len(images))
        tic = time.perf_counter()
        _, boxes = localize_boxes(model, loader, heatmap=c.heatmap, **box_settings(c), progress=False, follow=check)
        seconds = time.perf_counter() - tic
        q = box_quality(boxes, gt, follow=check.score()).metrics()
        scores = check.source_scores()
        out[run.name] = {"dataset": recipe.data.dataset, "heatmap": c.heatmap, "heatmap_chosen": check.source,
                         "heatmap_follow": scores, "heatmap_flip": c.heatmap_flip, "k": c.k, "box_rule": c.box_rule,
                         "follow_images": check.images, "pass_seconds": seconds,
                         **q, "gain": q["box_iou"] - q["box_iou_centred"],
                         "gain_small": q["box_iou_small"] - q["box_iou_centred_small"]}
        print(f"{run.name}: {check.source} gain {out[run.name]['gain']:+.3f} (small {out[run.name]['gain_small']:+.3f}), "
              f"box_follow {q['box_follow']:.2f} ({', '.join(f'{k} {v:.2f}' for k, v in scores.items())}); "
              f"{len(images)} images in {seconds:.1f}s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("prior", "rules", "tables", "follow"))
    parser.add_argument("--run", type=Path, nargs="+", required=True)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--tag", default="")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="follow: KEY=VALUE recipe override of the pass settings, e.g. crop.heatmap_flip=true")
    args = parser.parse_args()
    tic = time.perf_counter()
    if args.study == "prior":
        result = prior(args)
    elif args.study == "tables":
        result = tables(args)
    elif args.study == "follow":
        result = follow(args)
    else:
        result = {"runs": [rule_study(run, args.rows) for run in args.run]}
    result["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "seconds": time.perf_counter() - tic,
                      "command": " ".join([".venv/bin/python", "benchmarks/box_study.py", *sys.argv[1:]])}
    name = {"prior": "box_prior", "rules": "box_rules", "tables": "box_tables", "follow": "box_follow"}[args.study]
    path = EVIDENCE / f"{name}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``hub-ccrop finetune-detection`` and ``hub-ccrop export-detectron2``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hub_ccrop.commands.evaluate import add_dataset_args, default_output_dir, parse_data_files, write_results
from hub_ccrop.evaluate.detection import (
    DetectionDataset,
    _field,
    build_faster_rcnn,
    detection_collate,
    finetune_detection,
)
from hub_ccrop.evaluate.detectron2 import export_detectron2
from hub_ccrop.extras import require_detection_extras
from hub_ccrop.recipe import per_process_batch

# ----------------------------------------------------------------------------------------------------
# command line


def _load_split(
    dataset: str,
    split: str,
    *,
    name: str | None = None,
    data_dir: str | None = None,
    data_files: Sequence[str] | None = None,
) -> Any:
    """One split of a detection dataset with ``datasets.load_dataset`` (Hub id, folder or builder).

    Detection rows carry per-image objects rather than a class label, so they are read as they are
    (not through ``hub_ccrop.data.load_images``). Split slicing works (``train[:1000]``).
    """
    import datasets

    files = parse_data_files(data_files)
    return datasets.load_dataset(dataset, name, split=split, data_dir=data_dir, data_files=files)


def _image_column_of(data: Any, name: str | None = None) -> str:
    """``name``, else the first ``Image`` feature of a ``datasets.Dataset``, else ``image``/``img``."""
    import datasets

    if name:
        return name
    found = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
    found += [c for c in ("image", "img") if c in data.features]
    if not found:
        raise ValueError(f"no image column among {list(data.features)}: pass --image-column")
    return found[0]


def _num_categories(data: Any, objects_column: str | None, category_key: str) -> int:
    """From a ``ClassLabel`` feature when there is one, else ``max(category) + 1`` over the split."""
    import datasets

    feature: Any = data.features[objects_column] if objects_column else data.features
    while hasattr(feature, "feature"):  # List/Sequence of a dict of fields
        feature = feature.feature
    feature = feature.get(category_key) if isinstance(feature, dict) else None
    while hasattr(feature, "feature"):  # List of ClassLabel
        feature = feature.feature
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    if objects_column:
        categories = [c for objects in data[objects_column] for c in _field(objects, category_key)]
    else:
        categories = [c for row in data[category_key] for c in row]
    return 1 + int(max(categories, default=-1))


def _detection_columns(args: argparse.Namespace, train_data: Any) -> dict[str, Any]:
    """``DetectionDataset`` options from the command line (``--image-column``, else found in ``train_data``)."""
    return dict(
        image_column=_image_column_of(train_data, args.image_column),
        objects_column=None if args.objects_column in ("", "none") else args.objects_column,
        bbox_key=args.bbox_key,
        category_key=args.category_key,
        box_format=args.box_format,
        normalized=args.normalized_boxes,
        category_offset=args.category_offset,
    )


def _detection_loaders(
    args: argparse.Namespace, accelerator: Any, columns: dict[str, Any], train_data: Any, test_data: Any | None
) -> tuple[DataLoader, DataLoader | None]:
    """Sharded train (shuffled, flipped, last batch dropped) and test loaders of ``DetectionDataset`` items."""
    per_process = per_process_batch(args.batch_size, accelerator.num_processes, key="--batch-size")

    def loader(data: Any, train: bool) -> DataLoader:
        return DataLoader(
            DetectionDataset(data, train=train, **columns),
            batch_size=per_process,
            shuffle=train,
            drop_last=train,
            num_workers=args.num_workers,
            collate_fn=detection_collate,
            pin_memory=torch.cuda.is_available(),
        )

    train_loader = accelerator.prepare(loader(train_data, True))
    test_loader = accelerator.prepare(loader(test_data, False)) if test_data is not None else None
    return train_loader, test_loader


def _detection_settings(args: argparse.Namespace, columns: dict[str, Any], num_categories: int) -> dict[str, Any]:
    """What ``detection.json`` records of the command line besides the training result."""
    return {
        "source": args.source,
        "dataset": args.dataset,
        "train_split": args.train_split,
        "test_split": args.test_split,
        "image_column": columns["image_column"],
        "objects_column": columns["objects_column"],
        "bbox_key": args.bbox_key,
        "category_key": args.category_key,
        "box_format": args.box_format,
        "num_categories": num_categories,
        "batch_size": args.batch_size,
        "frozen_bn": not args.trainable_bn,
        "trainable_stages": args.trainable_stages,
        "min_size": args.min_size,
        "max_size": args.max_size,
    }


def _save_detector(out: Path, model: nn.Module, result: dict[str, Any]) -> Path:
    """``detector.safetensors`` and ``detection.json`` in ``out``; returns the results path."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "detector.safetensors"))
    return write_results(out, "detection.json", result)


def _run_finetune_detection(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    require_detection_extras()  # before any data is read or step taken
    accelerator = Accelerator()
    load = dict(name=args.config_name, data_dir=args.data_dir, data_files=args.data_files)
    train_data = _load_split(args.dataset, args.train_split, **load)
    test_data = _load_split(args.dataset, args.test_split, **load) if args.test_split else None
    columns = _detection_columns(args, train_data)
    num_categories = args.num_categories or _num_categories(train_data, columns["objects_column"], args.category_key)
    model = build_faster_rcnn(
        args.source,
        num_categories,
        out_indices=args.out_indices,
        fpn_channels=args.fpn_channels,
        frozen_bn=not args.trainable_bn,
        trainable_stages=args.trainable_stages,
        min_size=args.min_size,
        max_size=args.max_size,
    )
    train_loader, test_loader = _detection_loaders(args, accelerator, columns, train_data, test_data)
    result = finetune_detection(
        model,
        train_loader,
        test_loader,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        accelerator=accelerator,
        progress=not args.no_progress,
    )
    result = {**result, **_detection_settings(args, columns, num_categories)}
    out = default_output_dir(args.source, args.output, subfolder="detection")
    if accelerator.is_main_process:
        path = _save_detector(out, accelerator.unwrap_model(model), result)
        print(f"detection: box mAP {result.get('metrics', {}).get('map')}  -> {path}")
    accelerator.wait_for_everyone()
    return result


def _run_export_detectron2(args: argparse.Namespace) -> Path:
    path = export_detectron2(args.source, args.output)
    print(f"wrote {path}")
    return path


def add_cli(subparsers: Any) -> None:
    """Register ``finetune-detection`` and ``export-detectron2`` on an argparse subparsers object."""
    det = subparsers.add_parser(
        "finetune-detection", help="fine-tune Faster R-CNN + FPN on a detection dataset"
    )
    det.add_argument("source", help="run folder, timm export folder, hf-hub:ORG/NAME or timm:NAME")
    add_dataset_args(
        det,
        dataset_help="Hub id, local folder, or a datasets builder (parquet, imagefolder) with --data-files",
    )
    det.add_argument("--train-split", default="train")
    det.add_argument("--test-split", default="test", help="'' to skip evaluation")
    det.add_argument(
        "--objects-column", default="objects", help="column with boxes+categories ('none': top level)"
    )
    det.add_argument("--bbox-key", default="bbox")
    det.add_argument("--category-key", default="category")
    det.add_argument("--box-format", choices=["xyxy", "xywh", "cxcywh"], default="xywh")
    det.add_argument("--normalized-boxes", action="store_true", help="boxes are fractions of the image size")
    det.add_argument(
        "--category-offset", type=int, default=1, help="label = category + offset (0 = background)"
    )
    det.add_argument("--num-categories", type=int, default=None, help="default: from the ClassLabel feature")
    det.add_argument("--out-indices", type=int, nargs="+", default=[1, 2, 3, 4])
    det.add_argument("--fpn-channels", type=int, default=256)
    det.add_argument("--trainable-bn", action="store_true", help="train BatchNorms (SyncBN over processes)")
    det.add_argument("--trainable-stages", type=int, default=3)
    det.add_argument("--min-size", type=int, default=800)
    det.add_argument("--max-size", type=int, default=1333)
    det.add_argument("--steps", type=int, default=1000)
    det.add_argument("--batch-size", type=int, default=16, help="global batch size")
    det.add_argument("--lr", type=float, default=0.02)
    det.add_argument("--weight-decay", type=float, default=1e-4)
    det.add_argument("--warmup-steps", type=int, default=100)
    det.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    det.add_argument(
        "--output", default=None, help="default: RUN/detection for a run folder, else ./detection"
    )
    det.add_argument("--no-progress", action="store_true")
    det.set_defaults(func=_run_finetune_detection)

    exp = subparsers.add_parser("export-detectron2", help="write a ResNet backbone as a detectron2 .pkl")
    exp.add_argument("source", help="run folder, timm export folder, hf-hub:ORG/NAME or timm:NAME")
    exp.add_argument("output", help="output .pkl path")
    exp.set_defaults(func=_run_export_detectron2)

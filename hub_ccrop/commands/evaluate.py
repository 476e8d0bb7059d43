"""``hub-ccrop eval knn|linear`` and ``hub-ccrop finetune``, and the argument helpers the evaluation commands
share (dataset options, results files). ``--dataset`` is resolved by ``hub_ccrop.data.get_spec`` (a named
spec, a Hub id or a local folder; ``--data-dir``, ``--holdout``, column and split options override the spec)
and read with ``data.load_images``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hub_ccrop.data import DatasetSpec, get_spec, load_images
from hub_ccrop.data.resolve import resolve_spec
from hub_ccrop.distributed import default_autocast_dtype
from hub_ccrop.errors import UserError
from hub_ccrop.evaluate.backbone import backbone_data_config, load_backbone
from hub_ccrop.evaluate.finetune import finetune, freeze_except
from hub_ccrop.evaluate.knn import extract_features, knn_evaluate
from hub_ccrop.evaluate.linear import LinearProtocol, linear_probe, linear_probe_on_features, linear_protocol
from hub_ccrop.evaluate.transforms import _LabeledRows, classification_transform
from hub_ccrop.recipe import per_process_batch
from hub_ccrop.views import max_side_for


# -- helpers shared by the subcommands (eval, finetune, detection) ---------------------------------------
def add_dataset_args(parser: argparse.ArgumentParser, *, dataset_help: str) -> None:
    """``--dataset/--config-name/--data-dir/--data-files`` and ``--image-column``."""
    parser.add_argument("--dataset", required=True, help=dataset_help)
    parser.add_argument("--config-name", default=None, help="dataset configuration name")
    parser.add_argument("--data-dir", default=None, help="local copy of the dataset (a folder)")
    parser.add_argument(
        "--data-files", action="append", default=None, metavar="[SPLIT=]PATH", help="repeatable; bare: train"
    )
    parser.add_argument("--image-column", default=None, help="default: the dataset spec's (else 'image')")


def parse_data_files(values: Sequence[str] | None) -> dict[str, list[str]] | None:
    """``--data-files`` values (``SPLIT=PATH``; a bare ``PATH`` belongs to ``train``) as ``{split: [paths]}``."""
    if not values:
        return None
    files: dict[str, list[str]] = {}
    for item in values:
        key, _, path = item.rpartition("=")
        files.setdefault(key or "train", []).append(path)
    return files


def default_output_dir(source: str, output: str | None, *, subfolder: str | None = None) -> Path:
    """Results go next to the run (a local source folder; else ``.``), in ``subfolder`` of it when given,
    unless ``--output`` says otherwise."""
    if output:
        return Path(output)
    base = Path(source) if Path(source).is_dir() else Path(".")
    return base / subfolder if subfolder else base


def write_results(output_dir: str | Path, filename: str, results: dict[str, Any]) -> Path:
    """Write ``results`` (+ the UTC date) as JSON to ``output_dir/filename``; returns the path."""
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**results, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path




# ----------------------------------------------------------------------------------------------------
# command line


def _add_common_args(parser: argparse.ArgumentParser, *, batch_size: int | None) -> None:
    parser.add_argument("source", help="run folder, timm export folder, hf-hub:ORG/NAME or timm:NAME")
    add_dataset_args(
        parser,
        dataset_help="a named dataset spec (cifar10, small_objects, ...), a Hub id ORG/NAME, "
        "or a local folder of Hub-style parquet files or an imagefolder tree",
    )
    parser.add_argument("--label-column", default=None, help="default: the dataset spec's (else 'label')")
    parser.add_argument(
        "--holdout", type=int, default=None, metavar="N",
        help="hold out the last N train rows as the labeled test split (for copies with only a train split)",
    )  # fmt: skip
    parser.add_argument(
        "--train-split", default=None, help="default: the spec's; slicing allowed: train[:45000]"
    )
    parser.add_argument(
        "--test-split", default=None, help="default: the spec's; slicing allowed: train[-5000:]"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="default: the spec's, else max train label + 1"
    )
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help="global batch size (all processes)" + ("" if batch_size else "; default: the dataset's protocol"))
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--input-size", type=int, default=None, help="override the backbone's input size")
    parser.add_argument("--output", default=None, help="results folder (default: the run folder, else '.')")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def _classification_spec(args: argparse.Namespace) -> DatasetSpec:
    """``--dataset`` and its options resolved by ``data.get_spec``; explicit splits win over ``--holdout``."""
    overrides = {
        "config": args.config_name,
        "data_dir": args.data_dir,
        "data_files": parse_data_files(args.data_files),
        "image_column": args.image_column,
        "label_column": args.label_column,
    }
    spec = get_spec(args.dataset, holdout=args.holdout, **{k: v for k, v in overrides.items() if v is not None})
    splits = {"train_split": args.train_split, "test_split": args.test_split}
    spec = spec.replace(**{k: v for k, v in splits.items() if v})
    if not spec.test_split:
        raise UserError(f"dataset {spec.name!r} has no test split: pass --test-split or --holdout N")
    return spec


def _labeled_spec(args: argparse.Namespace, accelerator: Any) -> DatasetSpec:
    """:func:`_classification_spec` with the data's columns and, unless ``--test-split``/``--holdout`` name
    one, its labeled test split (``validation``, else a spread hold-out, as a training run's kNN monitor)."""
    spec = _classification_spec(args)
    if args.test_split or args.holdout:
        return spec
    spec, note = resolve_spec(spec)
    if spec.label_column is None:
        raise UserError(f"dataset {args.dataset} has no labels (no label column, no class subfolders): kNN, "
                        "linear probe and fine-tuning need labeled data: pass --label-column")
    if note:
        accelerator.print(note)
    return spec


def _labels_of(rows: Any, spec: DatasetSpec, split: str) -> np.ndarray:
    """The label column of loaded rows; every row must be labeled."""
    labels = np.asarray(rows["label"], dtype=np.int64)
    if labels.size == 0:
        raise UserError(f"split {split!r} of dataset {spec.name!r} is empty")
    if (labels < 0).any():
        raise UserError(
            f"split {split!r} of dataset {spec.name!r} has unlabeled rows (label column "
            f"{spec.label_column!r}): pass --label-column, or choose labeled splits"
        )
    return labels


def _classification_loaders(
    args: argparse.Namespace, model: nn.Module, accelerator: Any, *, train_augment: bool
):
    """Build (and shard) the train/test loaders of a classification CLI command.

    Rows come from ``data.load_images`` (uniform ``id``/``image``/``label`` columns, stable ids);
    items are ``(classification_transform(decode(image, id)), id, label)``; eval items are decoded to
    tensors with the pretraining spec's size limit, as the kNN monitor's :class:`~hub_ccrop.views.EvalCollate`.
    """
    data_config = backbone_data_config(model)
    if args.input_size:
        data_config["input_size"] = (3, args.input_size, args.input_size)
    spec = _labeled_spec(args, accelerator)
    train_rows = load_images(spec, spec.train_split)
    test_rows = load_images(spec, spec.test_split)
    train_labels = _labels_of(train_rows, spec, spec.train_split)
    test_labels = _labels_of(test_rows, spec, spec.test_split)
    num_classes = args.num_classes or spec.num_classes or int(train_labels.max()) + 1
    top = int(max(train_labels.max(), test_labels.max()))
    if top >= num_classes:
        raise UserError(f"label {top} does not fit num_classes={num_classes}: pass --num-classes")
    per_process = per_process_batch(args.batch_size, accelerator.num_processes, key="--batch-size")

    def loader(rows: Any, train: bool) -> DataLoader:
        """Training loaders augment, shuffle and drop the last batch; feature/test loaders do none of it."""
        dataset = _LabeledRows(rows, classification_transform(data_config, train=train), max_side=max_side_for(spec),
                               as_tensor=not train)
        return DataLoader(
            dataset,
            batch_size=per_process,
            shuffle=train,
            drop_last=train and len(dataset) > per_process,
            num_workers=args.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=args.num_workers > 0,
        )

    train_loader, test_loader = loader(train_rows, train_augment), loader(test_rows, False)
    train_loader, test_loader = accelerator.prepare(train_loader, test_loader)
    info = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "holdout": args.holdout,
        "train_split": spec.train_split,
        "test_split": spec.test_split,
        "image_column": spec.image_column,
        "label_column": spec.label_column,
        "num_train": len(train_rows),
        "num_test": len(test_rows),
        "input_size": list(data_config["input_size"]),
    }
    return train_loader, test_loader, num_classes, info


def _cli_backbone(args: argparse.Namespace, accelerator: Any) -> nn.Module:
    """The backbone of ``eval knn|linear``: ``args.source`` on the accelerator's device, ``--channels-last`` applied."""
    model = load_backbone(args.source).to(accelerator.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _run_knn(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = _cli_backbone(args, accelerator)
    # kNN uses un-augmented images for the feature bank (the monitor's convention)
    train_loader, test_loader, num_classes, info = _classification_loaders(
        args, model, accelerator, train_augment=False
    )
    result = knn_evaluate(
        model,
        train_loader,
        test_loader,
        num_classes=num_classes,
        k=args.k,
        temperature=args.temperature,
        accelerator=accelerator,
        autocast_dtype=default_autocast_dtype(accelerator.device),
        channels_last=args.channels_last,
        progress=not args.no_progress,
    )
    result = {**result, "source": args.source, **info}
    if accelerator.is_main_process:
        path = write_results(default_output_dir(args.source, args.output), "eval_knn.json", result)
        print(f"kNN top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  -> {path}")
    return result


def _apply_linear_protocol(args: argparse.Namespace, accelerator: Any) -> LinearProtocol:
    """Fill ``--lr``/``--batch-size`` from the dataset's linear protocol where not given, and say so."""
    protocol = linear_protocol(_classification_spec(args))
    args.lr = protocol.lr if args.lr is None else args.lr
    args.batch_size = protocol.batch_size if args.batch_size is None else args.batch_size
    accelerator.print(f"linear protocol for {args.dataset}: {protocol.name} (lr {protocol.lr}, global batch "
                      f"{protocol.batch_size}); this run: lr {args.lr}, global batch {args.batch_size}")
    return protocol


def _fast_linear_probe(
    model: nn.Module, train_loader: Iterable, test_loader: Iterable, *, num_classes: int, batch_size: int,
    accelerator: Any, autocast_dtype: torch.dtype | None, channels_last: bool, progress: bool, **hyper: Any,
) -> dict[str, Any]:
    """``eval linear --fast``: raw features of both splits extracted once, then ``linear_probe_on_features``."""
    kw = dict(accelerator=accelerator, autocast_dtype=autocast_dtype, channels_last=channels_last,
              normalize=False, progress=progress)
    _, train_feats, train_labels = extract_features(model, train_loader, desc="train features", **kw)
    _, test_feats, test_labels = extract_features(model, test_loader, desc="test features", **kw)
    return linear_probe_on_features(
        train_feats, train_labels, test_feats, test_labels,
        num_classes=num_classes, batch_size=batch_size, device=accelerator.device, progress=progress, **hyper,
    )


def _run_linear(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = _cli_backbone(args, accelerator)
    autocast_dtype = default_autocast_dtype(accelerator.device)
    protocol = _apply_linear_protocol(args, accelerator)
    train_loader, test_loader, num_classes, info = _classification_loaders(
        args, model, accelerator, train_augment=not args.fast
    )
    kw = dict(
        num_classes=num_classes,
        epochs=args.epochs,
        lr=args.lr,
        milestones=tuple(args.milestones),
        seed=args.seed,
        accelerator=accelerator,
        autocast_dtype=autocast_dtype,
        channels_last=args.channels_last,
        progress=not args.no_progress,
    )
    if args.fast:
        result = _fast_linear_probe(model, train_loader, test_loader, batch_size=args.batch_size, **kw)
    else:
        result = linear_probe(model, train_loader, test_loader, **kw)
        result["batch_size"] = args.batch_size
    result = {**result, "source": args.source, "linear_protocol": protocol.name, **info}
    if accelerator.is_main_process:
        path = write_results(default_output_dir(args.source, args.output), "eval_linear.json", result)
        print(
            f"{result['protocol']}: top1 {result['top1']:.2f}  top5 {result['top5']:.2f} (last epoch); "
            f"best {result['best_top1']:.2f} at epoch {result['best_epoch']}  -> {path}"
        )
    return result


def _run_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator()
    timm_kwargs = {"drop_path_rate": args.drop_path} if args.drop_path else {}
    model = load_backbone(args.source, **timm_kwargs)
    train_loader, test_loader, num_classes, info = _classification_loaders(
        args, model, accelerator, train_augment=True
    )
    model.reset_classifier(num_classes)
    frozen = freeze_except(model, args.trainable) if args.trainable else []
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = finetune(
        model,
        train_loader,
        test_loader,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        accelerator=accelerator,
        progress=not args.no_progress,
    )
    result = {
        **result,
        "source": args.source,
        "num_classes": num_classes,
        "frozen_modules": frozen,
        "batch_size": args.batch_size,
        **info,
    }
    out = default_output_dir(args.source, args.output, subfolder="finetune")
    if accelerator.is_main_process:
        from timm.models import save_for_hf

        save_for_hf(accelerator.unwrap_model(model), str(out), safe_serialization=True)
        path = write_results(out, "finetune.json", result)
        print(f"finetune: top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  -> {path}")
    accelerator.wait_for_everyone()
    return result


def add_cli(subparsers: Any) -> None:
    """Register ``eval knn``, ``eval linear`` and ``finetune`` on an argparse subparsers object."""
    eval_parser = subparsers.add_parser("eval", help="evaluate a pretrained backbone (kNN, linear probe)")
    eval_sub = eval_parser.add_subparsers(dest="eval_command", required=True)

    knn = eval_sub.add_parser("knn", help="weighted kNN (cosine) of test features against train features")
    _add_common_args(knn, batch_size=256)
    knn.add_argument("--k", type=int, default=200)
    knn.add_argument("--temperature", type=float, default=0.1)
    knn.set_defaults(func=_run_knn)

    linear = eval_sub.add_parser("linear", help="linear probe on the frozen backbone (the paper's protocol)")
    _add_common_args(linear, batch_size=None)  # the dataset's protocol: linear_protocol
    linear.add_argument("--epochs", type=int, default=100)
    linear.add_argument("--lr", type=float, default=None,
                        help="default: the dataset's protocol (10 small datasets, 30 ImageNet-like)")
    linear.add_argument("--milestones", type=int, nargs="+", default=[60, 80])
    linear.add_argument("--seed", type=int, default=0)
    linear.add_argument(
        "--fast",
        action="store_true",
        help="train on cached un-augmented features (a quick check, not the paper's protocol)",
    )
    linear.set_defaults(func=_run_linear)

    ft = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained backbone with a new classification head"
    )
    _add_common_args(ft, batch_size=256)
    ft.add_argument("--epochs", type=int, default=30)
    ft.add_argument("--lr", type=float, default=0.01)
    ft.add_argument("--weight-decay", type=float, default=1e-4)
    ft.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ft.add_argument("--warmup-epochs", type=float, default=0.0)
    ft.add_argument("--label-smoothing", type=float, default=0.0)
    ft.add_argument("--drop-path", type=float, default=0.0)
    ft.add_argument(
        "--trainable",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="partial fine-tuning: top-level modules to train (e.g. layer4); the head always trains",
    )
    ft.set_defaults(func=_run_finetune)

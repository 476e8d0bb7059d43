"""Classification fine-tuning: a new head and all or part of the backbone, cosine per step after warm-up."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hub_ccrop.distributed import is_main_process, set_loader_epoch
from hub_ccrop.evaluate.knn import extract_features, topk_accuracy


def _head_module_names(model: nn.Module) -> set[str]:
    """Top-level module names that hold the classifier (from ``pretrained_cfg['classifier']``)."""
    classifier = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {n.split(".")[0] for n in names}


def freeze_except(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Freeze every top-level module not named in ``trainable`` (and not the classifier).

    Frozen modules get ``requires_grad=False`` and their BatchNorms become ``FrozenBatchNorm2d`` (timm's
    ``freeze``), so their statistics stay fixed in train mode. Returns the frozen module names.
    """
    from timm.utils import freeze

    keep = set(trainable) | _head_module_names(model)
    children = [n for n, _ in model.named_children()]
    unknown = [n for n in trainable if n not in children]
    if unknown:
        raise ValueError(f"unknown top-level modules {unknown}; the model has {children}")
    frozen = [n for n in children if n not in keep]
    if frozen:
        freeze(model, frozen)
    return frozen


def _classifier_optimizer(
    model: nn.Module, name: str, *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the parameters that still require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def _warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up over ``warmup`` steps, then cosine to 0 at step ``total``."""

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _finetune_epoch(
    model: nn.Module,
    train_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Any,
    *,
    label_smoothing: float,
    desc: str,
    progress: bool,
) -> float:
    """One epoch of classification training (the scheduler steps per batch); the mean training loss."""
    model.train()
    loss_sum, seen = 0.0, 0
    bar = tqdm(train_loader, desc=desc, leave=False, disable=not (progress and is_main_process(accelerator)))
    for images, _ids, labels in bar:
        images, labels = images.to(accelerator.device), torch.as_tensor(labels).to(accelerator.device)
        with accelerator.autocast():
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * labels.numel()
        seen += labels.numel()
    return loss_sum / max(seen, 1)


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    epochs: int = 30,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.0,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a classifier (``model`` with its new head; freeze parts first with ``freeze_except``).

    Cosine learning rate per step after an optional linear warm-up. ``train_loader``/``test_loader``
    yield ``(images, ids, labels)`` and must already be sharded under several processes. ``model`` is
    wrapped by ``accelerator.prepare`` (mixed precision, DDP); the unwrapped model stays usable.
    Returns the last epoch's test ``top1``/``top5`` and the per-epoch history.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    opt = _classifier_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(len(train_loader), 1)  # type: ignore[arg-type]
    scheduler = _warmup_cosine(opt, epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch))
    wrapped, opt = accelerator.prepare(model, opt)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        set_loader_epoch(train_loader, epoch)
        train_loss = _finetune_epoch(
            wrapped, train_loader, opt, scheduler, accelerator,
            label_smoothing=label_smoothing, desc=f"finetune {epoch + 1}/{epochs}", progress=progress,
        )
        _, logits, labels = extract_features(
            wrapped, test_loader, accelerator=accelerator, normalize=False, progress=progress, desc="finetune test"
        )
        history.append({"epoch": epoch + 1, "train_loss": train_loss, **topk_accuracy(logits, labels)})
    last = history[-1] if history else {}
    return {
        "protocol": "finetune",
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "epochs": epochs,
        "optimizer": {
            "name": optimizer,
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "warmup_epochs": warmup_epochs,
            "schedule": "cosine",
            "label_smoothing": label_smoothing,
        },
        "history": history,
    }


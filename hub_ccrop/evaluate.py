"""Evaluation and downstream use: kNN, linear probe, classification fine-tuning.

- ``extract_features`` runs a backbone over ``(images, ids, labels)`` batches (batched, no grad, optional
  autocast/channels_last) and, over several ``accelerate`` processes, gathers the results **by id**.
- ``knn_predict`` / ``knn_accuracy`` / ``knn_evaluate``: the weighted kNN of the InstDisc/SimCLR
  monitors (cosine similarity, k = 200, weights ``exp(sim / T)``, T = 0.1). The training monitor and
  ``hub-ccrop eval knn`` call the same functions.
- ``linear_probe``: the paper's protocol (frozen backbone in eval mode, 100 epochs, SGD momentum 0.9,
  x0.1 at epochs 60 and 80, wd 0, augmented training images; lr 10 / batch 512 on small datasets, the
  MoCo ImageNet protocol lr 30 / batch 256 on ImageNet-like data: ``linear_protocol``). It reports the **last**
  epoch; the best epoch is reported too, labelled as such. ``linear_probe_on_features`` is a fast check
  on cached, un-augmented features: a different protocol, labelled differently.
- ``load_backbone`` loads a run folder, a local timm export or an ``hf-hub:`` id; ``finetune`` trains
  a new head (and all or part of the backbone) for classification.
- ``add_cli`` registers ``hub-ccrop eval knn|linear`` and ``hub-ccrop finetune``. Their ``--dataset`` is
  resolved by ``hub_ccrop.data.get_spec`` (a named spec, a Hub id or a local folder; ``--data-dir``,
  ``--holdout``, column and split options override the spec) and read with ``data.load_images``.

Accuracies are percentages (0-100).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import hub_ccrop.models  # noqa: F401  (registers the CIFAR-stem ResNets, e.g. resnet18_cifar, with timm)
from hub_ccrop.cli import add_dataset_args, default_output_dir, parse_data_files, write_results
from hub_ccrop.data import DatasetSpec, decode_image, decode_to_tensor, get_spec, load_images
from hub_ccrop.distributed import (
    default_autocast_dtype,
    gather_by_id,
    is_distributed,
    is_main_process,
    set_loader_epoch,
)
from hub_ccrop.recipe import per_process_batch
from hub_ccrop.run_info import RUN_FILE, RunInfo
from hub_ccrop.views import eval_image, max_side_for

__all__ = [
    "add_cli",
    "backbone_data_config",
    "classification_transform",
    "default_autocast_dtype",
    "extract_features",
    "finetune",
    "freeze_except",
    "gather_by_id",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "linear_probe",
    "linear_probe_on_features",
    "linear_protocol",
    "load_backbone",
    "topk_accuracy",
]

LINEAR_PROTOCOL = "linear-probe (paper): frozen backbone, augmented train images, last epoch"
FAST_LINEAR_PROTOCOL = "linear-probe-cached-features (fast check, not the paper's protocol)"
KNN_PROTOCOL = "knn (cosine, weighted exp(sim/T) voting)"


@dataclass(frozen=True)
class LinearProtocol:
    """The linear-probe hyper-parameters of one kind of dataset (official ``configs/linear/*.py``)."""

    name: str
    lr: float
    batch_size: int  # global


# configs/linear/{cifar10,cifar100,stl10,tiny200}_res18.py: lr 10, batch 512;
# configs/linear/{IN1K,IN200}_res50.py: MoCo's protocol, lr 30, batch 256. Both: 100 epochs, x0.1 at 60, 80, wd 0.
SMALL_LINEAR = LinearProtocol("small-dataset protocol (official configs/linear/cifar10_res18.py)", 10.0, 512)
IMAGENET_LINEAR = LinearProtocol("MoCo ImageNet protocol (official configs/linear/IN1K_res50.py)", 30.0, 256)


def linear_protocol(spec: DatasetSpec) -> LinearProtocol:
    """ImageNet's protocol for ImageNet-like data (the resize-256 / center-crop-224 eval pipeline, e.g.
    imagenet1k, imagenet200), the small-dataset protocol otherwise (CIFAR, STL-10, Tiny ImageNet)."""
    return IMAGENET_LINEAR if spec.eval_resize is not None else SMALL_LINEAR


BEST_EPOCH_NOTE = "best_top1/best_epoch: the best epoch on the test set, not the paper's protocol (it reports the last epoch)"


# ----------------------------------------------------------------------------------------------------
# small helpers



def _model_device(model: nn.Module, accelerator: Any = None) -> torch.device:
    if accelerator is not None:
        return accelerator.device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside the block; the previous state is restored afterwards."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.train(was_training)



def _forward(
    model: nn.Module,
    images: Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
) -> Tensor:
    """``model(images)`` on ``device`` with optional autocast/channels_last, as float32."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(images)
    return out.float()


# ----------------------------------------------------------------------------------------------------
# features and kNN


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable,
    *,
    accelerator: Any = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    normalize: bool = True,
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``backbone`` (eval mode, no grad) over ``(images, ids, labels)`` batches.

    Returns ``(ids, feats, labels)`` on CPU, sorted by id; ``feats`` are float32 and L2-normalized
    unless ``normalize=False`` (then they are the raw outputs, e.g. logits of a classifier). With an
    accelerator over several processes, each process runs its shard and results are gathered by id,
    so every process returns the same full result. The model's train/eval mode is restored.
    """
    device = _model_device(backbone, accelerator)
    was_training = backbone.training
    backbone.eval()
    all_ids, all_feats, all_labels = [], [], []
    try:
        for images, ids, labels in tqdm(
            loader, desc=desc, disable=not (progress and is_main_process(accelerator)), leave=False
        ):
            feats = _forward(backbone, images, device, autocast_dtype, channels_last)
            all_feats.append(F.normalize(feats, dim=1) if normalize else feats)
            all_ids.append(torch.as_tensor(ids, dtype=torch.int64).to(device))
            all_labels.append(torch.as_tensor(labels, dtype=torch.int64).to(device))
    finally:
        backbone.train(was_training)
    if not all_feats:
        raise ValueError("extract_features: the loader produced no batches")
    ids, feats, labels = gather_by_id(
        torch.cat(all_ids), torch.cat(all_feats), torch.cat(all_labels), accelerator=accelerator
    )
    return ids, feats, labels


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> Tensor:
    """Weighted kNN class scores ``[N_test, num_classes]`` (on CPU).

    Features must be L2-normalized (cosine similarity = dot product). Each of the ``k`` nearest
    training samples votes for its label with weight ``exp(sim / temperature)``.
    """
    device = torch.device(device) if device is not None else train_feats.device
    if train_labels.numel() and int(train_labels.min()) < 0:
        raise ValueError("knn_predict: training labels must be >= 0 (unlabeled rows cannot vote)")
    train_feats = train_feats.to(device, torch.float32)
    train_labels = train_labels.to(device, torch.int64)
    k = min(k, train_feats.shape[0])
    scores = []
    for chunk in test_feats.split(chunk_size):
        sim = chunk.to(device, torch.float32) @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes.cpu())
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": %, "top5": %}`` of class ``scores`` ``[N, C]`` against ``labels`` (``timm.utils.accuracy``:
    k capped at C); 0 for no labels."""
    if labels.numel() == 0:
        return {f"top{k}": 0.0 for k in ks}
    accuracies = timm.utils.accuracy(scores, labels.to(scores.device), topk=tuple(ks))
    return {f"top{k}": acc.item() for k, acc in zip(ks, accuracies, strict=True)}


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """kNN top-1/top-5 accuracy (percent) of ``test_feats`` against a labeled feature bank."""
    scores = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        device=device,
    )
    return topk_accuracy(scores, test_labels)


def knn_evaluate(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.1,
    accelerator: Any = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features of both splits and return kNN ``top1``/``top5`` (+ the settings used).

    Every process returns the same numbers. ``num_classes`` defaults to ``max(label) + 1``.
    """
    kw = dict(
        accelerator=accelerator, autocast_dtype=autocast_dtype, channels_last=channels_last, progress=progress
    )
    _, train_feats, train_labels = extract_features(backbone, train_loader, desc="knn train", **kw)
    _, test_feats, test_labels = extract_features(backbone, test_loader, desc="knn test", **kw)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    device = accelerator.device if accelerator is not None else None
    acc = knn_accuracy(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        device=device,
    )
    return {
        "protocol": KNN_PROTOCOL,
        **acc,
        "k": k,
        "temperature": temperature,
        "num_classes": num_classes,
        "num_train": int(train_labels.numel()),
        "num_test": int(test_labels.numel()),
    }


# ----------------------------------------------------------------------------------------------------
# linear probe


def _fit_linear(
    head: nn.Linear,
    epoch_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: Sequence[int],
    gamma: float,
    accelerator: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """SGD + multi-step schedule on ``head``; evaluate on ``test_feats`` after every epoch.

    ``epoch_batches(epoch)`` yields ``(features, labels)`` on the head's device. Gradients are
    averaged over processes when an accelerator runs several (every process keeps an identical head).
    """
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    device = head.weight.device
    test_feats, test_labels = test_feats.to(device), test_labels.to(device)
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc="linear probe", disable=not (progress and is_main_process(accelerator)))
    for epoch in bar:
        lr_now = optimizer.param_groups[0]["lr"]
        train_loss = _train_head_epoch(head, epoch_batches(epoch), optimizer, accelerator)
        scheduler.step()
        test_loss, acc = _evaluate_head(head, test_feats, test_labels)
        history.append(
            {"epoch": epoch + 1, "lr": lr_now, "train_loss": train_loss, "test_loss": test_loss, **acc}
        )
        bar.set_postfix(loss=f"{train_loss:.3f}", top1=f"{acc['top1']:.2f}")
    last = history[-1]
    best = max(history, key=lambda h: h["top1"])
    sgd = {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
           "milestones": list(milestones), "gamma": gamma}
    return {
        "top1": last["top1"],
        "top5": last["top5"],
        "epochs": epochs,
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "note": BEST_EPOCH_NOTE,
        "optimizer": sgd,
        "history": history,
    }


def _train_head_epoch(
    head: nn.Linear, batches: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer, accelerator: Any
) -> float:
    """One epoch of ``head`` on ``(features, labels)`` batches; the mean training loss over all processes."""
    head.train()
    loss_sum, seen = 0.0, 0
    for feats, labels in batches:
        loss = F.cross_entropy(head(feats), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if is_distributed(accelerator):
            for p in head.parameters():
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        optimizer.step()
        loss_sum += loss.item() * labels.numel()
        seen += labels.numel()
    if is_distributed(accelerator):
        device = head.weight.device
        loss_sum, seen = accelerator.reduce(torch.tensor([loss_sum, seen], device=device), "sum").tolist()
    return loss_sum / max(seen, 1)


@torch.no_grad()
def _evaluate_head(head: nn.Linear, test_feats: Tensor, test_labels: Tensor) -> tuple[float, dict[str, float]]:
    """``(test loss, top-1/top-5)`` of ``head`` on cached test features."""
    head.eval()
    logits = torch.cat([head(c) for c in test_feats.split(4096)])
    return F.cross_entropy(logits, test_labels).item(), topk_accuracy(logits, test_labels)


def _new_head(dim: int, num_classes: int, device: torch.device, seed: int) -> nn.Linear:
    """The linear classifier, initialized as in the official code (N(0, 0.01), zero bias), seeded."""
    head = nn.Linear(dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    return head.to(device)


def _backbone_batches(
    backbone: nn.Module,
    train_loader: Iterable,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """``epoch -> (features, labels)`` batches of the frozen ``backbone`` over ``train_loader``'s images."""

    def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        set_loader_epoch(train_loader, epoch)
        for images, _ids, labels in train_loader:
            with torch.no_grad():
                feats = _forward(backbone, images, device, autocast_dtype, channels_last)
            yield feats, torch.as_tensor(labels, dtype=torch.int64).to(device)

    return epoch_batches


def linear_probe(
    backbone: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 10.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = (60, 80),
    gamma: float = 0.1,
    accelerator: Any = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The paper's linear evaluation: a linear layer on a frozen backbone kept in eval mode.

    ``train_loader`` yields augmented ``(images, ids, labels)`` (RandomResizedCrop + flip; batch 512
    in total, ``drop_last``), ``test_loader`` the resize/normalize-only test images. Under several
    processes both loaders must already be sharded (``accelerator.prepare``). The backbone is frozen,
    so test features are computed once (same result as re-running it every epoch). The backbone's
    weights, BN statistics, ``requires_grad`` flags and mode are unchanged afterwards.

    Returns the last epoch's ``top1``/``top5`` (the reported numbers), ``best_top1``/``best_epoch``
    (labelled as not the paper's protocol), the settings and the per-epoch history.
    """
    device = _model_device(backbone, accelerator)
    with _frozen(backbone):
        _, test_feats, test_labels = extract_features(
            backbone, test_loader, accelerator=accelerator, autocast_dtype=autocast_dtype,
            channels_last=channels_last, normalize=False, progress=progress, desc="linear test features",
        )
        head = _new_head(test_feats.shape[1], num_classes, device, seed)
        epoch_batches = _backbone_batches(backbone, train_loader, device, autocast_dtype, channels_last)
        result = _fit_linear(
            head, epoch_batches, test_feats, test_labels, epochs=epochs, lr=lr, momentum=momentum,
            weight_decay=weight_decay, milestones=milestones, gamma=gamma, accelerator=accelerator, progress=progress,
        )
    return {
        "protocol": LINEAR_PROTOCOL,
        **result,
        "num_classes": num_classes,
        "num_test": int(test_labels.numel()),
    }


def linear_probe_on_features(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 10.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = (60, 80),
    gamma: float = 0.1,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fast check: the same optimizer/schedule on cached (un-augmented) features.

    Not the paper's protocol (no augmentation): the result is labelled ``linear-probe-cached-features``.
    Use raw features (``extract_features(..., normalize=False)``) to mirror the paper's head input.
    """
    device = torch.device(device) if device is not None else train_feats.device
    train_feats, train_labels = train_feats.to(device, torch.float32), train_labels.to(device, torch.int64)
    head = _new_head(train_feats.shape[1], num_classes, device, seed)
    generator = torch.Generator().manual_seed(seed + 1)

    def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(train_feats.shape[0], generator=generator).to(device)
        for idx in order.split(batch_size):
            yield train_feats[idx], train_labels[idx]

    result = _fit_linear(
        head,
        epoch_batches,
        test_feats.float(),
        test_labels,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        milestones=milestones,
        gamma=gamma,
        progress=progress,
    )
    return {
        "protocol": FAST_LINEAR_PROTOCOL,
        **result,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "num_train": int(train_labels.numel()),
        "num_test": int(test_labels.numel()),
    }


# ----------------------------------------------------------------------------------------------------
# loading backbones


def load_backbone(source: str | Path, *, num_classes: int = 0, **timm_kwargs: Any) -> nn.Module:
    """Load a pretrained backbone through timm.

    ``source`` is (a) a run folder (``run.json`` + ``backbone.safetensors``), (b) a local timm export
    (``config.json`` + ``model.safetensors``) or ``local-dir:DIR``, (c) ``hf-hub:ORG/NAME``, or
    (d) ``timm:NAME`` for timm's own pretrained weights (baselines). ``num_classes > 0`` adds a new,
    randomly initialized head; ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``features_only=True,
    out_indices=(1, 2, 3, 4)``, ``drop_path_rate``). Weights are read from safetensors (or timm's
    loaders). The model's ``pretrained_cfg`` carries the run's input size and mean/std, so
    ``backbone_data_config(model)`` gives the matching preprocessing.
    """
    features_only = bool(timm_kwargs.get("features_only", False))
    if features_only and num_classes:
        raise ValueError("load_backbone: features_only=True and num_classes > 0 are exclusive")
    head = {} if features_only else {"num_classes": num_classes}
    src = str(source)
    if src.startswith(("hf-hub:", "local-dir:")):
        return timm.create_model(src, pretrained=True, **head, **timm_kwargs)
    if src.startswith("timm:"):
        return timm.create_model(src[len("timm:") :], pretrained=True, **head, **timm_kwargs)
    path = Path(src)
    if (path / RUN_FILE).is_file():
        run = RunInfo.load(path)
        weights = path / "backbone.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found (a run folder needs its backbone.safetensors)")
        # the run's backbone has no classifier: load it strictly with num_classes=0, then add the head
        overlay = {"file": str(weights), "num_classes": 0, **run.data_config()}
        kwargs = {**run.model_args, **timm_kwargs, "num_classes": 0}
        model = timm.create_model(run.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        if num_classes:
            model.reset_classifier(num_classes)
        return model
    if (path / "config.json").is_file():
        return timm.create_model(f"local-dir:{path}", pretrained=True, **head, **timm_kwargs)
    raise FileNotFoundError(
        f"{source!r} is not a run folder (run.json), a timm export (config.json), hf-hub:ORG/NAME or timm:NAME"
    )


def backbone_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``) of a model."""
    return timm.data.resolve_model_data_config(model)


# ----------------------------------------------------------------------------------------------------
# datasets for the CLI (rows from ``hub_ccrop.data``)


def _uint8_tensor(image: Image.Image | Tensor) -> Tensor:
    from torchvision.transforms import functional as TF

    return image if isinstance(image, Tensor) else TF.pil_to_tensor(image)


def classification_transform(data_config: dict[str, Any], *, train: bool) -> Callable[[Image.Image], Tensor]:
    """Train: RandomResizedCrop + flip; test: :func:`hub_ccrop.views.eval_image` (the kNN monitor's and the
    localization passes' transform): the whole image at ``input_size`` when ``crop_pct`` is 1, else
    resize (``size / crop_pct``) + centre crop. Both normalize."""
    # Not timm.data.create_transform: its eval path works on PIL images (crop_pct=1 centre-crops a non-square
    # image instead of resizing the whole of it, and resamples up to 1 level apart), so the CLI would no
    # longer see the kNN monitor's pixels; its train path draws crops from Python's `random` and adds colour
    # jitter unless told not to.
    from torchvision import transforms as T

    size = tuple(data_config["input_size"][-2:])
    normalize = [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    crop_pct = data_config.get("crop_pct", 1.0)
    resize = int(math.floor(min(size) / crop_pct)) if crop_pct < 1 else None
    return T.Compose([_uint8_tensor, functools.partial(eval_image, size=size, resize=resize),
                      T.ConvertImageDtype(torch.float32), T.Normalize(data_config["mean"], data_config["std"])])


class _LabeledRows(Dataset):
    """``data.load_images`` rows as ``(transform(image), id, label)`` items (decoded with ``decode_image``)."""

    def __init__(self, rows: Any, transform: Callable[[Any], Tensor], *, max_side: int | None = None,
                 as_tensor: bool = False) -> None:
        self.rows, self.transform, self.max_side = rows, transform, max_side
        self.decode = decode_to_tensor if as_tensor else decode_image  # tensors: decoded as the kNN monitor decodes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        row = self.rows[index]
        image = self.decode(row["image"], row["id"], max_side=self.max_side)
        return self.transform(image), int(row["id"]), int(row["label"])


# ----------------------------------------------------------------------------------------------------
# fine-tuning


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
        raise ValueError(f"dataset {spec.name!r} has no test split: pass --test-split or --holdout N")
    return spec


def _labels_of(rows: Any, spec: DatasetSpec, split: str) -> np.ndarray:
    """The label column of loaded rows; every row must be labeled."""
    labels = np.asarray(rows["label"], dtype=np.int64)
    if labels.size == 0:
        raise ValueError(f"split {split!r} of dataset {spec.name!r} is empty")
    if (labels < 0).any():
        raise ValueError(
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
    spec = _classification_spec(args)
    train_rows = load_images(spec, spec.train_split)
    test_rows = load_images(spec, spec.test_split)
    train_labels = _labels_of(train_rows, spec, spec.train_split)
    test_labels = _labels_of(test_rows, spec, spec.test_split)
    num_classes = args.num_classes or spec.num_classes or int(train_labels.max()) + 1
    top = int(max(train_labels.max(), test_labels.max()))
    if top >= num_classes:
        raise ValueError(f"label {top} does not fit num_classes={num_classes}: pass --num-classes")
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

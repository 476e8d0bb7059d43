"""Features and kNN: ``extract_features`` (batched, no grad, gathered by id over processes) and the weighted
kNN of the InstDisc/SimCLR monitors (cosine, k = 200, weights ``exp(sim / T)``, T = 0.1)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_ccrop.distributed import gather_by_id
from hub_ccrop.inference import autocast, run_batches

KNN_PROTOCOL = "knn (cosine, weighted exp(sim/T) voting)"


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

    def features(images: Tensor) -> tuple[Tensor]:
        with autocast(images.device, autocast_dtype):
            feats = backbone(images).float()
        return (F.normalize(feats, dim=1) if normalize else feats,)

    ids, labels, columns = run_batches(backbone, loader, features, accelerator=accelerator,
                                       channels_last=channels_last, progress=progress, desc=desc)
    if not columns or labels is None:
        raise ValueError("extract_features: the loader produced no (images, ids, labels) batches")
    ids, feats, labels = gather_by_id(ids, columns[0], labels, accelerator=accelerator)
    return ids, feats, labels


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> Tensor:
    """Weighted kNN class scores ``[N_test, num_classes]`` (on CPU).

    Features must be L2-normalized (cosine similarity = dot product). Each of the ``k`` nearest
    training samples votes for its label with weight ``exp(sim / temperature)``. ``num_classes``
    defaults to ``max(train label) + 1``.
    """
    device = torch.device(device) if device is not None else train_feats.device
    if train_labels.numel() and int(train_labels.min()) < 0:
        raise ValueError("knn_predict: training labels must be >= 0 (unlabeled rows cannot vote)")
    if num_classes is None:
        num_classes = 1 + int(train_labels.max()) if train_labels.numel() else 0
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
    num_classes: int | None = None,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """kNN top-1/top-5 accuracy (percent) of ``test_feats`` against a labeled feature bank
    (``num_classes`` defaults to ``max(label) + 1`` over both sets)."""
    if num_classes is None:
        num_classes = 1 + int(torch.cat([train_labels.flatten().cpu(), test_labels.flatten().cpu(), torch.tensor([-1])]).max())
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


"""The linear probe: the paper's protocol on a frozen backbone (``linear_probe``) and a fast check on cached
features (``linear_probe_on_features``); ``linear_protocol`` picks the hyper-parameters per dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hub_ccrop.data import DatasetSpec
from hub_ccrop.distributed import is_distributed, is_main_process, set_loader_epoch
from hub_ccrop.evaluate.backbone import _forward, _frozen
from hub_ccrop.evaluate.knn import extract_features, topk_accuracy
from hub_ccrop.inference import model_device

LINEAR_PROTOCOL = "linear-probe (paper): frozen backbone, augmented train images, last epoch"
FAST_LINEAR_PROTOCOL = "linear-probe-cached-features (fast check, not the paper's protocol)"


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
    device = model_device(backbone, accelerator)
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


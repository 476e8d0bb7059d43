"""Detection transfer: torchvision Faster R-CNN + FPN on a timm backbone, Hub-format detection rows,
training under accelerate and COCO-style mAP gathered by image id."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hub_ccrop.data import decode_image
from hub_ccrop.distributed import is_main_process, set_loader_epoch
from hub_ccrop.evaluate.backbone import load_backbone
from hub_ccrop.inference import evaluating, model_device

# ----------------------------------------------------------------------------------------------------
# model


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` model followed by an FPN; ``out_channels`` as torchvision expects.

    ``forward`` returns an ``OrderedDict`` ``{"0": P2, "1": P3, ..., "pool": P6}`` (one map per
    ``out_indices`` entry of the body, plus the max-pooled extra level).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    @property
    def num_levels(self) -> int:
        return len(self.body.feature_info.channels())

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def freeze_stages(body: nn.Module, trainable_stages: int) -> list[str]:
    """Freeze all but the last ``trainable_stages`` feature stages of a timm ``features_only`` body.

    Stages are the body's ``feature_info`` entries (ResNet: stem, layer1..layer4), so 3 trains
    layer2..layer4 as torchvision's ``trainable_layers=3``. Frozen modules get ``requires_grad=False``
    and frozen BatchNorms. Returns the frozen module names.
    """
    from timm.utils import freeze

    stages = [info["module"].replace(".", "_") for info in body.feature_info.info]
    if not 0 <= trainable_stages <= len(stages):
        raise ValueError(f"trainable_stages must be in [0, {len(stages)}], got {trainable_stages}")
    if trainable_stages == len(stages):
        return []
    last_frozen = stages[len(stages) - trainable_stages - 1]
    frozen = []
    for name, _ in body.named_children():
        frozen.append(name)
        if name == last_frozen:
            break
    freeze(body, frozen)
    return frozen


def build_faster_rcnn(
    backbone: str | Path | nn.Module,
    num_categories: int,
    *,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    fpn_channels: int = 256,
    frozen_bn: bool = True,
    trainable_stages: int = 3,
    min_size: int = 800,
    max_size: int = 1333,
    **faster_rcnn_kwargs: Any,
) -> nn.Module:
    """torchvision ``FasterRCNN`` with an FPN over a timm backbone's multi-scale features.

    ``backbone`` is a source for ``load_backbone`` (run folder, timm export, ``hf-hub:``/``timm:`` id)
    or an already built timm ``features_only`` model. ``num_categories`` excludes the background
    (torchvision's ``num_classes`` is ``num_categories + 1``; labels are 1..num_categories).
    Anchors: one size per level (32, 64, ...) x ratios (0.5, 1, 2); images are normalized inside the
    model with the backbone's mean/std, so inputs are RGB floats in [0, 1].
    """
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if isinstance(backbone, nn.Module):
        body = backbone
    else:
        body = load_backbone(backbone, features_only=True, out_indices=tuple(out_indices))
    if not hasattr(body, "feature_info"):
        raise TypeError("build_faster_rcnn needs a timm features_only model (with feature_info)")
    if frozen_bn:
        body = freeze_batch_norm_2d(body)  # torchvision's FrozenBatchNorm2d (timm's *Act variant for BN+act)
    freeze_stages(body, trainable_stages)
    fpn = TimmFPNBackbone(body, fpn_channels)
    levels = fpn.num_levels
    anchors = AnchorGenerator(
        sizes=tuple((32 * 2**i,) for i in range(levels + 1)), aspect_ratios=((0.5, 1.0, 2.0),) * (levels + 1)
    )
    roi_pool = MultiScaleRoIAlign(
        featmap_names=[str(i) for i in range(levels)], output_size=7, sampling_ratio=2
    )
    cfg = getattr(body, "pretrained_cfg", {}) or {}
    return FasterRCNN(
        fpn,
        num_classes=num_categories + 1,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(cfg.get("mean", (0.485, 0.456, 0.406))),
        image_std=list(cfg.get("std", (0.229, 0.224, 0.225))),
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        **faster_rcnn_kwargs,
    )


# ----------------------------------------------------------------------------------------------------
# data


def _field(objects: Mapping[str, list] | Sequence[Mapping[str, Any]], key: str) -> list:
    """One field of a row's objects, stored as a dict of lists or as a list of dicts."""
    if isinstance(objects, Mapping):
        return list(objects[key])
    return [o[key] for o in objects]


class DetectionDataset(Dataset):
    """Hub-format detection rows as ``(image [3,H,W] in [0,1], target)`` for torchvision.

    Rows hold an image and objects with boxes and category ids, either nested in ``objects_column``
    (a dict of lists, as in ``cppe-5`` or ``detection-datasets/coco``, or a list of dicts) or as
    top-level columns when ``objects_column`` is ``None``. ``box_format`` is ``xyxy``, ``xywh`` or
    ``cxcywh`` in pixels (``normalized=True``: fractions of the image size). Labels are
    ``category + category_offset`` (offset 1 for 0-based categories: 0 is the background).
    Degenerate boxes are dropped; ``train=True`` adds a random horizontal flip. ``image_id`` is the row
    index.
    """

    def __init__(
        self,
        data: Any,
        *,
        image_column: str = "image",
        objects_column: str | None = "objects",
        bbox_key: str = "bbox",
        category_key: str = "category",
        box_format: str = "xywh",
        normalized: bool = False,
        category_offset: int = 1,
        train: bool = False,
    ) -> None:
        if box_format not in ("xyxy", "xywh", "cxcywh"):
            raise ValueError(f"box_format must be xyxy, xywh or cxcywh, got {box_format!r}")
        self.data, self.image_column, self.objects_column = data, image_column, objects_column
        self.bbox_key, self.category_key, self.box_format = bbox_key, category_key, box_format
        self.normalized, self.category_offset, self.train = normalized, category_offset, train

    def __len__(self) -> int:
        return len(self.data)

    def _objects(self, row: Mapping[str, Any]) -> tuple[list, list]:
        objects = row if self.objects_column is None else row[self.objects_column]
        return _field(objects, self.bbox_key), _field(objects, self.category_key)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        from torchvision.ops import box_convert
        from torchvision.transforms.functional import pil_to_tensor

        row = self.data[index]
        image = pil_to_tensor(decode_image(row[self.image_column], index)).float().div_(255)
        height, width = image.shape[-2:]
        bboxes, categories = self._objects(row)
        boxes = torch.as_tensor(bboxes, dtype=torch.float32).reshape(-1, 4)
        boxes = box_convert(boxes, self.box_format, "xyxy")
        if self.normalized:
            boxes = boxes * torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = torch.as_tensor(categories, dtype=torch.int64).reshape(-1) + self.category_offset
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], labels[keep]
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(index, dtype=torch.int64)}


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict]]:
    """Lists of images and targets (images differ in size; the model batches them itself)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


# ----------------------------------------------------------------------------------------------------
# training and evaluation


def _to_device(
    images: list[Tensor], targets: list[dict], device: torch.device
) -> tuple[list[Tensor], list[dict]]:
    return [i.to(device, non_blocking=True) for i in images], [
        {k: v.to(device) for k, v in t.items()} for t in targets
    ]


def evaluate_detection(
    model: nn.Module, loader: Iterable, *, accelerator: Any = None, progress: bool = True
) -> dict[str, float | None]:
    """COCO-style box mAP (percent) with ``torchmetrics`` ``MeanAveragePrecision`` (pycocotools).

    Under several processes, predictions and targets are gathered and de-duplicated **by image id**,
    then every process computes the same numbers. Entries torchmetrics marks unavailable (-1, e.g. no
    large objects) are ``None``.
    """
    from torchmetrics.detection import MeanAveragePrecision

    device = model_device(model, accelerator)
    rows: list[tuple[int, dict, dict]] = []
    with evaluating(model):
        for images, targets in tqdm(
            loader,
            desc="detection eval",
            leave=False,
            disable=not (progress and is_main_process(accelerator)),
        ):
            images, _ = _to_device(images, [], device)
            outputs = model(images)
            for out, tgt in zip(outputs, targets, strict=True):
                pred = {
                    "boxes": out["boxes"].float().cpu(),
                    "scores": out["scores"].float().cpu(),
                    "labels": out["labels"].cpu(),
                }
                rows.append((int(tgt["image_id"]), pred, {k: tgt[k].cpu() for k in ("boxes", "labels")}))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    unique: dict[int, tuple[dict, dict]] = {}
    for image_id, pred, tgt in sorted(rows, key=lambda r: r[0]):
        unique.setdefault(image_id, (pred, tgt))  # one row per image id (padding repeats samples)
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False
    )
    for pred, tgt in unique.values():
        metric.update([pred], [tgt])
    result = metric.compute()
    out: dict[str, float | None] = {}
    for key, value in result.items():
        if isinstance(value, Tensor) and value.numel() == 1 and key != "classes":
            out[key] = None if float(value) < 0 else 100.0 * float(value)
    out["num_images"] = len(unique)
    return out


def _warmup_multistep(
    optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: Sequence[int], gamma: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up from 0.001x over ``warmup_steps``, x``gamma`` at each of ``decay_steps``."""

    def lr_factor(step: int) -> float:
        warm = 1.0 if step >= warmup_steps else 0.001 + (1 - 0.001) * step / warmup_steps
        return warm * gamma ** sum(step >= s for s in decay_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _train_detector(
    model: nn.Module,
    train_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accelerator: Any,
    *,
    steps: int,
    progress: bool,
) -> list[dict[str, float]]:
    """``steps`` iterations over ``train_loader`` (as many epochs as that takes); the per-step losses."""
    model.train()
    step, epoch, history = 0, 0, []
    bar = tqdm(
        total=steps, desc="detection finetune", disable=not (progress and is_main_process(accelerator))
    )
    while step < steps:
        set_loader_epoch(train_loader, epoch)
        for images, targets in train_loader:
            images, targets = _to_device(images, targets, accelerator.device)
            with accelerator.autocast():
                losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite detection loss at step {step}: {losses}")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in losses.items()}})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
        epoch += 1
    bar.close()
    return history


def finetune_detection(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    *,
    steps: int = 1000,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_steps: int = 100,
    milestones: Sequence[float] = (2 / 3, 8 / 9),
    gamma: float = 0.1,
    accelerator: Any = None,
    sync_bn: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune a torchvision detector for ``steps`` iterations, then evaluate on ``test_loader``.

    SGD with a linear warm-up (from 0.001x) and x``gamma`` steps at the ``milestones`` fractions of
    training (detectron2's schedule shape). Loaders yield ``(images, targets)`` (``detection_collate``)
    and must already be sharded under several processes; trainable BatchNorms become SyncBatchNorm
    there (``sync_bn``). Returns the losses, the schedule and the COCO metrics (percent).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    if sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    decay_steps = [int(m * steps) for m in milestones]
    scheduler = _warmup_multistep(optimizer, warmup_steps, decay_steps, gamma)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    history = _train_detector(
        wrapped, train_loader, optimizer, scheduler, accelerator, steps=steps, progress=progress
    )
    result: dict[str, Any] = {
        "protocol": "faster-rcnn-fpn (torchvision), COCO-style box mAP (percent)",
        "steps": steps,
        "optimizer": {
            "name": "sgd",
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "milestones": decay_steps,
            "gamma": gamma,
        },
        "final_loss": history[-1]["loss"] if history else None,
        "loss_history": history,
    }
    if test_loader is not None:
        result["metrics"] = evaluate_detection(
            wrapped, test_loader, accelerator=accelerator, progress=progress
        )
    return result



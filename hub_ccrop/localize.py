"""Semantic-aware localization (DESIGN.md 2.2): heatmaps of the last feature map -> boxes.

Heatmaps: for CNNs the channel sum of the last feature map (the paper's choice). For token models
(ViT-style) the patch tokens of the last block, reshaped to the patch grid, reduced by their L2 norm
(a channel sum of transformer tokens carries no spatial signal).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hub_ccrop.distributed import gather_by_id

__all__ = ["boxes_from_heatmaps", "feature_map", "heatmaps", "localize_boxes", "normalize_heatmaps"]


def _is_token_model(model: nn.Module) -> bool:
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_intermediates")


def feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """The last feature map ``[B, C, h, w]`` of a timm backbone (CNN, NHWC-output or token model)."""
    if _is_token_model(model):
        # Un-normed patch tokens of the last block, prefix tokens dropped, reshaped to NCHW.
        return model.forward_intermediates(images, indices=1, intermediates_only=True)[-1]
    feats = model.forward_features(images)
    if feats.ndim != 4:
        raise ValueError(
            f"{type(model).__name__}.forward_features returned shape {tuple(feats.shape)}; "
            "expected a [B, C, h, w] feature map (or a timm token model with forward_intermediates)"
        )
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        feats = feats.permute(0, 3, 1, 2)
    return feats


def heatmaps(model: nn.Module, images: Tensor) -> Tensor:
    """Raw (un-normalized) heatmaps ``[B, h, w]`` in float32: channel sum, or token L2 norm."""
    maps = feature_map(model, images).float()
    return maps.norm(dim=1) if _is_token_model(model) else maps.sum(dim=1)


def normalize_heatmaps(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image min-max to [0, 1]. Returns ``(normalized, constant)``; constant maps become 0."""
    maps = maps.float()
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values
    span = flat.max(dim=1).values - lo
    constant = ~(span > 1e-6 * lo.abs().clamp_min(1.0))
    norm = (maps - lo[:, None, None]) / torch.where(constant, 1.0, span)[:, None, None]
    return torch.where(constant[:, None, None], 0.0, norm), constant


def boxes_from_heatmaps(maps: Tensor, size: tuple[int, int], k: float = 0.1) -> Tensor:
    """Boxes ``[B, 4]`` (x0, y0, x1, y1) in [0, 1] from raw heatmaps ``[B, h, w]``.

    Min-max normalize, upsample bilinearly to the input ``size`` (H, W), threshold at ``k`` and take
    the rectangular closure of the active pixels; pixel column ``c`` covers ``[c/W, (c+1)/W]``.
    Constant maps and empty masks give the whole image.
    """
    if maps.ndim != 3:
        raise ValueError(f"heatmaps must be [B, h, w], got {tuple(maps.shape)}")
    height, width = size
    norm, constant = normalize_heatmaps(maps)
    up = F.interpolate(norm[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    mask = up > k
    cols = mask.any(dim=1)  # [B, W]
    rows = mask.any(dim=2)  # [B, H]

    def extent(active: Tensor, length: int) -> tuple[Tensor, Tensor]:
        first = active.to(torch.int8).argmax(dim=1)
        last = length - 1 - active.flip(1).to(torch.int8).argmax(dim=1)
        return first / length, (last + 1) / length

    x0, x1 = extent(cols, width)
    y0, y1 = extent(rows, height)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    whole = constant | ~cols.any(dim=1)
    full = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    return torch.where(whole[:, None], full, boxes)


@torch.no_grad()
def localize_boxes(
    model: nn.Module,
    loader: Iterable,
    *,
    k: float = 0.1,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    accelerator=None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``(images, ids, labels)`` batches; return ``(ids, boxes)`` sorted by id.

    With an ``accelerate.Accelerator`` over several processes, each process localizes its shard and
    the results are gathered **by id** (duplicates from uneven shards are dropped), so every process
    returns the same full table. The model's train/eval mode is restored afterwards.
    """
    if device is None:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    is_main = accelerator is None or accelerator.is_main_process
    all_ids, all_boxes = [], []
    try:
        for images, ids, *_ in tqdm(loader, desc="localize", disable=not (progress and is_main), leave=False):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                maps = heatmaps(model, images)
            all_ids.append(torch.as_tensor(ids, dtype=torch.int64, device=device))
            all_boxes.append(boxes_from_heatmaps(maps, tuple(images.shape[-2:]), k))
    finally:
        model.train(was_training)
    ids = torch.cat(all_ids) if all_ids else torch.empty(0, dtype=torch.int64, device=device)
    boxes = torch.cat(all_boxes) if all_boxes else torch.empty(0, 4, device=device)
    return gather_by_id(ids, boxes, accelerator=accelerator)

"""Ground-truth boxes from a column of the data (``data.box_column``), to measure the learned boxes against.

A row holds one box (``[a, b, c, d]``), several (``[[a, b, c, d], ...]``) or none (null or ``[]``), in
``data.box_format``: ``xyxy``, ``xywh`` (COCO) or ``cxcywh`` (YOLO) in pixels of the stored image, or the
same with ``_normalized`` (fractions of the image size). They become ``(x0, y0, x1, y1)`` in [0, 1], the
project's convention, in a ``[num_rows, K, 4]`` tensor indexed by sample id (K: the most boxes of a row;
missing ones are NaN). A learned box is scored by its IoU with the best-matching box of its image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from hub_ccrop.boxes import pairwise_box_iou
from hub_ccrop.data.decode import BadImageError, image_size
from hub_ccrop.data.specs import DataError

__all__ = ["BOX_FORMATS", "ground_truth_boxes", "mean_matched_iou", "single_objects"]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh", "xyxy_normalized", "xywh_normalized", "cxcywh_normalized")
# Boxes may overshoot the image by this much (annotation tools round outwards); they are clipped to it.
_SLACK_PX = 1.0
_SLACK = 1e-3


def _to_xyxy(boxes: np.ndarray, kind: str) -> np.ndarray:
    a, b, c, d = boxes.T
    if kind == "xywh":
        return np.stack([a, b, a + c, b + d], axis=1)
    if kind == "cxcywh":
        return np.stack([a - c / 2, b - d / 2, a + c / 2, b + d / 2], axis=1)
    return boxes


def _row_boxes(value: Any) -> np.ndarray:
    """A row's value as ``[k, 4]`` floats (k may be 0); ValueError with what is wrong."""
    if value is None:
        return np.zeros((0, 4))
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a box or a list of boxes") from None
    if arr.size == 0:
        return np.zeros((0, 4))
    arr = arr[None] if arr.shape == (4,) else arr
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{value!r} is not a box [a, b, c, d] or a list of them")
    if not np.isfinite(arr).all():
        raise ValueError(f"{value!r} has a value that is not a finite number")
    return arr


def _normalized(boxes: np.ndarray, box_format: str, size: tuple[int, int] | None) -> np.ndarray:
    """``[k, 4]`` boxes of one row in ``box_format`` as normalized xyxy; ValueError naming the problem."""
    kind, _, scale = box_format.partition("_")
    xyxy = _to_xyxy(boxes, kind)
    if not scale:
        height, width = size
        pixels = xyxy.copy()
        xyxy = xyxy / np.array([width, height, width, height], dtype=np.float64)
        slack = _SLACK_PX / min(width, height)
        where = f"the {width}x{height} image"
    else:
        slack, where, pixels = _SLACK, "[0, 1]", None
    for k, (raw, box) in enumerate(zip(boxes, xyxy, strict=True)):
        shown = "[" + ", ".join(f"{v:g}" for v in raw) + "]"
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"box {shown} has no area in format {box_format}")
        if pixels is not None and min(pixels[k, 2] - pixels[k, 0], pixels[k, 3] - pixels[k, 1]) < 1:
            raise ValueError(f"box {shown} ({box_format}) is less than a pixel wide: normalized coordinates? "
                             f"set data.box_format={kind}_normalized")
        if box.min() < -slack or box.max() > 1 + slack:
            hint = ""
            if scale and raw.max() > 1:
                hint = f": pixel coordinates? set data.box_format={kind}"
            elif not scale and raw.max() <= 1:
                hint = f": normalized coordinates? set data.box_format={kind}_normalized"
            raise ValueError(f"box {shown} ({box_format}) lies outside {where}{hint}")
    return xyxy.clip(0.0, 1.0)


def ground_truth_boxes(rows: Any, num_rows: int, column: str, box_format: str) -> Tensor:
    """``[num_rows, K, 4]`` normalized xyxy boxes (NaN where a row has fewer) from ``column`` of the
    loaded pretraining ``rows`` (``data.load_images``); a bad value raises :class:`DataError` naming the row."""
    if not hasattr(rows, "column_names") or rows.column_names is None or not hasattr(rows, "select"):
        raise DataError("data.box_column needs map-style data: set data.streaming=false")
    if box_format not in BOX_FORMATS:
        raise DataError(f"data.box_format: {box_format!r} is not one of {', '.join(BOX_FORMATS)}")
    if column not in rows.column_names:
        raise DataError(f"data.box_column: the data has no column {column!r} (columns: "
                        f"{', '.join(c for c in rows.column_names if c != 'id')})")
    pixels = not box_format.endswith("_normalized")
    ids, values = rows["id"], rows[column]
    per_row: list[np.ndarray] = []
    for k, (sample_id, value) in enumerate(zip(ids, values, strict=True)):
        image = rows[k]["image"] if pixels else None
        try:
            boxes = _row_boxes(value)
            if len(boxes):
                size = image_size(image, sample_id) if pixels else None
                boxes = _normalized(boxes, box_format, size)
        except (ValueError, BadImageError) as err:
            path = image.get("path") if isinstance(image, dict) else None
            raise DataError(f"data.box_column {column!r}, row {sample_id}{f' ({path})' if path else ''}: {err}") from None
        per_row.append(boxes)
    most = max((len(b) for b in per_row), default=0)
    if most == 0:
        raise DataError(f"data.box_column {column!r}: no row has a box (format {box_format})")
    out = torch.full((num_rows, most, 4), float("nan"))
    for sample_id, boxes in zip(ids, per_row, strict=True):
        out[sample_id, : len(boxes)] = torch.from_numpy(boxes).float()
    return out


def mean_matched_iou(boxes: Tensor, gt: Tensor) -> float:
    """Mean IoU of each box ``[N, 4]`` with its image's ground truth: ``[N, 4]`` (one box each), or
    ``[N, K, 4]`` (the best-matching one; images without a box are left out)."""
    if gt.dim() == 2:
        return float(pairwise_box_iou(boxes, gt).mean())
    n, k = gt.shape[:2]
    iou = pairwise_box_iou(boxes.repeat_interleave(k, dim=0), gt.reshape(-1, 4)).reshape(n, k)
    best = iou.nan_to_num(nan=-1.0).max(dim=1).values
    best = best[best >= 0]
    return float(best.mean()) if len(best) else float("nan")


def single_objects(gt: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, boxes [M, 4])`` of the images with exactly one ground-truth box (the object a view may miss)."""
    if gt.dim() == 2:
        return torch.arange(len(gt)), gt
    count = (~gt.isnan().any(dim=2)).sum(dim=1)
    rows = torch.nonzero(count == 1).flatten()
    return rows, gt[rows, 0]

"""How good are learned boxes? IoU with the objects beside the baselines that need no localization.

A learned box is only worth something if it knows more than a box drawn without looking at the image.
Two such baselines are reported beside every IoU:

- the **whole image** ``(0, 0, 1, 1)`` (its IoU with an object is the object's area);
- a **centred box of the same size**: each learned box moved so that its centre is the image centre. It
  keeps the learned box's size, so the difference to the learned box's IoU is what its *position* knows.

Both overall and on images with **small objects** (ground-truth area <= ``SMALL_AREA``), where a box that
knows nothing loses most. The mean box centre against the image centre (and the objects' mean centre)
shows a positional prior: boxes that sit in the same place whatever the image shows.
Without ground truth only the area and the centre are reported, and :mod:`hub_ccrop.box_follow`'s score
(``box_follow``: do the boxes stay on the content when the frame moves?), which needs none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from hub_ccrop.box_follow import DOES_NOT_FOLLOW, FOLLOWS
from hub_ccrop.boxes import box_centres, pairwise_box_iou
from hub_ccrop.localize import TRAINED_BACKBONE

__all__ = ["BOX_KEYS", "FOLLOW_OF", "SMALL_AREA", "BoxQuality", "box_areas", "box_centres", "box_quality", "box_verdict",
           "centred_boxes", "heatmap_choice_line", "pass_line", "quality_line"]

SMALL_AREA = 0.25  # "small object": ground-truth box area <= 25% of the image
KNOWS_GAIN = 0.02  # IoU over the centred box of the same size that counts as knowing where the objects are

# the metric keys of BoxQuality.metrics(), in print order (train.py keeps the latest of each)
BOX_KEYS = ("box_iou", "box_iou_whole_image", "box_iou_centred", "box_iou_small", "box_iou_whole_image_small",
            "box_iou_centred_small", "small_objects", "box_area", "box_centre_x", "box_centre_y", "gt_centre_x",
            "gt_centre_y", "box_follow")


FOLLOW_OF = "box_follow_of_"  # + a heatmap source: a pass record's follow score of each map it chose between


def box_areas(boxes: Tensor) -> Tensor:
    """Areas ``[N]`` of ``[N, 4]`` boxes ``(x0, y0, x1, y1)`` (fractions of the image)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def centred_boxes(boxes: Tensor) -> Tensor:
    """Boxes of the same widths and heights as ``boxes``, centred on the image centre (0.5, 0.5)."""
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    return torch.cat([0.5 - half, 0.5 + half], dim=1)


def _mean(values: Tensor) -> float:
    return float(values.double().mean()) if values.numel() else math.nan


@dataclass(frozen=True)
class BoxQuality:
    """Mean IoUs of learned boxes and of the baselines, overall and on small objects; areas and centres.

    IoU fields are NaN without ground truth (``*_small`` also when no object is small)."""

    images: int
    box_area: float
    box_centre_x: float
    box_centre_y: float
    box_iou: float = math.nan
    box_iou_whole_image: float = math.nan
    box_iou_centred: float = math.nan
    small_objects: int = 0
    box_iou_small: float = math.nan
    box_iou_whole_image_small: float = math.nan
    box_iou_centred_small: float = math.nan
    gt_centre_x: float = math.nan
    gt_centre_y: float = math.nan
    box_follow: float = math.nan  # hub_ccrop.box_follow's score: 1 boxes stay on the content, 0 they move with the frame

    @property
    def has_ground_truth(self) -> bool:
        return not math.isnan(self.box_iou)

    def metrics(self) -> dict[str, float]:
        """The fields as ``metrics.json`` / history keys (:data:`BOX_KEYS`), NaNs left out (JSON has none)."""
        values = asdict(self)
        if not self.has_ground_truth:
            del values["small_objects"]
        return {key: values[key] for key in BOX_KEYS
                if key in values and not (isinstance(values[key], float) and math.isnan(values[key]))}

    def line(self) -> str:
        """One line for a log: the IoU beside both baselines (overall, small objects) and the mean centre."""
        return quality_line(self.metrics())


def _best_iou(boxes: Tensor, gt: Tensor) -> Tensor:
    """``[N]``: each box's IoU with the best-matching of its image's ``K`` ground-truth boxes ``[N, K, 4]``
    (NaN rows pad images with fewer); NaN for an image without any."""
    n, k = gt.shape[:2]
    iou = pairwise_box_iou(boxes.repeat_interleave(k, dim=0), gt.reshape(-1, 4)).reshape(n, k)
    return iou.masked_fill(gt.isnan().any(dim=2), -1.0).max(dim=1).values.masked_fill(gt.isnan().all(dim=(1, 2)), math.nan)


def box_quality(boxes: Tensor, gt_boxes: Tensor | None = None, small_area: float = SMALL_AREA,
                follow: float | None = None) -> BoxQuality:
    """Judge ``boxes`` ``[N, 4]`` against ``gt_boxes`` (matching rows) and the two baselines; ``follow``: the
    pass's :class:`hub_ccrop.box_follow.FollowCheck` score, kept as ``box_follow``.

    ``gt_boxes``: ``[N, 4]`` (one object per image) or ``[N, K, 4]`` (up to ``K``, NaN rows for fewer): each box
    is scored by its best-matching object, images without one are left out, an image counts as "small
    objects" when its largest object is small, and the objects' centre is that of each image's largest.
    """
    boxes = torch.as_tensor(boxes).double().cpu()
    centre = box_centres(boxes).mean(dim=0) if len(boxes) else torch.full((2,), math.nan, dtype=torch.float64)
    base: dict[str, Any] = {"images": len(boxes), "box_area": _mean(box_areas(boxes)),
                            "box_centre_x": float(centre[0]), "box_centre_y": float(centre[1]),
                            "box_follow": math.nan if follow is None else float(follow)}
    if gt_boxes is None:
        return BoxQuality(**base)
    gt = torch.as_tensor(gt_boxes).double().cpu()
    gt = gt[:, None] if gt.dim() == 2 else gt
    if gt.dim() != 3 or gt.shape[0] != len(boxes) or gt.shape[2] != 4:
        raise ValueError(f"box_quality: {tuple(boxes.shape)} boxes but {tuple(gt_boxes.shape)} ground-truth boxes")
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64).expand_as(boxes)
    ious = {"": _best_iou(boxes, gt), "_whole_image": _best_iou(whole, gt),
            "_centred": _best_iou(centred_boxes(boxes), gt)}
    has_object = ~ious[""].isnan()
    areas = box_areas(gt.reshape(-1, 4)).reshape(gt.shape[:2]).nan_to_num(nan=-1.0)
    largest = gt[torch.arange(len(gt)), areas.argmax(dim=1)][has_object]
    small = (areas.max(dim=1).values <= small_area)[has_object]
    ious = {name: iou[has_object] for name, iou in ious.items()}
    gt_centre = box_centres(largest).mean(dim=0)
    return BoxQuality(
        **base, small_objects=int(small.sum()), gt_centre_x=float(gt_centre[0]), gt_centre_y=float(gt_centre[1]),
        **{f"box_iou{name}": _mean(iou) for name, iou in ious.items()},
        **{f"box_iou{name}_small": _mean(iou[small]) for name, iou in ious.items()},
    )


def quality_line(metrics: Mapping[str, Any]) -> str:
    """The one-line report of :meth:`BoxQuality.line` from its metric keys (e.g. a ``metrics.json``)."""
    m = metrics
    centre = f"mean box centre ({m['box_centre_x']:.2f}, {m['box_centre_y']:.2f})"
    follow = (f"; boxes follow the content {m['box_follow']:.2f} (1: they stay on what the image shows when the "
              "frame moves, 0: they move with the frame, as a centred box does)") if "box_follow" in m else ""
    if "box_iou" not in m:
        return f"mean box area {m['box_area']:.2f}, {centre} (image centre (0.50, 0.50)){follow}"
    text = (f"IoU with the objects {m['box_iou']:.3f} (whole image {m['box_iou_whole_image']:.3f}, centred box of "
            f"the same size {m['box_iou_centred']:.3f})")
    if "box_iou_small" in m:
        text += (f"; small objects (area <= {SMALL_AREA:.0%}, {m['small_objects']} images) {m['box_iou_small']:.3f} "
                 f"(whole {m['box_iou_whole_image_small']:.3f}, centred {m['box_iou_centred_small']:.3f})")
    return (f"{text}; mean box area {m['box_area']:.2f}, {centre}, objects' ({m['gt_centre_x']:.2f}, "
            f"{m['gt_centre_y']:.2f}), image centre (0.50, 0.50){follow}")


def box_verdict(metrics: Mapping[str, Any]) -> str | None:
    """What :func:`quality_line`'s numbers mean, in one sentence: with ground truth, do the boxes know more than
    a centred box of their size; without, do they at least follow the content. None when nothing says."""
    stronger = "a stronger localizer (crop.localizer) may do better"
    if "box_iou" in metrics:
        gain = metrics["box_iou"] - metrics["box_iou_centred"]
        if gain > KNOWS_GAIN:
            return f"the boxes know where the objects are: {gain:+.3f} IoU over a centred box of their size"
        return (f"the boxes know no more than a centred box of their size ({gain:+.3f} IoU): ContrastiveCrop "
                f"cannot gain from them; {stronger}")
    follow = metrics.get("box_follow")
    if follow is None:
        return None
    if follow >= FOLLOWS:
        return f"the boxes follow the image content (box_follow {follow:.2f} >= {FOLLOWS}), as boxes that find objects do"
    if follow < DOES_NOT_FOLLOW:
        return (f"the boxes hardly follow the image content (box_follow {follow:.2f} < {DOES_NOT_FOLLOW}), as a "
                f"centred box would: they are unlikely to know where the objects are; {stronger}")
    return f"the boxes follow the image content only in part (box_follow {follow:.2f})"


def heatmap_choice_line(source: str, scores: Mapping[str, float]) -> str:
    """Which heatmap a pass (or ``show``) chose among several, and the follow scores it chose by."""
    return (f"heatmap {source} (chosen by the follow check: "
            + ", ".join(f"{name} {score:.2f}" for name, score in scores.items()) + ")")


def pass_line(record: Mapping[str, Any]) -> str:
    """A localization pass's log line: how many images, how long, with which localizer (and which of a ViT's
    heatmaps, when the pass chose), and :func:`quality_line`."""
    who = record.get("localizer", TRAINED_BACKBONE)
    by = "" if who == TRAINED_BACKBONE else f" with {who}"
    scores = {key.removeprefix(FOLLOW_OF): value for key, value in record.items() if key.startswith(FOLLOW_OF)}
    if len(scores) > 1:
        by += f", {heatmap_choice_line(record['heatmap_source'], scores)}"
    return f"localized {record['loc_images']} images in {record['loc_seconds']:.1f}s{by}: {quality_line(record)}"

"""hub_ccrop: ContrastiveCrop self-supervised pretraining of timm backbones, shared on the Hugging Face Hub."""

from hub_ccrop.boxes import BoxTable, BoxTableMismatch
from hub_ccrop.crop import FULL_BOX, ContrastiveCrop, sample_crop_params
from hub_ccrop.localize import boxes_from_heatmaps, localize_boxes

__version__ = "0.1.0"

__all__ = [
    "FULL_BOX",
    "BoxTable",
    "BoxTableMismatch",
    "ContrastiveCrop",
    "boxes_from_heatmaps",
    "localize_boxes",
    "sample_crop_params",
]

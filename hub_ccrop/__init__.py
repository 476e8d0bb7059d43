"""hub_ccrop: ContrastiveCrop self-supervised pretraining of timm backbones, shared on the Hugging Face Hub.

Importing the package registers the CIFAR-stem ResNets (``resnet18_cifar``, ...) with timm.
"""

from hub_ccrop.boxes import BoxTable, BoxTableMismatch
from hub_ccrop.crop import FULL_BOX, ContrastiveCrop, sample_crop_params
from hub_ccrop.hub import load_boxes
from hub_ccrop.localize import boxes_from_heatmaps, localize_boxes
from hub_ccrop.methods import SSLMethod, build_method
from hub_ccrop.models import create_backbone, feature_dim

__version__ = "0.1.0"

__all__ = [
    "FULL_BOX",
    "BoxTable",
    "BoxTableMismatch",
    "ContrastiveCrop",
    "SSLMethod",
    "boxes_from_heatmaps",
    "build_method",
    "create_backbone",
    "feature_dim",
    "load_boxes",
    "localize_boxes",
    "sample_crop_params",
]

"""hub_ccrop: ContrastiveCrop self-supervised pretraining of timm backbones, shared on the Hugging Face Hub.

Importing the package registers the CIFAR-stem ResNets (``resnet18_cifar``, ...) with timm. The Python API
(:mod:`hub_ccrop.api`)::

    import hub_ccrop

    run = hub_ccrop.train("recipes/quickstart.yaml", overrides={"train.seed": 1})  # the run folder
    backbone = hub_ccrop.load_backbone(run)            # a timm model; also "hf-hub:ORG/NAME"
    boxes = hub_ccrop.load_boxes(run)                  # the BoxTable; also a Hub repo id
    recipe = hub_ccrop.load_recipe("recipes/quickstart.yaml", ["train.epochs=16"])

``train``, ``load_recipe``, ``load_backbone`` and ``load_boxes`` load their modules on first use.
"""

import importlib
from typing import Any

from hub_ccrop.boxes import BoxTable, BoxTableMismatch
from hub_ccrop.crop import FULL_BOX, ContrastiveCrop, sample_crop_params
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
    "load_backbone",
    "load_boxes",
    "load_recipe",
    "localize_boxes",
    "sample_crop_params",
    "train",
]

# name -> the module it comes from, imported when the name is first used
_LAZY = {"train": "hub_ccrop.api", "load_recipe": "hub_ccrop.recipe", "load_backbone": "hub_ccrop.evaluate",
         "load_boxes": "hub_ccrop.hub"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hub_ccrop' has no attribute {name!r}")

"""The paper: its citation and reference numbers (docs/METHOD.md, section 6), and the names the cards use."""

from __future__ import annotations

import re

from hub_ccrop.choices import METHOD_ALIASES

__all__ = ["DATASET_NAMES", "METHOD_NAMES", "PAPER_ARXIV_ID", "PAPER_CITATION", "PAPER_LINEAR_TOP1", "PAPER_SETTINGS", "PAPER_TITLE",
           "dataset_key", "method_key", "paper_reference"]

PAPER_TITLE = "Crafting Better Contrastive Views for Siamese Representation Learning"
PAPER_ARXIV_ID = "2202.03278"
PAPER_CITATION = """@inproceedings{peng2022crafting,
  title     = {Crafting Better Contrastive Views for Siamese Representation Learning},
  author    = {Peng, Xiangyu and Wang, Kai and Zhu, Zheng and Wang, Mang and You, Yang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""

# Linear top-1 (%) of the paper, (R-Crop, C-Crop), keyed by (method, dataset) as normalized by
# `paper_reference`. Table 1: ResNet-18 with the CIFAR stem, 500 epochs. Table 2: ResNet-50 on IN-1K, 100 epochs.
PAPER_LINEAR_TOP1: dict[tuple[str, str], tuple[float, float]] = {
    ("simclr", "cifar10"): (89.63, 90.08),
    ("simclr", "cifar100"): (60.30, 61.91),
    ("simclr", "tiny-imagenet"): (45.19, 46.21),
    ("simclr", "stl10"): (88.95, 89.53),
    ("moco", "cifar10"): (86.73, 88.78),
    ("moco", "cifar100"): (56.10, 57.65),
    ("moco", "tiny-imagenet"): (47.09, 47.98),
    ("moco", "stl10"): (89.17, 89.81),
    ("byol", "cifar10"): (91.96, 92.54),
    ("byol", "cifar100"): (63.75, 64.62),
    ("byol", "tiny-imagenet"): (46.08, 47.23),
    ("byol", "stl10"): (91.84, 92.42),
    ("simsiam", "cifar10"): (90.96, 91.48),
    ("simsiam", "cifar100"): (64.79, 65.82),
    ("simsiam", "tiny-imagenet"): (43.03, 44.54),
    ("simsiam", "stl10"): (89.39, 89.83),
    ("simclr", "imagenet-1k"): (61.60, 61.85),
    ("moco_v1", "imagenet-1k"): (57.25, 58.34),
    ("moco_v2", "imagenet-1k"): (64.40, 64.89),
    ("simsiam", "imagenet-1k"): (65.62, 65.95),
}
PAPER_SETTINGS = {
    "small": "Table 1 of the paper (ResNet-18 with the CIFAR stem, 500 epochs, batch 512, k=0.1, alpha=0.1)",
    "imagenet-1k": "Table 2 of the paper (ResNet-50, 100 epochs, k=0.1, alpha=0.6)",
}
METHOD_NAMES = {"simclr": "SimCLR", "moco": "MoCo", "moco_v1": "MoCo v1", "moco_v2": "MoCo v2",
                "byol": "BYOL", "simsiam": "SimSiam", "moco_v3": "MoCo v3", "dino": "DINO",
                "barlow_twins": "Barlow Twins", "vicreg": "VICReg"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tiny-imagenet": "Tiny ImageNet",
                 "stl10": "STL-10", "imagenet-1k": "ImageNet-1K"}


def method_key(method: str) -> str:
    """``"MoCo-v2"`` -> ``"moco_v2"``: the method's key into the paper's tables."""
    key = re.sub(r"[^a-z0-9]", "", method.lower())
    return METHOD_ALIASES.get(key, key)


def dataset_key(dataset: str) -> str:
    """A dataset name or Hub id -> its key into the paper's tables (``"ILSVRC/imagenet-1k"`` -> ``"imagenet-1k"``)."""
    key = re.sub(r"[^a-z0-9]", "", dataset.lower().rsplit("/", 1)[-1])
    aliases = {"tinyimagenet": "tiny-imagenet", "tinyimagenet200": "tiny-imagenet", "imagenet1k": "imagenet-1k",
               "imagenet": "imagenet-1k", "in1k": "imagenet-1k", "ilsvrc2012": "imagenet-1k"}
    return aliases.get(key, key)


def paper_reference(method: str, dataset: str) -> tuple[float, float] | None:
    """The paper's linear top-1 (R-Crop, C-Crop) for a method and dataset name or Hub id, or None."""
    m, d = method_key(method), dataset_key(dataset)
    if d != "imagenet-1k" and m in ("moco", "moco_v1", "moco_v2"):
        m = "moco"  # Table 1 has one MoCo row (MoCo v3 is another method, not in the paper)
    elif d == "imagenet-1k" and m == "moco":
        m = "moco_v1"
    return PAPER_LINEAR_TOP1.get((m, d))


"""The one list of choices of each setting: the recipe's checker and the code that acts on a setting read
the same constants (no torch here: the recipe checker imports this before anything heavy)."""

from __future__ import annotations

__all__ = [
    "BOX_RULES",
    "CROP_MODES",
    "HEATMAP_ALIGNMENTS",
    "HEATMAP_SOURCES",
    "LR_SCALINGS",
    "MIXED_PRECISIONS",
    "OPTIMIZERS",
    "SCHEDULES",
    "WEIGHT_DECAY_FILTERS",
]

# other spellings of the methods' registry keys, as their papers and code write them (moco-v3: "mocov3")
METHOD_ALIASES = {"mocov1": "moco_v1", "mocov2": "moco_v2", "mocov3": "moco_v3", "barlowtwins": "barlow_twins"}
CROP_MODES = ("ccrop", "rcrop")  # ContrastiveCrop (Algorithm 1 inside each image's box); RandomResizedCrop
HEATMAP_ALIGNMENTS = ("receptive_field", "official")
# auto: the class token's last-block attention for ViTs, the last feature map's norm for CNNs
HEATMAP_SOURCES = ("auto", "cls_attention", "feature_norm")
# threshold: the paper's rectangle around every pixel above k; largest_component: around the largest connected
# region above k; quantile: each map's own k-quantile as its threshold (localize.boxes_from_maps)
BOX_RULES = ("threshold", "largest_component", "quantile")
OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "step", "constant")
LR_SCALINGS = ("none", "linear")  # linear: lr x global batch / 256
# all: every parameter decays (the ContrastiveCrop paper's code); no_norm_bias: parameters with ndim <= 1
# (biases, norm weights) do not (DINO, Barlow Twins); timm: nor do the backbone's no_weight_decay() names
# (pos_embed, cls_token, ...), as timm's optimizer factory does.
WEIGHT_DECAY_FILTERS = ("all", "no_norm_bias", "timm")
MIXED_PRECISIONS = ("no", "bf16", "fp16")

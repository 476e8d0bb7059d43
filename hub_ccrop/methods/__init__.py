"""SSL methods behind one interface: SimCLR, MoCo v1/v2/v3, BYOL, SimSiam, DINO, Barlow Twins, VICReg on any
timm backbone.

    method = build_method("moco_v2", create_backbone("resnet18_cifar"), queue_size=4096)
    loss, logs = method(views)                  # a Views batch (or method(view1, view2)); logs: {"loss", "pos_cosine"}
    loss.backward(); optimizer.step()
    method.after_optimizer_step(step, total)    # momentum / EMA updates after step `step` of `total`
    method.localization_encoder                 # the online backbone, for the heatmaps

Options per method and their defaults: ``METHOD_DEFAULTS`` (the paper's small-dataset settings; head
widths ``None`` follow the backbone's feature width). See ``SSLMethod`` for the whole contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from hub_ccrop.choices import METHOD_ALIASES
from hub_ccrop.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from hub_ccrop.methods.base import (
    Encoder,
    MethodOptions,
    MomentumMethod,
    SSLMethod,
    frozen_copy,
    mlp_head,
    momentum_at,
    momentum_update,
)
from hub_ccrop.methods.byol import BYOL, BYOLConfig
from hub_ccrop.methods.dino import DINO, DINOConfig
from hub_ccrop.methods.losses import byol_loss, info_nce_loss, mean_cosine, negative_cosine, nt_xent_loss
from hub_ccrop.methods.moco import (
    MoCo,
    MoCoConfig,
    MoCoV1Config,
    MoCoV2Config,
    SplitBatchNorm2d,
    convert_split_bn,
)
from hub_ccrop.methods.moco_v3 import MoCoV3, MoCoV3Config
from hub_ccrop.methods.redundancy import barlow_twins_loss, off_diagonal, vicreg_loss
from hub_ccrop.methods.simclr import SimCLR, SimCLRConfig
from hub_ccrop.methods.simsiam import SimSiam, SimSiamConfig
from hub_ccrop.methods.vicreg import VICReg, VICRegConfig

__all__ = [
    "BYOL",
    "METHODS",
    "METHOD_DEFAULTS",
    "BYOLConfig",
    "DINO",
    "DINOConfig",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "Encoder",
    "MethodOptions",
    "MoCo",
    "MoCoConfig",
    "MoCoV1Config",
    "MoCoV2Config",
    "MoCoV3",
    "MoCoV3Config",
    "MomentumMethod",
    "SSLMethod",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "SplitBatchNorm2d",
    "VICReg",
    "VICRegConfig",
    "barlow_twins_loss",
    "build_method",
    "canonical_method",
    "convert_split_bn",
    "byol_loss",
    "frozen_copy",
    "info_nce_loss",
    "mean_cosine",
    "method_config",
    "mlp_head",
    "momentum_at",
    "momentum_update",
    "negative_cosine",
    "nt_xent_loss",
    "off_diagonal",
    "vicreg_loss",
]

#: name -> (method class, config dataclass)
METHODS: dict[str, tuple[type[SSLMethod], type[MethodOptions]]] = {
    "simclr": (SimCLR, SimCLRConfig),
    "moco_v1": (MoCo, MoCoV1Config),
    "moco_v2": (MoCo, MoCoV2Config),
    "byol": (BYOL, BYOLConfig),
    "simsiam": (SimSiam, SimSiamConfig),
    "dino": (DINO, DINOConfig),
    "moco_v3": (MoCoV3, MoCoV3Config),
    "barlow_twins": (BarlowTwins, BarlowTwinsConfig),
    "vicreg": (VICReg, VICRegConfig),
}

#: name -> {option: default}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    name: dataclasses.asdict(config_cls()) for name, (_, config_cls) in METHODS.items()
}


def canonical_method(name: str) -> str:
    """A method name as a recipe may spell it (``MoCo-v3``, ``mocov3``) -> its registry key (``moco_v3``)."""
    key = name.strip().lower().replace("-", "_")
    return METHOD_ALIASES.get(key, key)


def _canonical(name: str) -> str:
    key = canonical_method(name)
    if key not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")
    return key


def method_config(name: str, **cfg: Any) -> MethodOptions:
    """The validated options of method ``name`` (unknown keys, wrong types and bad ranges raise
    ``ValueError`` naming the option)."""
    key = _canonical(name)
    return METHODS[key][1].from_kwargs(cfg, method=key)


def build_method(name: str, backbone: nn.Module, **cfg: Any) -> SSLMethod:
    """Build SSL method ``name`` (``simclr``, ``moco_v1``, ``moco_v2``, ``byol``, ``simsiam``, ``dino``,
    ``moco_v3``, ``barlow_twins``, ``vicreg``) around ``backbone`` (a ``create_backbone`` model) with options
    ``cfg`` (see ``METHOD_DEFAULTS``)."""
    key = _canonical(name)
    return METHODS[key][0](backbone, method_config(key, **cfg))

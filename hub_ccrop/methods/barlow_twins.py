"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' embeddings, over the global
batch, driven to the identity. Values from the official ``facebookresearch/barlowtwins`` ``main.py``."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from hub_ccrop.methods.redundancy import RedundancyOptions, RedundancyReduction, barlow_twins_loss

__all__ = ["BarlowTwins", "BarlowTwinsConfig"]


@dataclasses.dataclass
class BarlowTwinsConfig(RedundancyOptions):
    """Barlow Twins options (defaults: ``main.py``'s; projector 8192-8192-8192, lambda 0.0051)."""

    lambd: float = 0.0051  # weight of the cross-correlation's off-diagonal terms (--lambd)
    # lr of biases and BatchNorm parameters / the weights' lr (optim.lr): --learning-rate-biases 0.0048 /
    # --learning-rate-weights 0.2
    bias_lr_scale: float = 0.024

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambd", "bias_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name!r} must be >= 0, got {getattr(self, name)}")


class BarlowTwins(RedundancyReduction):
    """Backbone -> expander (Linear-BN-ReLU x 2, Linear, no biases) -> ``barlow_twins_loss``.

    Two optimizer groups as ``main.py``: weights, and the 1-d parameters (biases, BatchNorm) whose group is
    flagged ``lr_scale = bias_lr_scale`` (the lr schedule multiplies its lr by it).
    """

    config: BarlowTwinsConfig

    def __init__(self, backbone: nn.Module, config: BarlowTwinsConfig | None = None) -> None:
        super().__init__(backbone, config or BarlowTwinsConfig())

    def pair_loss(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return barlow_twins_loss(z1, z2, self.config.lambd)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """``main.py``: ``param.ndim == 1`` -> the biases group (lr x ``bias_lr_scale``), else the weights group."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim != 1], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim == 1], "lr": lr, "weight_decay": weight_decay,
             "lr_scale": self.config.bias_lr_scale},
        ]

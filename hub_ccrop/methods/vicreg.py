"""VICReg (Bardes et al. 2022): invariance, variance and covariance terms on the expander's embeddings, the
last two over the global batch. Values from the official ``facebookresearch/vicreg`` ``main_vicreg.py``."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from hub_ccrop.methods.redundancy import RedundancyOptions, RedundancyReduction, vicreg_loss

__all__ = ["VICReg", "VICRegConfig"]


@dataclasses.dataclass
class VICRegConfig(RedundancyOptions):
    """VICReg options (defaults: ``main_vicreg.py``'s; expander 8192-8192-8192, coefficients 25 / 25 / 1)."""

    sim_coeff: float = 25.0  # weight of the invariance term, the views' mean squared error (--sim-coeff)
    std_coeff: float = 25.0  # weight of the variance term, mean relu(1 - std) per dimension (--std-coeff)
    cov_coeff: float = 1.0  # weight of the covariance term, squared off-diagonal covariances / dim (--cov-coeff)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name!r} must be >= 0, got {getattr(self, name)}")


class VICReg(RedundancyReduction):
    """Backbone -> expander (Linear-BN-ReLU x 2, Linear; no biases) -> ``vicreg_loss``; one optimizer group
    (``main_vicreg.py``'s LARS excludes biases and norms from decay and adaptation, as ours does)."""

    config: VICRegConfig

    def __init__(self, backbone: nn.Module, config: VICRegConfig | None = None) -> None:
        super().__init__(backbone, config or VICRegConfig())

    def pair_loss(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        return vicreg_loss(z1, z2, c.sim_coeff, c.std_coeff, c.cov_coeff)

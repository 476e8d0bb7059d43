"""SimCLR (Chen et al. 2020): projector + NT-Xent with negatives from the global batch."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from hub_ccrop.methods.base import Encoder, MethodOptions, SSLMethod, mlp_head, view_pairs
from hub_ccrop.methods.losses import mean_cosine, nt_xent_loss
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = ["SimCLR", "SimCLRConfig"]


@dataclasses.dataclass
class SimCLRConfig(MethodOptions):
    """SimCLR options (defaults: the paper's small-dataset setting, projector 512-512-128, T = 0.5)."""

    temperature: float = 0.5
    # The official small-dataset code (losses/NT_Xent_dist.py, SupContrast's form) multiplies the loss by
    # temperature / base_temperature (0.5 / 0.07 = 7.14 in configs/small/*/simclr_*.py): with SGD that is
    # a 7.14x larger gradient step. None: plain NT-Xent (SimCLR's paper).
    base_temperature: float | None = None
    hidden_dim: int | None = None  # projector hidden width; None: the backbone's feature width
    out_dim: int = 128


class SimCLR(SSLMethod):
    """Backbone -> projector (Linear-ReLU-Linear) -> NT-Xent. The crops of a view group go through the
    network as one batch (one forward; BatchNorm statistics over both views, as in the official code).

    Multi-crop (SwAV's multi-crop SimCLR): the mean NT-Xent over every pair of a global crop and another
    crop (:func:`~hub_ccrop.methods.base.view_pairs`); with two views, the plain SimCLR loss."""

    config: SimCLRConfig

    def __init__(self, backbone: nn.Module, config: SimCLRConfig | None = None) -> None:
        config = config or SimCLRConfig()
        super().__init__(config)
        dim = feature_dim(backbone)
        self.encoder = Encoder(backbone, mlp_head((dim, config.hidden_dim or dim, config.out_dim)))

    @property
    def loss_scale(self) -> float:
        """``temperature / base_temperature`` (1 without ``base_temperature``)."""
        base = self.config.base_temperature
        return 1.0 if base is None else self.config.temperature / base

    @property
    def localization_encoder(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        z = [crop for group in views.groups for crop in self.encoder(group.flatten(0, 1)).chunk(group.shape[0])]
        pairs = view_pairs(views)
        terms = [nt_xent_loss(z[i], z[j], self.config.temperature) for i, j in pairs]
        loss = sum(terms[1:], terms[0])
        loss = (loss if len(terms) == 1 else loss / len(terms)) * self.loss_scale
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(z[0], z[1]))

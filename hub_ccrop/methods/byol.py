"""BYOL (Grill et al. 2020): online network + predictor regress an EMA target network's projections."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from hub_ccrop.methods.base import Encoder, MethodOptions, MomentumMethod, MomentumSchedule, mlp_head
from hub_ccrop.methods.losses import byol_loss, mean_cosine
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = ["BYOL", "BYOLConfig"]


@dataclasses.dataclass
class BYOLConfig(MethodOptions):
    """BYOL options (defaults: the paper's small-dataset setting; projector 512-512(BN,ReLU)-128,
    predictor 128-512-128, constant momentum 0.996 as the official code; BYOL's paper uses cosine)."""

    hidden_dim: int | None = None  # projector hidden width; None: the backbone's feature width
    out_dim: int = 128
    pred_hidden_dim: int | None = None  # predictor hidden width; None: the projector's hidden width
    momentum: float = 0.996
    momentum_schedule: MomentumSchedule = "constant"


class BYOL(MomentumMethod):
    """Online encoder (``online``: backbone + projector) and ``predictor``; EMA ``target`` encoder.

    Loss: ``byol_loss(p1, t2) + byol_loss(p2, t1)`` (symmetric; 0 when the predictions match the targets).
    Multi-crop: every crop's prediction against the target of every other global crop, scaled to the
    two-view loss.
    """

    config: BYOLConfig

    def __init__(self, backbone: nn.Module, config: BYOLConfig | None = None) -> None:
        config = config or BYOLConfig()
        dim = feature_dim(backbone)
        hidden = config.hidden_dim or dim
        super().__init__(Encoder(backbone, mlp_head((dim, hidden, config.out_dim), batch_norm=True)), config)
        pred_hidden = config.pred_hidden_dim or hidden
        self.predictor = mlp_head((config.out_dim, pred_hidden, config.out_dim), batch_norm=True)

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        crops = views.crops
        z = [self.online(crop) for crop in crops]
        p = [self.predictor(zj) for zj in z]
        with torch.no_grad():
            t = [self.target(crop) for crop in views.global_crops]
        terms = [byol_loss(p[j], t[i]) for j in range(len(crops)) for i in range(len(t)) if i != j]
        loss = sum(terms[1:], terms[0])
        if len(terms) > 2:  # multi-crop: the two-view loss's scale
            loss = loss * (2.0 / len(terms))
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(z[0], z[1]))

"""SimSiam (Chen & He 2021): encoder + predictor, negative cosine with stop-gradient."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from hub_ccrop.methods.base import Encoder, MethodOptions, SSLMethod, mlp_head, param_group
from hub_ccrop.methods.losses import mean_cosine, negative_cosine
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = ["SimSiam", "SimSiamConfig"]


@dataclasses.dataclass
class SimSiamConfig(MethodOptions):
    """SimSiam options (defaults: 3-layer projector 512 with BN, last BN without affine; predictor
    512-128-512 at a fixed lr)."""

    hidden_dim: int | None = None  # projector hidden width; None: the backbone's feature width
    out_dim: int | None = None  # projector output width; None: the backbone's feature width
    pred_hidden_dim: int | None = None  # predictor bottleneck; None: out_dim // 4
    fix_pred_lr: bool = True  # the predictor's param group is flagged fix_lr (the scheduler skips it)


class SimSiam(SSLMethod):
    """``encoder`` (backbone + projector) and ``predictor``.

    Loss: ``(negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2`` with stop-gradient on ``z``; -1 at best.
    """

    config: SimSiamConfig

    def __init__(self, backbone: nn.Module, config: SimSiamConfig | None = None) -> None:
        config = config or SimSiamConfig()
        super().__init__(config)
        dim = feature_dim(backbone)
        hidden, out = config.hidden_dim or dim, config.out_dim or dim
        projector = mlp_head((dim, hidden, hidden, out), batch_norm=True, last_bn=True)
        self.encoder = Encoder(backbone, projector)
        self.predictor = mlp_head((out, config.pred_hidden_dim or max(1, out // 4), out), batch_norm=True)

    @property
    def localization_encoder(self) -> nn.Module:
        return self.encoder.backbone

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        crops = views.crops
        z = [self.encoder(crop) for crop in crops]
        p = [self.predictor(zj) for zj in z]
        # every crop's prediction against every other global crop's projection (two views: the symmetric loss)
        terms = [negative_cosine(p[j], z[i]) for j in range(len(crops)) for i in range(views.num_global) if i != j]
        loss = (1.0 / len(terms)) * sum(terms[1:], terms[0])
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(z[0], z[1]))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Encoder group, then the predictor group flagged ``fix_lr`` when ``fix_pred_lr``."""
        if not self.config.fix_pred_lr:
            return super().param_groups(lr, weight_decay)
        return [
            param_group(self.encoder, lr, weight_decay),
            param_group(self.predictor, lr, weight_decay, fix_lr=True),
        ]

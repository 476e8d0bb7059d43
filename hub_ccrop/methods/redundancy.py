"""Redundancy reduction (Barlow Twins, VICReg): the losses over the global batch, the 3-layer expander, and
the method base the two share.

Both losses reduce statistics over the **global** batch. Every reduction here carries a gradient
(``all_reduce_with_grad`` / ``all_gather_with_grad``): each process computes the same global loss, the
backward of the reduction sums over processes the gradients of this process's rows, and DDP's averaging
then gives exactly the gradient of one process holding the whole batch (``tests/test_barlow_vicreg.py``
proves it on two processes, and that a reduction without backward makes it ``1 / world_size`` too small).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_ccrop.distributed import all_gather_with_grad, all_reduce_with_grad, get_world_size
from hub_ccrop.methods.base import Encoder, MethodOptions, SSLMethod, view_pairs
from hub_ccrop.methods.losses import mean_cosine
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = [
    "RedundancyOptions",
    "RedundancyReduction",
    "barlow_twins_loss",
    "batch_standardize",
    "expander",
    "off_diagonal",
    "vicreg_loss",
]


def _fp32(x: Tensor) -> torch.autocast:
    """Context that turns autocast off on ``x``'s device (inputs are then cast with ``.float()``)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _at_least_fp32(x: Tensor) -> Tensor:
    """float32 under reduced precision; float64 stays float64 (the parity tests)."""
    return x if x.dtype == torch.float64 else x.float()


def off_diagonal(x: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened (a view, no copy of the n x n matrix).

    Dropping the first element of the flattened matrix leaves the diagonal at the end of each row of the
    ``(n - 1, n + 1)`` view.
    """
    n, m = x.shape
    if n != m:
        raise ValueError(f"off_diagonal needs a square matrix, got {n} x {m}")
    return x.flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()


def batch_standardize(*zs: Tensor, eps: float = 1e-5) -> list[Tensor]:
    """Each ``[n, d]`` embedding centred and scaled per feature with the mean and the biased variance of the
    global batch: ``BatchNorm1d(d, affine=False)`` in training mode (what Barlow Twins' SyncBN ``bn`` does).
    Two passes (mean, then the centred squares): no cancellation when the mean is large."""
    count = zs[0].shape[0] * get_world_size()
    means = all_reduce_with_grad(torch.stack([z.sum(0) for z in zs])) / count
    centred = [z - mean for z, mean in zip(zs, means, strict=True)]
    variances = all_reduce_with_grad(torch.stack([c.square().sum(0) for c in centred])) / count
    return [c * torch.rsqrt(var + eps) for c, var in zip(centred, variances, strict=True)]


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051) -> tuple[Tensor, dict[str, Tensor]]:
    """Barlow Twins: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with ``C`` the cross-correlation
    of the two views' embeddings ``[n, d]``, standardized over the global batch.

    Each process adds its rows' share of ``C`` and sums the shares over processes (with gradient), as the
    official ``main.py`` (which sums with a plain ``all_reduce``; see docs/PARITY.md). Returns the loss and
    its detached ``on_diag`` / ``off_diag`` sums.
    """
    with _fp32(z1):
        n1, n2 = batch_standardize(_at_least_fp32(z1), _at_least_fp32(z2))
        c = all_reduce_with_grad(n1.T @ n2) / (n1.shape[0] * get_world_size())
        on_diag = (torch.diagonal(c) - 1).square().sum()
        off_diag = off_diagonal(c).square().sum()
        return on_diag + lambd * off_diag, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


def vicreg_loss(
    z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg: ``sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance`` on embeddings ``[n, d]``.

    Invariance is the mean squared error of this process's pairs (DDP's gradient average makes it the
    global batch's); variance (``relu(1 - sqrt(var + eps))``, per feature) and covariance (squared
    off-diagonal entries / d) are computed on the global batch, gathered with gradient, as the official
    ``main_vicreg.py``. Returns the loss and its detached terms ``invariance``, ``variance``, ``covariance``.
    """
    with _fp32(z1):
        z1, z2 = _at_least_fp32(z1), _at_least_fp32(z2)
        invariance = F.mse_loss(z1, z2)
        x, y = all_gather_with_grad(torch.cat([z1, z2], dim=1)).split(z1.shape[1], dim=1)  # one collective
        x, y = x - x.mean(0), y - y.mean(0)
        variance = (F.relu(1 - torch.sqrt(x.var(0) + eps)).mean() + F.relu(1 - torch.sqrt(y.var(0) + eps)).mean()) / 2
        n, d = x.shape
        covariance = sum(off_diagonal(e.T @ e / (n - 1)).square().sum() / d for e in (x, y))
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
        terms = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return loss, {k: v.detach() for k, v in terms.items()}


def expander(dims: Sequence[int]) -> nn.Sequential:
    """The official projector ("expander", 3 layers by default): ``Linear-BN-ReLU`` per hidden layer, then a
    ``Linear``; no biases. (``main_vicreg.py``'s hidden ``Linear`` layers have one, which the BatchNorm after
    them removes: zero gradient, and LARS gives it no decay, so it never moves.)"""
    if len(dims) < 2:
        raise ValueError(f"an expander needs at least input and output widths, got {tuple(dims)}")
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


@dataclasses.dataclass
class RedundancyOptions(MethodOptions):
    """Options shared by Barlow Twins and VICReg: the expander's layer widths after the backbone."""

    # the expander's layer widths after the backbone (main.py's --projector, main_vicreg.py's --mlp)
    projector: list[int] = dataclasses.field(default_factory=lambda: [8192, 8192, 8192])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.projector or min(self.projector) <= 0:
            raise ValueError(f"option 'projector' must list positive layer widths, got {self.projector}")


class RedundancyReduction(SSLMethod):
    """Backbone + expander (``encoder``); each crop goes through it on its own (BatchNorm statistics per
    view, as the official code); the loss is ``pair_loss`` averaged over ``view_pairs`` (every global crop with
    every other crop; with two views, the papers' loss)."""

    config: RedundancyOptions

    def __init__(self, backbone: nn.Module, config: RedundancyOptions) -> None:
        super().__init__(config)
        self.encoder = Encoder(backbone, expander([feature_dim(backbone), *config.projector]))

    @property
    def localization_encoder(self) -> nn.Module:
        return self.encoder.backbone

    def pair_loss(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        zs = [self.encoder(crop) for crop in views.crops]
        losses, terms = zip(*(self.pair_loss(zs[i], zs[j]) for i, j in view_pairs(views)), strict=True)
        loss = torch.stack(losses).mean()
        mean_terms = {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(zs[0], zs[1]), **mean_terms)

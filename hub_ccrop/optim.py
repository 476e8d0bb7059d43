"""Optimizers and the paper's learning-rate schedules, per epoch as in the official code
(``utils/util.py::_get_lr``): cosine to lr * final_lr_ratio, or steps at milestones (MoCo v1)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from hub_ccrop.recipe import OptimConfig

__all__ = ["LARS", "build_optimizer", "lr_at_epoch", "set_epoch_lr"]


def lr_at_epoch(cfg: OptimConfig, epoch: int, epochs: int, base_lr: float) -> float:
    """Learning rate for a 0-based epoch: optional linear warm-up, then cosine to ``base_lr * final_lr_ratio``,
    or ``base_lr * step_factor ** (milestones passed)`` (a milestone ``m`` applies from 0-based epoch ``m``)."""
    if epoch < cfg.warmup_epochs:
        return base_lr * (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return base_lr
    if cfg.schedule == "step":
        return base_lr * cfg.step_factor ** sum(epoch >= m for m in cfg.milestones)
    final = base_lr * cfg.final_lr_ratio
    progress = (epoch - cfg.warmup_epochs) / max(1, epochs - cfg.warmup_epochs)
    return final + (base_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epoch: int, epochs: int, base_lr: float) -> float:
    """Set every param group's lr for ``epoch``; groups flagged ``fix_lr`` keep their base lr (SimSiam's predictor)."""
    lr = lr_at_epoch(cfg, epoch, epochs, base_lr)
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", base_lr) if group.get("fix_lr") else lr
    return lr


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), SimCLR/BYOL style.

    Parameters with ``ndim <= 1`` (biases, norm weights) get neither weight decay nor adaptation.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad: Tensor = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(grad)
                    trust = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * p_norm / g_norm, torch.ones_like(p_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, base_lr: float) -> torch.optim.Optimizer:
    """SGD (the paper's) or LARS over the method's param groups; ``initial_lr`` records each group's base lr."""
    for group in param_groups:
        group.setdefault("initial_lr", base_lr)
        group["lr"] = group["initial_lr"]
    if cfg.name == "lars":
        return LARS(param_groups, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(param_groups, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

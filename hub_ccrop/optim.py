"""Optimizers (timm's factory for SGD and AdamW; the SSL papers' LARS) and the learning-rate and
weight-decay schedules: per epoch as in the ContrastiveCrop code (``utils/util.py::_get_lr``), or per step
(``optim.per_step``) as DINO, MoCo v3 and Barlow Twins do.

Weight decay applies to every parameter by default (the ContrastiveCrop code); ``optim.weight_decay_filter``
exempts biases and norms (``no_norm_bias``), and also the backbone's ``no_weight_decay()`` names such as a
ViT's ``pos_embed`` and ``cls_token`` (``timm``, timm's own rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

from hub_ccrop.recipe import OptimConfig

__all__ = ["LARS", "build_optimizer", "lr_at", "lr_at_epoch", "set_epoch_lr", "set_step_schedule",
           "weight_decay_at"]


def lr_at(cfg: OptimConfig, position: float, epochs: int, base_lr: float) -> float:
    """Learning rate at ``position`` epochs into training (fractional with ``per_step``): linear warm-up
    from 0 over ``warmup_epochs``, then cosine to ``base_lr * final_lr_ratio``, a constant, or steps at
    milestones (MoCo v3's ``adjust_learning_rate`` form)."""
    if position < cfg.warmup_epochs:
        return base_lr * position / cfg.warmup_epochs
    return _after_warmup(cfg, position, epochs, base_lr)


def lr_at_epoch(cfg: OptimConfig, epoch: int, epochs: int, base_lr: float) -> float:
    """Learning rate for a 0-based epoch: optional linear warm-up, then cosine to ``base_lr * final_lr_ratio``,
    or ``base_lr * step_factor ** (milestones passed)`` (a milestone ``m`` applies from 0-based epoch ``m``)."""
    if epoch < cfg.warmup_epochs:
        return base_lr * (epoch + 1) / cfg.warmup_epochs
    return _after_warmup(cfg, epoch, epochs, base_lr)


def _after_warmup(cfg: OptimConfig, position: float, epochs: int, base_lr: float) -> float:
    if cfg.schedule == "constant":
        return base_lr
    if cfg.schedule == "step":
        return base_lr * cfg.step_factor ** sum(position >= m for m in cfg.milestones)
    final = base_lr * cfg.final_lr_ratio
    progress = (position - cfg.warmup_epochs) / max(1, epochs - cfg.warmup_epochs)
    return final + (base_lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def weight_decay_at(cfg: OptimConfig, position: float, epochs: int) -> float:
    """Weight decay at ``position`` epochs: constant, or a cosine from ``weight_decay`` to ``weight_decay_end``
    over the whole training (DINO's ``cosine_scheduler(wd, wd_end, epochs, niter)``)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    end, start = cfg.weight_decay_end, cfg.weight_decay
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(position / max(epochs, 1), 1.0)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Every group's lr; groups flagged ``fix_lr`` keep their base lr (SimSiam's predictor); ``lr_scale``
    multiplies a group's lr (Barlow Twins' biases)."""
    for group in optimizer.param_groups:
        own = group.get("initial_lr", base_lr) if group.get("fix_lr") else lr
        group["lr"] = own * group["lr_scale"] if "lr_scale" in group else own


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epoch: int, epochs: int, base_lr: float) -> float:
    """Set every param group's lr for ``epoch``; groups flagged ``fix_lr`` keep their base lr (SimSiam's predictor)."""
    lr = lr_at_epoch(cfg, epoch, epochs, base_lr)
    _set_lr(optimizer, lr, base_lr)
    return lr


def set_step_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, position: float, epochs: int,
                      base_lr: float) -> float:
    """``optim.per_step``: lr (:func:`lr_at`) and weight decay (:func:`weight_decay_at`) at a fractional
    epoch; weight decay changes only in the groups that decay at all. Returns the lr."""
    lr = lr_at(cfg, position, epochs, base_lr)
    _set_lr(optimizer, lr, base_lr)
    if cfg.weight_decay_end is not None:
        wd = weight_decay_at(cfg, position, epochs)
        for group in optimizer.param_groups:
            if group.get("initial_weight_decay", 0.0) > 0:
                group["weight_decay"] = wd
    return lr


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), SimCLR/BYOL style.

    Parameters with ``ndim <= 1`` (biases, norm weights) get neither weight decay nor adaptation: the LARS
    of moco-v3 (``moco/optimizer.py``), barlowtwins and vicreg (``main.py``). Not timm's ``Lars``: its
    trust ratio divides by ``|g| + wd |w|`` instead of ``|g + wd w|``.
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


def _no_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters timm exempts through a submodule's ``no_weight_decay()`` (ViT tokens)."""
    names = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            names |= {f"{prefix}.{name}" if prefix else name for name in sub.no_weight_decay()}
    return names


def _filter_decay(param_groups: list[dict], cfg: OptimConfig, module: nn.Module | None) -> list[dict]:
    """Split each group into a decayed part and a part without weight decay, by ``weight_decay_filter``."""
    if cfg.weight_decay_filter == "all":
        return param_groups
    exempt: set[int] = set()
    if cfg.weight_decay_filter == "timm":
        if module is None:
            raise ValueError("weight_decay_filter 'timm' needs the module (build_optimizer(..., module=method))")
        names = _no_decay_names(module)
        exempt = {id(p) for name, p in module.named_parameters() if name in names}
    out = []
    for group in param_groups:
        params = list(group["params"])
        keep = [p for p in params if p.ndim > 1 and id(p) not in exempt]
        free = [p for p in params if not (p.ndim > 1 and id(p) not in exempt)]
        out += [{**group, "params": keep}] if keep else []
        out += [{**group, "params": free, "weight_decay": 0.0}] if free else []
    return out


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, base_lr: float, module: nn.Module | None = None
                    ) -> torch.optim.Optimizer:  # fmt: skip
    """SGD (the paper's) or AdamW from timm's factory, or :class:`LARS`, over the method's param groups with
    ``weight_decay_filter`` applied (``module``: the method, for the ``timm`` filter); ``initial_lr`` and
    ``initial_weight_decay`` record each group's base values."""
    groups = _filter_decay(param_groups, cfg, module)
    for group in groups:
        group.setdefault("initial_lr", base_lr)
        group["lr"] = group["initial_lr"]
        group["initial_weight_decay"] = group.get("weight_decay", cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return create_optimizer_v2(groups, "adamw", lr=base_lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    # timm's "momentum" is torch's SGD with classical momentum (its "sgd" is Nesterov's)
    return create_optimizer_v2(groups, "momentum", lr=base_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)

"""The one interface of the SSL methods and the pieces they share: configs, MLP heads, momentum targets."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_type_hints

import torch
from torch import Tensor, nn

from hub_ccrop.checks import check_type
from hub_ccrop.views.batch import Views

__all__ = [
    "Encoder",
    "MethodOptions",
    "MomentumMethod",
    "SSLMethod",
    "frozen_copy",
    "mlp_head",
    "momentum_at",
    "momentum_update",
    "param_group",
    "two_crops",
    "view_pairs",
]

MomentumSchedule = Literal["constant", "cosine"]


# ----------------------------------------------------------------------------------------------- configs
@dataclasses.dataclass
class MethodOptions:
    """Base of the per-method option dataclasses (a recipe's ``method.options``). Options arrive from YAML
    recipes as plain kwargs: ``Config.from_kwargs(cfg)`` rejects unknown keys, ``__post_init__`` checks types
    with the recipe's own checker (``checks.check_type``: ints widen to floats) and ranges.

    Conventions: ``*_dim`` / ``*_size`` options are positive (``None`` = follow the backbone's width),
    ``temperature`` is positive, ``momentum`` lies in [0, 1].
    """

    @classmethod
    def from_kwargs(cls, cfg: Mapping[str, Any], method: str = "") -> MethodOptions:
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(accepted))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {method or cls.__name__!r}; "
                f"accepted options: {', '.join(accepted)}"
            )
        return cls(**cfg)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = check_type(getattr(self, f.name), hints[f.name], f.name)
            setattr(self, f.name, value)
            if value is None or isinstance(value, bool | str):
                continue
            if (f.name.endswith(("_dim", "_size", "temperature"))) and value <= 0:
                raise ValueError(f"option {f.name!r} must be > 0, got {value}")
            if f.name == "momentum" and not 0.0 <= value <= 1.0:
                raise ValueError(f"option 'momentum' must lie in [0, 1], got {value}")


# ------------------------------------------------------------------------------------------------- heads
def mlp_head(dims: Sequence[int], *, batch_norm: bool = False, last_bn: bool = False) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    Hidden layers are followed by ``[BatchNorm1d] + ReLU`` (BatchNorm when ``batch_norm``); ``last_bn`` adds
    a ``BatchNorm1d(affine=False)`` on the output (SimSiam). Linear layers followed by a BatchNorm have no
    bias (the BatchNorm removes it anyway). ``mlp_head((512, 128))`` is a single linear layer.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP head needs at least input and output widths, got {tuple(dims)}")
    layers: list[nn.Module] = []
    last = len(dims) - 2
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        followed_by_bn = batch_norm if i < last else last_bn
        layers.append(nn.Linear(d_in, d_out, bias=not followed_by_bn))
        if i < last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """A backbone (pooled features) followed by a projection head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


# -------------------------------------------------------------------------------------- momentum targets
def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters never receive gradients (an EMA / momentum target)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


def momentum_at(progress: float, base: float, schedule: MomentumSchedule = "constant") -> float:
    """EMA momentum at ``progress`` in [0, 1] of training: ``base`` (constant), or BYOL's cosine schedule
    ``1 - (1 - base) * (cos(pi * progress) + 1) / 2`` from ``base`` at the start to 1 at the end."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(progress, 0.0), 1.0)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule {schedule!r}; expected 'constant' or 'cosine'")


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter (buffers such as
    BatchNorm statistics are left to the target's own forward passes, as in MoCo and BYOL)."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameters")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


# --------------------------------------------------------------------------------------------- interface
def view_pairs(views: Views) -> list[tuple[int, int]]:
    """The positive pairs of multi-crop training: every global crop with every other crop, each pair
    once (``(0, 1)`` for two views; SwAV's multi-crop form for 2 global + N local)."""
    n, g = views.num_crops, views.num_global
    return [(i, j) for i in range(g) for j in range(i + 1, n)]


def two_crops(views: Views, method: str) -> tuple[Tensor, Tensor]:
    """The two crops of a two-view method; a clear error for another number."""
    crops = views.crops
    if len(crops) != 2:
        raise ValueError(f"{method} trains on two views per image, got {len(crops)} (views: {views.counts}); "
                         "set `views:` to one group of count 2 or two groups of count 1")
    return crops[0], crops[1]


def param_group(module: nn.Module, lr: float, weight_decay: float, **extra: Any) -> dict[str, Any]:
    """An optimizer parameter group with the trainable parameters of ``module``."""
    params = [p for p in module.parameters() if p.requires_grad]
    return {"params": params, "lr": lr, "weight_decay": weight_decay, **extra}


class SSLMethod(nn.Module):
    """One SSL framework (heads, targets, loss) around a backbone; the training loop's only view of it.

    - ``method(views) -> (loss, logs)``: ``views`` a :class:`~hub_ccrop.views.batch.Views` (every view
      group's crops; ``method(view1, view2)`` with plain tensors works too); scalar float32 loss and
      ``{"loss", "pos_cosine", ...}`` detached float scalar tensors on the device (``pos_cosine``: mean
      cosine similarity of the positive pair's embeddings, the paper's Fig. 5); read them only when
      logging (each read syncs the device).
    - ``localization_encoder``: the backbone whose ``forward_features`` gives the heatmaps.
    - ``start_epoch(epoch, epochs)``: called before each epoch (0-based): per-epoch schedules of the method.
    - ``before_optimizer_step()``: called after the backward pass of an optimizer step, with unscaled
      gradients (gradient clipping, cancelling a frozen layer's gradients).
    - ``after_optimizer_step(step, total_steps)``: call after every ``optimizer.step()`` with the 0-based
      index of that step and the number of steps of the whole training (momentum / EMA updates, each at its
      official code's point of the schedule; a no-op for SimCLR and SimSiam).
    - ``param_groups(lr, weight_decay)``: optimizer groups; groups flagged ``fix_lr`` must keep their lr
      (``optim.set_lr`` keeps them).
    - ``check_dataset_size(num_rows)``: called by the training loop with the training-set size, before
      training (MoCo warns when its queue is longer than the data; a no-op otherwise).

    A new method is one file with a subclass and a line in ``methods.METHODS``.
    """

    config: MethodOptions

    def __init__(self, config: MethodOptions) -> None:
        super().__init__()
        self.config = config

    def __call__(self, *views: Any, **kwargs: Any) -> Any:
        if len(views) != 1 or not isinstance(views[0], Views):  # method(view1, view2): one crop per tensor
            views = (Views.of(*views),)
        return super().__call__(*views, **kwargs)

    @property
    def localization_encoder(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Nothing changes per epoch (DINO's teacher temperature and last-layer freeze override this)."""

    def before_optimizer_step(self) -> None:
        """Nothing between backward and step (methods that clip or cancel gradients override this)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Nothing to do after the optimizer step (methods with a momentum target override this)."""

    def check_dataset_size(self, num_rows: int) -> bool:
        """True: the method has no requirement on the training-set size (MoCo's queue overrides this)."""
        return True

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One group with every trainable parameter (momentum targets are not trainable)."""
        return [param_group(self, lr, weight_decay)]

    @staticmethod
    def _logs(**values: Tensor) -> dict[str, Tensor]:
        """Detached float scalars, left on the device: reading them is the caller's (one sync per log step)."""
        return {k: v.detach().float() for k, v in values.items()}


class MomentumMethod(SSLMethod):
    """A method with an online encoder and a momentum (EMA) copy of it, the target: MoCo's query and key
    encoders, BYOL's online and target networks. The target starts as an exact copy, never receives
    gradients, and moves toward the online encoder after every optimizer step."""

    # The update after step ``it`` of ``total`` takes the momentum schedule at (it + offset) / total: 1 for
    # BYOL (tau at k / K after k steps) and MoCo v3 (adjust_moco_momentum at the start of the next step);
    # DINO's main_dino.py uses momentum_schedule[it], offset 0.
    momentum_step_offset: int = 1

    def __init__(self, online: Encoder, config: Any) -> None:
        super().__init__(config)
        self.online = online
        self.target = frozen_copy(online)
        self.current_momentum = float(config.momentum)

    @property
    def localization_encoder(self) -> nn.Module:
        return self.online.backbone

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        progress = (step + self.momentum_step_offset) / max(total_steps, 1)
        self.current_momentum = momentum_at(progress, self.config.momentum, self.config.momentum_schedule)
        momentum_update(self.target, self.online, self.current_momentum)

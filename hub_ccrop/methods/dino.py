"""DINO (Caron et al. 2021): self-distillation with no labels, on multi-crop views.

A student (backbone + :class:`DINOHead`) sees every crop; a teacher, the student's EMA, sees the global
crops only. The loss is the cross-entropy between the centred, sharpened teacher distribution of each
global crop and the student distribution of every *other* crop (:func:`dino_loss`). The values and the
order of operations are those of the official code (facebookresearch/dino, ``main_dino.py``,
``vision_transformer.py::DINOHead``, ``utils.py``); docs/PARITY.md names each one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from hub_ccrop.distributed import get_world_size
from hub_ccrop.methods.base import Encoder, MethodOptions, MomentumMethod, MomentumSchedule
from hub_ccrop.methods.losses import mean_cosine
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = [
    "DINO",
    "DINOConfig",
    "DINOHead",
    "WeightNormLinear",
    "cancel_last_layer_gradients",
    "clip_gradients",
    "dino_loss",
    "multi_crop_features",
    "teacher_temperature_at",
    "update_center",
]


@dataclasses.dataclass
class DINOConfig(MethodOptions):
    """DINO options; the defaults are ``main_dino.py``'s argument defaults (the recipes set the README's
    settings, e.g. the teacher temperature 0.04 -> 0.07 over 30 epochs and ``norm_last_layer: false``)."""

    out_dim: int = 65536  # width of the head's output (the distributions' support)
    hidden_dim: int = 2048  # DINOHead: 3 layers, in -> 2048 -> 2048 -> bottleneck
    bottleneck_dim: int = 256  # width before the L2 normalization and the weight-normalized last layer
    use_bn_in_head: bool = False  # BatchNorm after the head's hidden layers
    norm_last_layer: bool = True  # the last layer's weight norm fixed at 1 (false: trained; README's ViT-S setting)
    momentum: float = 0.996  # teacher EMA momentum at the start (momentum_schedule cosine: to 1 at the end)
    momentum_schedule: MomentumSchedule = "cosine"  # constant | cosine
    student_temperature: float = 0.1  # softmax temperature of the student
    teacher_temperature: float = 0.04  # softmax temperature of the teacher after the warm-up
    warmup_teacher_temperature: float = 0.04  # the teacher's temperature in epoch 1, linear to teacher_temperature
    warmup_teacher_temperature_epochs: int = 0  # epochs of that warm-up (0: none)
    center_momentum: float = 0.9  # EMA momentum of the centre subtracted from the teacher's outputs
    clip_grad: float = 3.0  # per-parameter gradient norm; 0 disables clipping
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no update
    global_crops: int = 2  # the teacher's crops: the first ones of the batch (main_dino.py: images[:2])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ValueError(f"option 'center_momentum' must lie in [0, 1], got {self.center_momentum}")
        if self.global_crops < 1:
            raise ValueError(f"option 'global_crops' must be >= 1, got {self.global_crops}")
        for name in ("clip_grad", "freeze_last_layer", "warmup_teacher_temperature_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name!r} must be >= 0, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------------- head
class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(in, out, bias=False))``: row ``i`` of the weight is
    ``weight_g[i] * weight_v[i] / |weight_v[i]|`` (the same parameter names and shapes, so official
    DINO checkpoints load; written out because torch deprecates ``nn.utils.weight_norm``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # nn.Linear's default init for v (DINOHead's trunc-normal init is applied before the last layer
        # exists, so the official v keeps it), and g = 1 (`last_layer.weight_g.data.fill_(1)`).
        self.weight_v = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """``vision_transformer.py::DINOHead``: MLP (GELU, optional BatchNorm) to a bottleneck, L2
    normalization, and a weight-normalized linear layer to ``out_dim`` (``last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int, *, use_bn: bool = False, norm_last_layer: bool = True,
                 num_layers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(num_layers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.extend([nn.BatchNorm1d(d_out)] if use_bn else [])
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():  # DINOHead._init_weights
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


# ------------------------------------------------------------------------------------------------- loss
def teacher_temperature_at(epoch: int, config: DINOConfig) -> float:
    """``DINOLoss.teacher_temp_schedule[epoch]``: ``np.linspace(warmup, final, warmup_epochs)`` over the
    first epochs (both ends included), then the final temperature."""
    warm, final, n = config.warmup_teacher_temperature, config.teacher_temperature, config.warmup_teacher_temperature_epochs
    if epoch >= n:
        return final
    return warm if n == 1 else warm + (final - warm) * epoch / (n - 1)


def dino_loss(student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], center: Tensor,
              student_temperature: float, teacher_temperature: float) -> Tensor:
    """``DINOLoss.forward``: mean over the pairs (teacher crop ``i``, student crop ``v``), ``v != i``, of the
    batch-mean cross-entropy between ``softmax((teacher_i - center) / T_t)`` (no gradient) and
    ``log_softmax(student_v / T_s)``. ``student_out``: one ``[B, K]`` per crop, the global crops first;
    ``teacher_out``: one per global crop. Computed in float32 (float64 inputs stay float64)."""
    dtype = torch.promote_types(student_out[0].dtype, torch.float32)
    with torch.autocast(device_type=center.device.type, enabled=False):
        log_p = F.log_softmax(torch.stack(list(student_out)).to(dtype) / student_temperature, dim=-1)
        q = F.softmax((torch.stack(list(teacher_out)).to(dtype) - center) / teacher_temperature, dim=-1).detach()
        cross = -torch.einsum("tbk,sbk->ts", q, log_p) / q.shape[1]  # [teachers, students], batch means
        pairs = ~torch.eye(*cross.shape, dtype=torch.bool, device=cross.device)  # v == iq: the same view
        return cross[pairs].mean()


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> None:
    """``DINOLoss.update_center``: ``center = m * center + (1 - m) * mean of teacher_out over the global
    batch`` (all processes: summed with an all-reduce), in place."""
    batch_sum = teacher_out.to(center.dtype).sum(dim=0, keepdim=True)
    world = get_world_size()
    if world > 1:
        dist.all_reduce(batch_sum)
    center.mul_(momentum).add_(batch_sum / (teacher_out.shape[0] * world), alpha=1.0 - momentum)


# ----------------------------------------------------------------------------------------- gradient ops
@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], clip: float) -> list[Tensor]:
    """``utils.clip_gradients``: scale each parameter's gradient by ``clip / (|g| + 1e-6)`` when that is
    below 1, parameter by parameter (not the global norm). Returns the gradient norms before clipping;
    no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
    return list(norms)


def cancel_last_layer_gradients(head: DINOHead) -> None:
    """``utils.cancel_gradients_last_layer``: drop the gradients of the head's last layer (``grad = None``,
    so the optimizer skips it entirely: no weight decay, no Adam moments)."""
    for p in head.last_layer.parameters():
        p.grad = None


# ----------------------------------------------------------------------------------------------- method
def multi_crop_features(backbone: nn.Module, crops: Sequence[Tensor]) -> list[Tensor]:
    """``utils.MultiCropWrapper``: one backbone pass per run of consecutive crops of one size (so BatchNorm
    statistics cover all crops of a resolution, as in the official code); features in crop order."""
    runs: list[list[Tensor]] = []
    for crop in crops:
        if runs and runs[-1][0].shape[-2:] == crop.shape[-2:]:
            runs[-1].append(crop)
        else:
            runs.append([crop])
    return [backbone(torch.cat(run)) for run in runs]


class DINO(MomentumMethod):
    """Student ``online`` (backbone + :class:`DINOHead`), teacher ``target`` (its EMA, no gradient).

    ``forward(views)``: every crop through the student (one backbone pass per run of same-size crops, then
    the head on all of them: ``utils.MultiCropWrapper``), the first ``global_crops`` crops through the
    teacher (a recipe may give the two global crops their own view groups, as DINO's asymmetric blur and
    solarization need); the loss uses the previous step's centre, then the centre moves toward this
    step's teacher outputs.
    ``start_epoch`` sets the teacher temperature and the last-layer freeze; ``before_optimizer_step``
    clips and cancels gradients; ``after_optimizer_step`` moves the teacher. Boxes come from the teacher.
    """

    config: DINOConfig

    momentum_step_offset = 0  # main_dino.py: the teacher update after step it uses momentum_schedule[it]

    def __init__(self, backbone: nn.Module, config: DINOConfig | None = None) -> None:
        config = config or DINOConfig()
        head = DINOHead(feature_dim(backbone), config.out_dim, use_bn=config.use_bn_in_head,
                        norm_last_layer=config.norm_last_layer, hidden_dim=config.hidden_dim,
                        bottleneck_dim=config.bottleneck_dim)
        super().__init__(Encoder(backbone, head), config)
        _drop_stochastic_depth(self.target)  # main_dino.py builds the teacher without drop_path_rate
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self.epoch = 0
        self.teacher_temperature = teacher_temperature_at(0, config)

    @property
    def localization_encoder(self) -> nn.Module:
        return self.target.backbone

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch = epoch
        self.teacher_temperature = teacher_temperature_at(epoch, self.config)

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        crops, n_global = views.crops, self.config.global_crops
        if len(crops) < n_global:
            raise ValueError(f"DINO's teacher takes the first {n_global} crops (method.options.global_crops) but "
                             f"the batch has {len(crops)} (views: {views.counts}): add crops to the recipe's views")
        features = torch.cat(multi_crop_features(self.online.backbone, crops))
        student = self.online.head(features).chunk(len(crops))
        with torch.no_grad():  # main_dino.py: teacher(images[:2])
            teacher = self.target(torch.cat(crops[:n_global])).chunk(n_global)
        loss = dino_loss(student, teacher, self.center, self.config.student_temperature, self.teacher_temperature)
        update_center(self.center, torch.cat(teacher), self.config.center_momentum)
        per_crop = features.chunk(len(crops))
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(per_crop[0], per_crop[min(1, len(crops) - 1)]))

    def before_optimizer_step(self) -> None:
        if self.config.clip_grad:
            clip_gradients(self.online.parameters(), self.config.clip_grad)
        if self.epoch < self.config.freeze_last_layer:
            cancel_last_layer_gradients(self.online.head)


def _drop_stochastic_depth(module: nn.Module) -> None:
    """Replace every DropPath (timm's stochastic depth) by the identity: no parameters, same state dict."""
    for name, child in module.named_children():
        if isinstance(child, DropPath):
            setattr(module, name, nn.Identity())
        else:
            _drop_stochastic_depth(child)


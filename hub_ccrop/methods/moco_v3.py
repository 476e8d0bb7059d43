"""MoCo v3 (Chen, Xie & He 2021): query encoder + predictor against a momentum encoder, no queue.

The symmetric InfoNCE uses as negatives the keys of the whole global batch (gathered from every process,
no gradient). On ViTs the official recipe adds a frozen random patch projection and a fixed 2-D sin-cos
position embedding (:func:`init_mocov3_vit`). The values and the order of operations are those of the
official code (facebookresearch/moco-v3: ``moco/builder.py``, ``vits.py``, ``main_moco.py``); docs/PARITY.md
names each one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from hub_ccrop.distributed import all_gather_no_grad, get_rank
from hub_ccrop.methods.base import Encoder, MethodOptions, MomentumMethod, MomentumSchedule, two_crops
from hub_ccrop.methods.losses import mean_cosine
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = ["MoCoV3", "MoCoV3Config", "init_mocov3_vit", "mocov3_loss", "mocov3_mlp", "sincos_position_embedding"]


@dataclasses.dataclass
class MoCoV3Config(MethodOptions):
    """MoCo v3 options; the defaults are ``main_moco.py``'s, with ``--moco-m-cos`` (every setting of its
    CONFIG.md uses it). ViT recipes set ``temperature: 0.2`` (CONFIG.md); ResNet-50 keeps 1.0."""

    temperature: float = 1.0  # softmax temperature; the loss is scaled by 2 T (ViT recipes: 0.2)
    out_dim: int = 256  # --moco-dim: output width of the projector and the predictor
    hidden_dim: int = 4096  # --moco-mlp-dim: hidden width of the projector and the predictor
    momentum: float = 0.99  # momentum encoder's EMA momentum at the start (cosine schedule: to 1 at the end)
    momentum_schedule: MomentumSchedule = "cosine"  # constant | cosine (--moco-m-cos)
    projector_layers: int | None = None  # None: 3 for ViTs (MoCo_ViT), 2 otherwise (MoCo_ResNet)
    predictor_last_bn: bool | None = None  # the predictor's last BatchNorm; None: on for ViTs, off otherwise
    vit_init: bool = True  # ViTs: MoCo v3's init (fixed sin-cos position embedding, xavier); false: as built
    stop_grad_conv1: bool = True  # ViTs with vit_init: the random patch projection stays frozen

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projector_layers is not None and self.projector_layers < 1:
            raise ValueError(f"option 'projector_layers' must be >= 1, got {self.projector_layers}")


# ---------------------------------------------------------------------------------------------- ViT init
def sincos_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """``VisionTransformerMoCo.build_2d_sincos_position_embedding`` without the class-token row: ``[h*w, dim]``
    with ``[sin(r w), cos(r w), sin(c w), cos(c w)]`` for the patch in row ``r``, column ``c``
    (``w = temperature ** (-i / (dim/4))``), from timm's builder."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs an embedding width divisible by 4, got {dim}")
    return build_sincos2d_pos_embed(list(grid), dim, temperature=temperature, interleave_sin_cos=True)


@torch.no_grad()
def init_mocov3_vit(model: VisionTransformer, *, stop_grad_conv1: bool = True) -> VisionTransformer:
    """``vits.py::VisionTransformerMoCo.__init__`` on a timm ``VisionTransformer``, in place.

    Fixed 2-D sin-cos position embedding (zeros for the prefix tokens, not trained); every ``nn.Linear``
    xavier-uniform with zero bias (``qkv`` as three separate ``dim x dim`` matrices); class token normal
    with std 1e-6; patch projection xavier-uniform over ``3 * p * p`` inputs, zero bias, and frozen with
    ``stop_grad_conv1``. Returns ``model``.
    """
    if model.pos_embed is None:
        raise ValueError("MoCo v3's ViT init needs a position embedding (a timm VisionTransformer with pos_embed='learn')")
    grid = tuple(model.patch_embed.grid_size)
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos = sincos_position_embedding(grid, model.embed_dim).to(model.pos_embed)
    pos = torch.cat([pos.new_zeros(prefix, model.embed_dim), pos])[None]
    model.pos_embed = nn.Parameter(pos, requires_grad=False)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # treat the weights of Q, K, V separately
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / float(proj.in_channels * math.prod(proj.kernel_size) + model.embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    if stop_grad_conv1:
        proj.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------- heads, loss
def mocov3_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = True) -> nn.Sequential:
    """``MoCo._build_mlp``: Linear layers without bias; BatchNorm + ReLU after each hidden layer; with
    ``last_bn`` a ``BatchNorm1d(affine=False)`` on the output (SimCLR's design without gamma)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers.extend([nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)])
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def mocov3_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """``MoCo.contrastive_loss``: InfoNCE of the local queries ``q`` against the keys of the global batch
    (``k`` from every process, rank order, no gradient); the positive of query ``i`` on rank ``r`` is key
    ``i + r * n``; scaled by ``2 T``. Computed in float32 (float64 inputs stay float64)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k = all_gather_no_grad(F.normalize(k.detach().to(dtype), dim=1))
        logits = q @ k.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * get_rank()
        return F.cross_entropy(logits, labels) * (2 * temperature)


# ----------------------------------------------------------------------------------------------- method
class MoCoV3(MomentumMethod):
    """Base encoder ``online`` (backbone + projector) and ``predictor``; momentum encoder ``target``.

    ``forward(views)`` takes the two global crops: ``loss(q1, k2) + loss(q2, k1)`` with ``q = predictor(
    online(x))`` and ``k = target(x)`` (each view its own pass, as the official code: BatchNorm statistics
    per view). The momentum update runs after each optimizer step (the official one opens the next
    forward: the same sequence of momentum encoders). Boxes come from the momentum encoder.
    """

    config: MoCoV3Config

    def __init__(self, backbone: nn.Module, config: MoCoV3Config | None = None) -> None:
        config = config or MoCoV3Config()
        vit = isinstance(backbone, VisionTransformer)
        if vit and config.vit_init:
            init_mocov3_vit(backbone, stop_grad_conv1=config.stop_grad_conv1)
        layers = config.projector_layers or (3 if vit else 2)
        last_bn = vit if config.predictor_last_bn is None else config.predictor_last_bn
        dim, hidden, out = feature_dim(backbone), config.hidden_dim, config.out_dim
        super().__init__(Encoder(backbone, mocov3_mlp(layers, dim, hidden, out)), config)
        self.predictor = mocov3_mlp(2, out, hidden, out, last_bn=last_bn)

    @property
    def localization_encoder(self) -> nn.Module:
        return self.target.backbone

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = two_crops(views, "MoCo v3")
        q1, q2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))
        with torch.no_grad():
            k1, k2 = self.target(x1), self.target(x2)
        t = self.config.temperature
        loss = mocov3_loss(q1, k2, t) + mocov3_loss(q2, k1, t)
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(q1, k2))

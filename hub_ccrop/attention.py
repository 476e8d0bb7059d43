"""ViT heatmaps from attention: the CLS token's attention to the patches in the last block.

The patch tokens' L2 norm (the feature-map heatmap of token models) is pulled onto the background by
high-norm artifact tokens (Darcet et al., "Vision Transformers Need Registers"); the attention of the
class token, averaged over heads, is the map DINO shows. It is read during an ordinary forward pass, so
fused attention (``scaled_dot_product_attention``, which never forms the attention matrix) stays on: a
forward pre-hook captures the input of the last block's attention, and the class token's row of the
softmax is recomputed from it (``q`` of one token against every ``k``: ``O(N)`` per head).

The two can disagree: a briefly trained ViT's attention can be inverted (cold on every object) while its
token norm sits on the objects (``benchmarks/README.md``, the DINO ViT study). So both maps come from the
same forward pass (:func:`vit_heatmaps`), and with ``auto`` a localization pass keeps the attention unless
its boxes fail the follow check (:mod:`hub_ccrop.box_follow`), then the map whose boxes follow the content best.

Heatmap sources (a recipe's ``crop.heatmap``): ``cls_attention`` (this module), ``feature_norm`` (the
last feature map: channel sum for CNNs, token L2 norm for ViTs) and ``auto`` (for a ViT with class-token
attention, the attention, or the token norm in a pass where the attention's boxes fail the follow check;
the feature map otherwise).
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import Tensor, nn

from hub_ccrop.choices import HEATMAP_SOURCES

__all__ = ["HEATMAP_SOURCES", "VIT_HEATMAPS", "cls_attention_maps", "heatmap_candidates", "heatmap_source",
           "supports_cls_attention", "vit_heatmaps"]

VIT_HEATMAPS = ("cls_attention", "feature_norm")  # preferred first: the attention, the map DINO shows


def _last_attention(model: nn.Module) -> Attention | None:
    """The last block's timm ``Attention`` of a ViT with a class token (None when there is none)."""
    blocks = getattr(model, "blocks", None)
    if getattr(model, "cls_token", None) is None or not isinstance(blocks, nn.Sequential) or not len(blocks):
        return None
    attn = getattr(blocks[-1], "attn", None)
    return attn if isinstance(attn, Attention) else None


def supports_cls_attention(model: nn.Module) -> bool:
    """True for timm ViTs with a class token whose last block uses timm's ``Attention`` (incl. registers)."""
    return _last_attention(getattr(model, "_orig_mod", model)) is not None


def heatmap_source(model: nn.Module, source: str = "auto") -> str:
    """The concrete source for ``model``: ``"cls_attention"`` or ``"feature_norm"`` (``auto``: attention
    where :func:`supports_cls_attention`). Raises ``ValueError`` for an unknown source or attention on a
    model without it."""
    if source not in HEATMAP_SOURCES:
        raise ValueError(f"heatmap source must be one of {', '.join(HEATMAP_SOURCES)}, got {source!r}")
    supported = supports_cls_attention(model)
    if source == "cls_attention" and not supported:
        raise ValueError(f"heatmap source 'cls_attention' needs a ViT with a class token and timm Attention "
                         f"blocks; {type(model).__name__} has none: use 'feature_norm' (or 'auto')")
    if source == "auto":
        return "cls_attention" if supported else "feature_norm"
    return source


def heatmap_candidates(model: nn.Module, source: str = "auto") -> tuple[str, ...]:
    """The sources a pass may choose between: both ViT maps for ``auto`` on a model with class-token
    attention, the preferred one first (:attr:`hub_ccrop.box_follow.FollowCheck.best`), else ``heatmap_source``'s one."""
    if source == "auto" and supports_cls_attention(model):
        return VIT_HEATMAPS
    return (heatmap_source(model, source),)


@torch.no_grad()
def vit_heatmaps(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """Both heatmaps ``[B, h, w]`` (float32) of a ViT with class-token attention, from one forward pass:
    ``cls_attention`` (the class token's attention to each patch in the last block, mean over heads) and
    ``feature_norm`` (the L2 norm of the last block's patch tokens, before the final norm).

    The softmax runs over every token, as in the model; the prefix tokens' columns (class token and
    registers: ``num_prefix_tokens``) are dropped afterwards, so an attention map need not sum to 1. The
    patch grid follows the input size (``dynamic_img_size`` models).
    """
    model = getattr(model, "_orig_mod", model)
    attn = _last_attention(model)
    if attn is None:
        raise ValueError(f"{type(model).__name__} has no class-token attention to read (see supports_cls_attention)")
    captured: dict[str, Tensor] = {}
    hooks = [attn.register_forward_pre_hook(lambda _module, args: captured.__setitem__("attention_input", args[0])),
             model.blocks[-1].register_forward_hook(lambda _module, _args, out: captured.__setitem__("tokens", out))]
    try:
        model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    x = captured["attention_input"]  # [B, N, C]: the last block's normed tokens, as its attention sees them
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])  # the class token is token 0 in timm
    prefix = model.num_prefix_tokens
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, heads, 1, N]
        probs = logits.softmax(dim=-1)[:, :, 0, prefix:].mean(dim=1)  # [B, patches]
        norms = captured["tokens"][:, prefix:].float().norm(dim=-1)  # [B, patches]
    height, width = _grid(model, images.shape[-2:])
    if probs.shape[1] != height * width:
        raise ValueError(f"{type(model).__name__}: {probs.shape[1]} patch tokens do not form the {height}x{width} grid")
    return {"cls_attention": probs.reshape(batch, height, width), "feature_norm": norms.reshape(batch, height, width)}


def cls_attention_maps(model: nn.Module, images: Tensor) -> Tensor:
    """``[B, h, w]`` float32: the class token's attention to each patch in the last block (:func:`vit_heatmaps`)."""
    return vit_heatmaps(model, images)["cls_attention"]


def _grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    patch_embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size(tuple(size)))
    return tuple(patch_embed.grid_size)

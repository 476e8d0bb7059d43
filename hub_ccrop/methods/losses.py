"""The SSL losses as plain functions. All of them compute in float32, also under bf16/fp16 autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hub_ccrop.distributed import all_gather_with_grad, get_rank, get_world_size

__all__ = ["byol_loss", "info_nce_loss", "mean_cosine", "negative_cosine", "nt_xent_loss"]


def _fp32(x: Tensor) -> torch.autocast:
    """Context that turns autocast off on ``x``'s device (inputs are then cast with ``.float()``)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def nt_xent_loss(
    z1: Tensor, z2: Tensor, temperature: float = 0.5, *, global_negatives: bool = True
) -> Tensor:
    """SimCLR's NT-Xent on two views ``[n, d]`` (not necessarily normalized).

    Each of the 2n local embeddings is an anchor; its positive is the other view of the same image, its
    negatives are the other 2N - 2 embeddings of the global batch (N images over all processes, gathered
    with gradient when ``torch.distributed`` is initialized and ``global_negatives``). Mean over anchors.
    """
    with _fp32(z1):
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        n = z1.shape[0]
        if global_negatives and get_world_size() > 1:
            both = all_gather_with_grad(torch.cat([z1, z2], dim=1))  # one collective for both views
            c1, c2 = both.split(z1.shape[1], dim=1)
            offset = get_rank() * n
        else:
            c1, c2, offset = z1, z2, 0
        total = c1.shape[0]
        logits = torch.cat([z1, z2]) @ torch.cat([c1, c2]).T / temperature  # [2n, 2N]
        idx = torch.arange(n, device=z1.device) + offset
        rows = torch.arange(2 * n, device=z1.device)
        self_cols = torch.cat([idx, idx + total])
        logits = logits.index_put((rows, self_cols), torch.tensor(float("-inf"), device=z1.device))
        positives = torch.cat([idx + total, idx])
        return F.cross_entropy(logits, positives)


def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: query ``q`` ``[n, d]`` against its key ``k`` (positive) and ``queue`` ``[K, d]``
    (negatives, rows L2-normalized). ``q`` and ``k`` are normalized here; keys and queue get no gradient."""
    with _fp32(q):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.detach().float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ queue.detach().float().T
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's loss ``-cos(p, stopgrad(z))``, mean over the batch; -1 when ``p`` and ``z`` align."""
    with _fp32(p):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's loss ``|| p/|p| - z/|z| ||^2 = 2 - 2 cos(p, stopgrad(z))``, mean over the batch; 0 at best."""
    with _fp32(p):
        return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


@torch.no_grad()
def mean_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean cosine similarity of matching rows (for logs; no gradient)."""
    with _fp32(a):
        return F.cosine_similarity(a.float(), b.float(), dim=1).mean()

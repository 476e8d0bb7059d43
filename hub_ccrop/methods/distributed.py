"""The few collectives the SSL methods need; each is a no-op (identity) without ``torch.distributed``.

All of them assume the same per-process batch size on every process (drop the last incomplete batch, or
let accelerate's ``even_batches`` pad it), as ``all_gather`` requires.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "batch_shuffle",
    "batch_unshuffle",
    "get_rank",
    "get_world_size",
    "is_distributed",
]


def is_distributed() -> bool:
    """True inside an initialized process group (any backend)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _gather(x: Tensor) -> list[Tensor]:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x)
    return parts


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums, over processes, the gradients of this process's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.cat(_gather(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every process's loss depends on this process's rows: their gradient is the sum over processes.
        # With DDP averaging the parameter gradients afterwards, the result equals the gradient of the mean
        # of the per-process losses, i.e. of the single-process loss on the global batch.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // get_world_size()
        rank = get_rank()
        return grad[rank * n : (rank + 1) * n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes (rank order) along dim 0, keeping the autograd graph."""
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes (rank order) along dim 0; no gradient."""
    if get_world_size() == 1:
        return x
    return torch.cat(_gather(x))


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle-BN: each process gets a random slice of the global batch.

    Returns this process's shuffled slice and the index that undoes the shuffle (for ``batch_unshuffle``).
    The permutation is drawn on rank 0 and broadcast. Single process: the identity.
    """
    world = get_world_size()
    if world == 1:
        return x, torch.arange(x.shape[0], device=x.device)
    x_all = all_gather_no_grad(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    mine = perm.view(world, -1)[get_rank()]
    return x_all[mine], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Undo ``batch_shuffle``: this process's rows back in their original order."""
    world = get_world_size()
    if world == 1:
        return x
    x_all = all_gather_no_grad(x)
    mine = idx_unshuffle.view(world, -1)[get_rank()]
    return x_all[mine]

"""The few collectives the SSL methods need; each is a no-op (identity) without ``torch.distributed``.

All of them assume the same per-process batch size on every process (drop the last incomplete batch, or
let accelerate's ``even_batches`` pad it), as ``all_gather`` requires.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "CPUSyncBatchNorm",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "batch_shuffle",
    "batch_unshuffle",
    "convert_cpu_sync_bn",
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


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the global batch of all processes, for CPU (gloo) runs.

    ``nn.SyncBatchNorm`` refuses CPU tensors (and DDP refuses it on CPU modules); this one all-gathers the
    per-channel sums with autograd (``all_gather_with_grad``), so forward and backward equal one BatchNorm
    over the concatenated batch. Outside training or without several processes: plain BatchNorm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_full((1,), x.numel() / channels)])
        total = all_gather_with_grad(local[None]).sum(0)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
                self.num_batches_tracked.add_(1)
        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_cpu_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm of ``module`` by a :class:`CPUSyncBatchNorm` with the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        sync = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        return sync
    for name, child in module.named_children():
        setattr(module, name, convert_cpu_sync_bn(child))
    return module

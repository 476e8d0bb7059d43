"""Runs over several processes: the collectives the SSL methods need and the helpers every pass shares.

One notion of "several processes" everywhere: ``get_world_size() > 1``, read from ``torch.distributed``
(accelerate initializes it for every multi-process launch). The collectives are the identity in a single
process; the helpers that go through an ``accelerate.Accelerator`` (``gather_by_id``, ``is_distributed``)
combine results only when one is given. The collectives assume the same per-process batch size on every
process (drop the last incomplete batch, or let accelerate's ``even_batches`` pad it), as ``all_gather``
requires.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from accelerate.state import AcceleratorState, GradientState
from torch import Tensor, nn

__all__ = [
    "CPUSyncBatchNorm",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_with_grad",
    "batch_shuffle",
    "batch_unshuffle",
    "convert_cpu_sync_bn",
    "default_autocast_dtype",
    "gather_by_id",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_main_process",
    "set_loader_epoch",
]


def get_world_size() -> int:
    """Processes in the initialized process group (any backend); 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if get_world_size() > 1 else 0


def is_distributed(accelerator: Any) -> bool:
    """True when work done through ``accelerator`` (an ``accelerate.Accelerator`` or None) must be combined
    over several processes."""
    return accelerator is not None and get_world_size() > 1


def is_main_process(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def set_loader_epoch(loader: Iterable, epoch: int) -> None:
    """Reshuffle distributed/accelerate loaders per epoch (no-op for plain loaders)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def default_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else ``None`` (no autocast)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def gather_by_id(ids: Tensor, *values: Tensor, accelerator: Any = None) -> tuple[Tensor, ...]:
    """Gather per-process rows over all processes; return ``(ids, *values)`` on CPU sorted by id.

    Rows are matched by id, never by order: shards may be uneven and ``accelerate`` pads the last
    batches with repeated samples; one row per id is kept (the first occurrence).
    """
    if is_distributed(accelerator):
        device = accelerator.device
        ids = accelerator.pad_across_processes(ids.to(device), dim=0, pad_index=-1)
        values = tuple(accelerator.pad_across_processes(v.to(device), dim=0, pad_index=0) for v in values)
        ids, *gathered = accelerator.gather((ids, *values))
        keep = ids >= 0
        ids, values = ids[keep], tuple(v[keep] for v in gathered)
    ids, order = torch.sort(ids.cpu(), stable=True)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ids[1:] != ids[:-1]
    return (ids[keep], *(v.cpu()[order][keep] for v in values))


# ------------------------------------------------------------------------------ collectives of the methods
def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes (rank order) along dim 0, keeping the autograd graph.

    The backward of ``torch.distributed.nn.functional.all_gather`` sums, over processes, the gradients of
    this process's rows (every process's loss depends on them). With DDP averaging the parameter gradients
    afterwards, the result equals the gradient of the single-process loss on the global batch.
    """
    if get_world_size() == 1:
        return x
    return torch.cat(dist_autograd.all_gather(x.contiguous()))


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over all processes, keeping the autograd graph.

    The backward of ``torch.distributed.nn.functional.all_reduce`` sums the incoming gradients over processes
    (every process's loss depends on every addend); a plain ``dist.all_reduce`` has none, so under DDP's
    averaging the gradient comes out ``1 / world_size`` too small (the bug of lightly issue 1977).
    """
    if get_world_size() == 1:
        return x
    return dist_autograd.all_reduce(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all processes (rank order) along dim 0; no gradient."""
    if get_world_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


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


def release_accelerate_state() -> None:
    """Forget accelerate's process-wide mixed-precision/gradient state (the process group stays), so the
    next ``Accelerator`` in this process (a training run after an eval, in a notebook or a test) can pick
    its own settings instead of failing."""
    AcceleratorState._reset_state()
    GradientState._reset_state()

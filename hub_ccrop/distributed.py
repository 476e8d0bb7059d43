"""Small helpers for runs over several processes (and the device choices every pass makes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["default_autocast_dtype", "gather_by_id", "is_distributed"]


def is_distributed(accelerator: Any) -> bool:
    """True when ``accelerator`` (an ``accelerate.Accelerator`` or None) spans several processes."""
    return accelerator is not None and accelerator.num_processes > 1


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


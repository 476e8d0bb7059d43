"""One process of the 2-process check in test_barlow_vicreg.py (CPU, gloo).

The test forks both processes from its own (``run``: no interpreter start, no imports: a few seconds).
By hand: python -m torch.distributed.run --nproc_per_node 2 tests/_barlow_vicreg_worker.py WORKDIR
Reads WORKDIR/inputs.pt (the global batch, written by the test), runs one DDP forward/backward of each
method on this process's half of the batch, with the project's reductions and with reductions that have
no backward (a plain ``all_reduce`` / ``all_gather``: the lightly bug; and Barlow Twins' official form,
where only ``C`` is summed so), and writes WORKDIR/rank{RANK}.pt.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from hub_ccrop.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_with_grad,
    convert_cpu_sync_bn,
)
from hub_ccrop.methods import build_method, redundancy
from hub_ccrop.models import create_backbone

METHODS = ("barlow_twins", "vicreg")
PROJECTOR = [48, 48, 32]  # small expander: the reductions do not depend on its width


def build(name: str) -> torch.nn.Module:
    """The method as the test builds it (same seed; the callers turn it to float64). No zero-init of the
    blocks' last BatchNorm: every parameter then gets a gradient to compare."""
    torch.manual_seed(0)
    return build_method(name, create_backbone("resnet_tiny_cifar", zero_init_last=False), projector=PROJECTOR)


def all_reduce_without_backward(x: Tensor) -> Tensor:
    """The sum over processes in the forward; in the backward only this process's addend, as a plain
    ``dist.all_reduce`` on a tensor of the graph (official main.py, lightly before PR 1980)."""
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def official_barlow_all_reduce(x: Tensor) -> Tensor:
    """main.py's form: the standardization keeps its backward (its SyncBN), ``C`` (the one square
    reduction) is summed by a plain ``all_reduce``."""
    return all_reduce_without_backward(x) if x.shape[0] == x.shape[-1] else all_reduce_with_grad(x)


def all_gather_without_backward(x: Tensor) -> Tensor:
    """Every process's rows; gradient only through this process's own rows (a plain ``all_gather``)."""
    parts = list(all_gather_no_grad(x).chunk(dist.get_world_size()))
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def one_step(name: str, inputs: dict, rank: int, world: int) -> dict:
    """DDP forward/backward on this process's rows; BatchNorm statistics over the global batch (CPU SyncBN,
    the recipes' ``model.sync_bn``), so that everything but the reductions under test is exact."""
    method = convert_cpu_sync_bn(build(name)).double()
    model = DDP(method)
    n = inputs["v1"].shape[0] // world
    v1, v2 = (inputs[k][rank * n : (rank + 1) * n] for k in ("v1", "v2"))
    loss, logs = model(v1, v2)
    loss.backward()
    return {"loss": loss.item(), "logs": {k: v.item() for k, v in logs.items()},
            "grads": {k: p.grad.clone() for k, p in method.named_parameters()}}


def with_reductions(reduce: Callable[[Tensor], Tensor], gather: Callable[[Tensor], Tensor], fn: Callable[[], dict]) -> dict:
    """``fn()`` with the losses' reductions replaced (the names the loss functions look up at call time)."""
    saved = redundancy.all_reduce_with_grad, redundancy.all_gather_with_grad
    redundancy.all_reduce_with_grad, redundancy.all_gather_with_grad = reduce, gather
    try:
        return fn()
    finally:
        redundancy.all_reduce_with_grad, redundancy.all_gather_with_grad = saved


def run(workdir: Path, rank: int, world: int, init_method: str = "env://") -> None:
    """Join the process group, run every check, write WORKDIR/rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    inputs = torch.load(workdir / "inputs.pt")
    results = {name: one_step(name, inputs, rank, world) for name in METHODS}
    for name in METHODS:
        results[f"{name}_without_backward"] = with_reductions(
            all_reduce_without_backward, all_gather_without_backward, lambda name=name: one_step(name, inputs, rank, world))
    results["barlow_twins_official"] = with_reductions(
        official_barlow_all_reduce, all_gather_with_grad, lambda: one_step("barlow_twins", inputs, rank, world))
    torch.save(results, workdir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))

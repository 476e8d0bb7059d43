"""One process of the 2-process (gloo, CPU) checks in test_distributed.py: one launch for all of them, as
each fresh interpreter costs seconds of imports.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/_two_process_worker.py WORKDIR TRAIN_ARGS...
Reads WORKDIR/inputs.pt (written by the test), writes WORKDIR/rank{RANK}.pt, then trains as
``python -m hub_ccrop train TRAIN_ARGS...`` would in the same launch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from test_evaluate import color_images, loader_of, tiny_cnn
from torch.nn.parallel import DistributedDataParallel as DDP

from hub_ccrop.cli import main as cli_main
from hub_ccrop.distributed import gather_by_id
from hub_ccrop.evaluate import knn_evaluate, linear_probe
from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone

# Options of the one-step DDP check, shared with its single-process reference in test_distributed.py.
# MoCo without shuffle-BN (its random permutation is checked by moco_queue) so that each rank's loss
# depends on its own images only, as in the reference.
DDP_STEP_OPTIONS = {"moco_v1": {"queue_size": 16, "shuffle_bn": False, "split_bn": 1}, "byol": {}, "simsiam": {}}


def ddp_step_views(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)


def local_slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = x.shape[0] // world
    return x[rank * n : (rank + 1) * n]


def simclr_split_batch(inputs: dict, rank: int, world: int) -> dict:
    """SimCLR on this process's half of the batch, wrapped in DDP as accelerate does."""
    method = build_method("simclr", create_backbone("resnet_tiny_cifar"))
    method.load_state_dict(inputs["simclr_state"])
    method.eval()  # BatchNorm from running statistics: features depend on each image only
    model = DDP(method)
    v1, v2 = (local_slice(inputs[k], rank, world) for k in ("v1", "v2"))
    loss, logs = model(v1, v2)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = {name: p.grad.clone() for name, p in method.named_parameters()}
    return {"loss": loss.item(), "mean_loss": mean_loss.item(), "grads": grads, "logs": logs}


def moco_queue(inputs: dict, rank: int, world: int) -> dict:
    """MoCo v2 with shuffle-BN under DDP: the queue holds the keys of the global batch in rank order."""
    torch.manual_seed(0)  # same initialization on every process (DDP would broadcast it anyway)
    method = build_method("moco_v2", create_backbone("resnet_tiny_cifar"), queue_size=20, shuffle_bn=True)
    model = DDP(method)
    optimizer = torch.optim.SGD(method.param_groups(0.1, 0.0), lr=0.1)
    placed_ok = []
    queues, ptrs = [], []
    for step in range(5):
        method.train(step >= 3)  # eval first: keys depend on each image only, so they can be checked
        g = torch.Generator().manual_seed(100 * step + rank)
        v1, v2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
        ptr_before = int(method.queue_ptr)
        with torch.no_grad():
            k_direct = F.normalize(method.target(v2), dim=1)
        loss, _ = model(v1, v2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step, 5)
        if step < 3:
            parts = [torch.empty_like(k_direct) for _ in range(world)]
            dist.all_gather(parts, k_direct)
            expected = torch.cat(parts)
            idx = (ptr_before + torch.arange(expected.shape[0])) % method.queue.shape[0]
            placed_ok.append(bool(torch.allclose(method.queue[idx], expected, atol=1e-5)))
        queues.append(method.queue.clone())
        ptrs.append(int(method.queue_ptr))
    return {"placed_ok": placed_ok, "queues": queues, "ptrs": ptrs}


def every_method_one_ddp_step(rank: int) -> dict:
    """One DDP training step of each method: no hang, no unused parameters, identical grads on all ranks."""
    out = {}
    for name, cfg in DDP_STEP_OPTIONS.items():
        torch.manual_seed(0)
        method = build_method(name, create_backbone("resnet_tiny_cifar"), **cfg)
        model = DDP(method)
        loss, _ = model(*ddp_step_views(rank))
        loss.backward()
        method.after_optimizer_step(0, 2)
        out[name] = torch.cat([p.grad.flatten() for p in method.parameters() if p.requires_grad])
    return out


def gather_uneven_shards(acc: Accelerator) -> dict:
    """Uneven shards with a padded duplicate (id 4 on both ranks), gathered by id."""
    shards = {0: torch.tensor([4, 0, 2]), 1: torch.tensor([3, 1, 4, 5, 6])}
    ids = shards[acc.process_index]
    ids_out, feats_out, labels_out = gather_by_id(ids, ids[:, None].float().repeat(1, 3), ids % 2, accelerator=acc)
    return {"ids": ids_out, "feats": feats_out, "labels": labels_out}


def sharded_evaluation(acc: Accelerator) -> dict:
    """kNN and the linear probe on sharded loaders, and the single-process kNN on the whole data."""
    torch.manual_seed(0)
    model = tiny_cnn()
    train_x, train_y = color_images(40)
    test_x, test_y = color_images(22, seed=1)  # 22 rows over 2 processes x batch 4: padded duplicates
    single = knn_evaluate(model, loader_of(train_x, train_y, 4), loader_of(test_x, test_y, 4), progress=False)
    train_loader, test_loader = acc.prepare(loader_of(train_x, train_y, 4), loader_of(test_x, test_y, 4))
    sharded = knn_evaluate(model, train_loader, test_loader, accelerator=acc, progress=False)
    probe = linear_probe(model, train_loader, test_loader, num_classes=2, epochs=2, lr=1.0, accelerator=acc,
                         progress=False)
    return {"knn_single": single, "knn_sharded": sharded, "probe_histories": gather_object([probe["history"]]),
            "probe_num_test": probe["num_test"]}


def main() -> int:
    workdir, train_args = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)  # joins the gloo process group that accelerate launch set up
    rank, world = acc.process_index, acc.num_processes
    inputs = torch.load(workdir / "inputs.pt")
    results = {
        "simclr": simclr_split_batch(inputs, rank, world),
        "moco": moco_queue(inputs, rank, world),
        "ddp_step": every_method_one_ddp_step(rank),
        "gather": gather_uneven_shards(acc),
        "evaluation": sharded_evaluation(acc),
    }
    torch.save(results, workdir / f"rank{rank}.pt")
    return cli_main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())

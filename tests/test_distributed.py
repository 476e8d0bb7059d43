"""Two CPU processes (gloo), one launch: SimCLR's global-batch loss/gradients, MoCo's queue across ranks, DDP
steps of every method, the gather by id, and kNN / linear probe on sharded loaders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone

sys.path.insert(0, str(Path(__file__).parent))
from _two_process_worker import DDP_STEP_OPTIONS, ddp_step_views  # noqa: E402

WORLD = 2
WORKER = Path(__file__).with_name("_two_process_worker.py")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run both ranks once; return the single-process reference and each rank's results."""
    workdir = tmp_path_factory.mktemp("dist_methods")
    torch.manual_seed(0)
    reference = build_method("simclr", create_backbone("resnet_tiny_cifar"))
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    torch.save({"simclr_state": reference.state_dict(), "v1": v1, "v2": v2}, workdir / "inputs.pt")

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        ACCELERATE_USE_CPU="1",
        ACCELERATE_DEBUG_MODE="true",  # accelerate checks that the gathered shapes agree across ranks
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(workdir)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=False)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out}"

    # single process, whole batch
    reference.eval()
    loss, logs = reference(v1, v2)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    ranks = [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD)]
    return {"loss": loss.item(), "logs": logs, "grads": grads, "ranks": ranks}


def test_simclr_split_batch_equals_single_process(runs: dict) -> None:
    simclr = [r["simclr"] for r in runs["ranks"]]
    assert simclr[0]["loss"] != pytest.approx(simclr[1]["loss"])  # each rank has its own anchors
    for result in simclr:
        assert result["mean_loss"] == pytest.approx(runs["loss"], rel=1e-5)
        assert result["grads"].keys() == runs["grads"].keys()
        for name, grad in runs["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_moco_queue_is_consistent_across_ranks(runs: dict) -> None:
    moco = [r["moco"] for r in runs["ranks"]]
    for result in moco:
        # global batch of 8 keys per step, rank 0's then rank 1's, at the pointer, wrapping around 20
        assert result["placed_ok"] == [True, True, True]
        assert result["ptrs"] == [8, 16, 4, 12, 0]
    for q0, q1 in zip(moco[0]["queues"], moco[1]["queues"], strict=True):
        assert torch.equal(q0, q1)


def test_every_method_trains_under_ddp(runs: dict) -> None:
    """DDP's gradient of one step equals the single-process reference: the mean over ranks of the gradient
    of each rank's own loss (BatchNorm statistics per process, as DDP without SyncBN computes them)."""
    steps = [r["ddp_step"] for r in runs["ranks"]]
    for name, cfg in DDP_STEP_OPTIONS.items():
        torch.testing.assert_close(steps[0][name], steps[1][name])
        grads = []
        for rank in range(WORLD):
            torch.manual_seed(0)  # the workers' initialization
            method = build_method(name, create_backbone("resnet_tiny_cifar"), **cfg)
            loss, _ = method(*ddp_step_views(rank))
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in method.parameters() if p.requires_grad]))
        torch.testing.assert_close(steps[0][name], torch.stack(grads).mean(0), rtol=1e-4, atol=1e-6, msg=name)


def test_gather_by_id_across_processes(runs: dict) -> None:
    """Uneven shards with a padded duplicate: every rank gets each id once, in id order, with its rows."""
    for result in (r["gather"] for r in runs["ranks"]):
        assert result["ids"].tolist() == list(range(7))
        assert torch.equal(result["feats"], torch.arange(7).float()[:, None].repeat(1, 3))
        assert torch.equal(result["labels"], torch.arange(7) % 2)


def test_sharded_knn_and_linear_probe_equal_single_process(runs: dict) -> None:
    for result in (r["evaluation"] for r in runs["ranks"]):
        assert result["knn_sharded"] == result["knn_single"]  # padded duplicates dropped before voting
        histories = result["probe_histories"]
        assert len(histories) == WORLD and histories[0] == histories[1]  # gradients averaged: identical heads
        assert result["probe_num_test"] == 22

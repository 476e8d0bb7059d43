"""Two CPU processes (gloo), one launch: SimCLR's global-batch loss/gradients, MoCo's queue across ranks, DDP
steps of every method, the gather by id, kNN / linear probe on sharded loaders, and a training run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from hub_ccrop.box_follow import FollowCheck
from hub_ccrop.boxes import BoxTable
from hub_ccrop.data import get_spec, load_images
from hub_ccrop.localize import localize_boxes
from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone
from hub_ccrop.recipe import load_recipe
from hub_ccrop.synthetic import small_objects_dir
from hub_ccrop.views import EvalCollate

sys.path.insert(0, str(Path(__file__).parent))
from _two_process_worker import DDP_STEP_OPTIONS, ddp_step_views  # noqa: E402

WORLD = 2
WORKER = Path(__file__).with_name("_two_process_worker.py")
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One ``accelerate launch`` of both ranks for every check in this file (each fresh interpreter costs
    seconds of imports): the unit checks, then a 2-epoch training run. Returns the single-process
    reference, each rank's results, the run folder and the launch's output."""
    workdir = tmp_path_factory.mktemp("two_processes")
    torch.manual_seed(0)
    reference = build_method("simclr", create_backbone("resnet_tiny_cifar"))
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    torch.save({"simclr_state": reference.state_dict(), "v1": v1, "v2": v2}, workdir / "inputs.pt")
    objects = small_objects_dir(workdir / "objects", train=96, test=32)
    run_dir = workdir / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(WORKER), str(workdir),
           str(QUICKSTART), "--output-dir", str(run_dir)]
    for item in [f"data.data_dir={objects}", "data.batch_size=32", "data.num_workers=0", "train.epochs=2",
                 "crop.warmup_epochs=1", "crop.loc_epochs=[2]", "train.knn_every=2", "train.knn_k=20",
                 "data.image_size=32", "train.show_images=0"]:
        cmd += ["--set", item]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        ACCELERATE_USE_CPU="1",
        ACCELERATE_DEBUG_MODE="true",  # accelerate checks that the gathered shapes agree across ranks
        GLOO_SOCKET_IFNAME="lo",
    )
    launch = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert launch.returncode == 0, launch.stderr[-3000:]

    # single process, whole batch
    reference.eval()
    loss, logs = reference(v1, v2)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    ranks = [torch.load(workdir / f"rank{rank}.pt") for rank in range(WORLD)]
    return {"loss": loss.item(), "logs": logs, "grads": grads, "ranks": ranks, "run_dir": run_dir,
            "objects": objects, "log": launch.stdout + launch.stderr}


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


def test_training_with_two_processes_matches_one(runs: dict, one_thread) -> None:
    """The pass gathers by id; both ranks hold the same table (checked in the loop); and the saved boxes
    equal a single-process pass with the same weights."""
    out = runs["run_dir"]
    assert "2 process(es)" in runs["log"]
    saved = BoxTable.load(out / "boxes" / "epoch_0002.parquet")
    size = json.loads((out / "run.json").read_text())["input_size"][-1]  # the recipe's data.image_size
    spec = get_spec("small_objects", data_dir=str(runs["objects"]), image_size=size)
    backbone = create_backbone("resnet_tiny_cifar")
    backbone.load_state_dict(load_file(out / "backbone.safetensors"))
    # Same per-process localization batches (default global 2 x data.batch_size = 64 = 2 processes x 32) and
    # one thread, as in the launched run: the same float sums.
    loader = torch.utils.data.DataLoader(load_images(spec), batch_size=32, collate_fn=EvalCollate(spec, purpose="localize"))
    follow = FollowCheck(images=96)
    ids, boxes = localize_boxes(backbone, loader, k=load_recipe(QUICKSTART).crop.k, progress=False, follow=follow)
    assert torch.equal(ids, torch.arange(96))
    assert torch.equal(boxes, saved.boxes)
    # the follow check's sums are reduced over the processes: each checked its 48 images, together all 96
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["box_follow"] for h in history if "box_follow" in h] == [pytest.approx(follow.score(), abs=1e-9)]

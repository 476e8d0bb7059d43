"""A failure ends the process (issue 24): an exception in the kNN monitor, a localization pass or a DataLoader
worker, with persistent workers alive, exits within seconds with the error; it used to hang in
multiprocessing's exit handler, joining workers that ignored its SIGTERM (hub_ccrop/data/workers.py)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Runs `hub-ccrop train` with one failure injected at the point named by argv[1].
INJECT = """
import atexit
import os
import sys
import time
import torch
import hub_ccrop.training.loop as loop
import hub_ccrop.training.monitors as monitors
from hub_ccrop.views import ViewCollate

where = sys.argv[1]
failing = os.environ.get("RANK", "0") == os.environ.get("FAILING_RANK", os.environ.get("RANK", "0"))

def fail(*args, **kwargs):
    raise RuntimeError(f"injected failure in {where}")

if failing and where == "knn":
    loop.knn_monitor = fail
elif failing and where == "localization":
    monitors.localize_boxes = fail
elif failing:  # a DataLoader worker (forked after the patch): its first batch fails
    collate = ViewCollate.__call__
    ViewCollate.__call__ = lambda self, rows: (
        fail() if torch.utils.data.get_worker_info() is not None else collate(self, rows))
if failing and os.environ.get("HANG_AT_EXIT"):  # a failing process whose exit hangs, its sockets open
    atexit.register(time.sleep, float(os.environ["HANG_AT_EXIT"]))
from hub_ccrop.cli import main
sys.exit(main(sys.argv[2:]))
"""
TRAIN_ARGS = ["data.image_size=16", "data.batch_size=8", "data.num_workers=2", "train.epochs=2",
              "crop.warmup_epochs=1", "crop.loc_interval=1", "train.knn_every=1", "train.knn_k=5",
              "train.show_images=0"]


@pytest.fixture(scope="module")
def labeled_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    for k in range(20):
        path = root / ("cat", "dog")[k % 2] / f"{k:02d}.png"
        path.parent.mkdir(exist_ok=True)
        buf = io.BytesIO()
        Image.new("RGB", (20, 16), (10 * k, 80, 160)).save(buf, "PNG")
        path.write_bytes(buf.getvalue())
    return root


def run_failing(where: str, data: Path, out: Path) -> tuple[int, float, str]:
    """The return code, the seconds from the error's last line to the exit, and stderr."""
    argv = ["train", str(REPO / "recipes" / "quickstart.yaml"), "--output-dir", str(out)]
    for item in (f"data.dataset={data}", *TRAIN_ARGS):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return watch(subprocess.Popen([sys.executable, "-c", INJECT, where, *argv], stderr=subprocess.PIPE, text=True,
                                  env=env))


def watch(proc: subprocess.Popen) -> tuple[int, float, str]:
    """``proc``'s return code, the seconds from the injected error's last line to its exit, and stderr."""
    lines, deadline = [], time.monotonic() + 600
    try:
        for line in proc.stderr:  # until the traceback's last line: the injected error
            lines.append(line)
            if "RuntimeError: injected failure" in line or time.monotonic() > deadline:
                break
        seen = time.monotonic()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            return -1, float("inf"), "".join(lines)  # hung
        return proc.returncode, time.monotonic() - seen, "".join(lines) + proc.stderr.read()
    finally:
        if proc.poll() is None:  # still hung: do not leave it (and its workers) behind
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("where", ["knn", pytest.param("localization", marks=pytest.mark.slow),
                                   pytest.param("worker", marks=pytest.mark.slow)])
def test_a_failure_with_persistent_workers_exits_promptly(where, labeled_folder, tmp_path):
    code, seconds, err = run_failing(where, labeled_folder, tmp_path / "run")
    assert f"RuntimeError: injected failure in {where}" in err, err[-3000:]
    assert code == 1 and seconds < 15, (code, seconds, err[-2000:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three 2-process launches: about 20 s each on a busy machine
@pytest.mark.parametrize("where", ["knn", "localization", "worker"])
def test_a_failure_in_one_of_two_processes_ends_both_promptly(where, labeled_folder, tmp_path):
    """Process 1 fails and its exit then hangs with its sockets open (as a flushing tracker or a stuck
    thread would): process 0, blocked in a collective waiting for it, used to wait for gloo's 30-minute
    timeout (NCCL: forever). Now it reads the failure from the launch's store and exits: the launcher
    ends the run, non-zero, within seconds."""
    script = tmp_path / "inject.py"  # accelerate launch runs a script file, not -c
    script.write_text(INJECT)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), where, "train",
            str(REPO / "recipes" / "quickstart.yaml"), "--output-dir", str(tmp_path / "run")]
    for item in (f"data.dataset={labeled_folder}", *TRAIN_ARGS):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "GLOO_SOCKET_IFNAME": "lo", "FAILING_RANK": "1", "HANG_AT_EXIT": "300"}
    code, seconds, err = watch(subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env))
    assert f"RuntimeError: injected failure in {where}" in err, err[-3000:]
    stopping = [line for line in err.splitlines() if line.startswith("rank 0: stopping because process 1 failed:")]
    assert len(stopping) == 1 and f"injected failure in {where}" in stopping[0], err[-3000:]
    assert code != 0 and seconds < 30, (code, seconds, err[-2000:])



def test_the_watch_ends_this_process_on_a_peers_post_but_not_on_its_own_failure(monkeypatch):
    """The watch of two processes over one store, without a launch (the 2-process test above is slow)."""
    import torch.distributed as dist

    from hub_ccrop.training import peers

    monkeypatch.setattr(peers, "POLL_S", 0.02)
    monkeypatch.setattr(peers, "GRACE_S", 0.2)
    store, ended = dist.HashStore(), []
    watches = [peers.PeerFailureWatch(store, rank, run=0, on_peer_failure=lambda *a: ended.append(a)) for rank in (0, 1)]
    for watch in watches:
        watch.start()
    worker_error = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nTraceback (most recent call "
                                "last):\n  ...\nRuntimeError: injected failure in worker\n")
    watches[1].post(worker_error)
    watches[0]._thread.join(timeout=10)
    assert ended == [(0, "process 1 failed: RuntimeError: Caught RuntimeError in DataLoader worker process 0. ... "
                         "RuntimeError: injected failure in worker")]

    ended.clear()  # both fail at once: each reports its own error, neither is cut short by the other's post
    monkeypatch.setattr(peers, "GRACE_S", 10.0)  # (long: a busy machine may pause the main thread)
    watches = [peers.PeerFailureWatch(store, rank, run=1, on_peer_failure=lambda *a: ended.append(a)) for rank in (0, 1)]
    for watch in watches:
        watch.start()
    watches[1].post(ValueError("bad"))
    time.sleep(0.05)  # process 0 sees the post, then fails itself within the grace period
    watches[0].post(ValueError("bad"))
    for watch in watches:
        watch._thread.join(timeout=10)
    assert ended == []

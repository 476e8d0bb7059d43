"""A failure ends the process (issue 24): an exception in the kNN monitor, a localization pass or a DataLoader
worker, with persistent workers alive, exits within seconds with the error; it used to hang in
multiprocessing's exit handler, joining workers that ignored its SIGTERM (hub_ccrop/data/workers.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Runs `hub-ccrop train` with one failure injected at the point named by argv[1].
INJECT = """
import sys
import torch
import hub_ccrop.training.loop as loop
import hub_ccrop.training.monitors as monitors
from hub_ccrop.views import ViewCollate

where = sys.argv[1]

def fail(*args, **kwargs):
    raise RuntimeError(f"injected failure in {where}")

if where == "knn":
    loop.knn_monitor = fail
elif where == "localization":
    monitors.localize_boxes = fail
else:  # a DataLoader worker (forked after the patch): its first batch fails
    collate = ViewCollate.__call__
    ViewCollate.__call__ = lambda self, rows: (
        fail() if torch.utils.data.get_worker_info() is not None else collate(self, rows))
from hub_ccrop.cli import main
sys.exit(main(sys.argv[2:]))
"""


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
    for item in (f"data.dataset={data}", "data.image_size=16", "data.batch_size=8", "data.num_workers=2",
                 "train.epochs=2", "crop.warmup_epochs=1", "crop.loc_interval=1", "train.knn_every=1",
                 "train.knn_k=5", "train.show_images=0"):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", INJECT, where, *argv], stderr=subprocess.PIPE, text=True, env=env)
    lines, deadline = [], time.monotonic() + 600
    try:
        for line in proc.stderr:  # until the traceback's last line: the injected error
            lines.append(line)
            if line.startswith("RuntimeError: injected failure") or time.monotonic() > deadline:
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

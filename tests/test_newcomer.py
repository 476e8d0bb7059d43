"""A newcomer on a fresh clone, with nothing beside it (no ../shared), no network, a fresh cache: the README's
commands, in the README's order, and what the newcomer should see at each step (issue 15)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Shortens the quickstart for a test (same recipe, same commands): 512 images, 2 epochs, kNN on 256.
SHORT = ["train.epochs=2", "crop.warmup_epochs=1", "crop.loc_interval=1", "data.splits=['train[:512]']",
         "data.train_split=train[:512]", "data.test_split=test[:256]", "data.batch_size=64", "train.knn_every=2",
         "train.checkpoint_every_steps=1"]


def readme_commands(readme: str) -> list[str]:
    """The ``hub-ccrop`` lines of the README's bash blocks, without their comments, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("hub-ccrop"):
                commands.append(line)
    return commands


class Newcomer:
    """Runs commands in the clone as a user would: ``hub-ccrop`` is the clone's package, offline."""

    def __init__(self, clone: Path, home: Path) -> None:
        self.clone = clone
        self.env = {**os.environ, "PYTHONPATH": str(clone), "HUB_CCROP_CACHE": str(home / "cache"),
                    "HUB_CCROP_SHARED": str(home / "no_shared"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1"}

    def argv(self, command: str, extra: list[str] = ()) -> list[str]:
        words = shlex.split(command)
        assert words[0] == "hub-ccrop", command
        return [sys.executable, "-m", "hub_ccrop.cli", *words[1:], *(a for item in extra for a in ("--set", item))]

    def run(self, command: str, extra: list[str] = (), expect: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(command, extra), cwd=self.clone, env=self.env, capture_output=True,
                                text=True, timeout=1800)
        assert result.returncode == expect, f"{command}: {result.returncode}\n{result.stderr[-3000:]}"
        return result

    def interrupt(self, command: str, extra: list[str], when: Path) -> subprocess.CompletedProcess:
        """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once ``when`` exists."""
        proc = subprocess.Popen(self.argv(command, extra), cwd=self.clone, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 1800
        while not when.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_readme_on_a_fresh_clone_without_shared(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "clone" / "hub_ccrop"  # nothing beside it: no ../shared
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    assert not (clone.parent / "shared").exists()
    user = Newcomer(clone, tmp_path)

    # 3. The README stands alone: no ../shared, its links exist, --help cites no missing file.
    readme = (clone / "README.md").read_text()
    assert "../shared" not in readme and "DESIGN.md" not in readme
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (clone / link).exists(), f"README links to {link}, which a clone does not have"
    assert "source .venv/bin/activate" in readme and "~/.cache/hub_ccrop" in readme
    assert re.search(r"chance:? 10%", readme)  # the quickstart's expected numbers come with the chance level
    assert "DESIGN.md" not in user.run("hub-ccrop train --help").stdout
    commands = readme_commands(readme)
    quickstart, resume, show, cifar, knn, export = (
        next(c for c in commands if c.startswith(prefix)) for prefix in (
            "hub-ccrop train recipes/quickstart.yaml", "hub-ccrop train recipes/quickstart.yaml --output-dir",
            "hub-ccrop show runs/", "hub-ccrop train recipes/simclr_cifar10", "hub-ccrop eval knn", "hub-ccrop export"))
    assert quickstart == "hub-ccrop train recipes/quickstart.yaml" and resume.endswith("--resume")

    # 2. `hub-ccrop` alone lists the commands; a typo is one line with the fix, before any data or folder.
    listing = user.run(commands[0]).stdout
    assert commands[0] == "hub-ccrop" and all(f"    {c} " in listing for c in ("train", "show", "eval", "export"))
    typo = one_error_line(user.run(quickstart, ["model.name=resnet_tny_cifar"], expect=2))
    assert "did you mean resnet_tiny_cifar" in typo and not (clone / "runs").exists()
    # The CIFAR-10 example without the download the README asks for first: one line naming the folder.
    missing = one_error_line(user.run(cifar, expect=2))
    assert "data.data_dir: folder data/cifar10 does not exist" in missing and not (clone / "runs").exists()

    # 1. Ctrl-C during the quickstart: a checkpoint, one line with the resume command, exit 130; resume ends it.
    run_dir = clone / "runs" / "quickstart"
    stopped = user.interrupt(quickstart, SHORT, when=run_dir / "checkpoints" / "checkpoint_000000002")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    line = [x for x in stopped.stderr.splitlines() if x.startswith("interrupted (SIGINT): saved runs/quickstart/")]
    assert len(line) == 1 and line[0].endswith("--output-dir runs/quickstart --resume")
    finished = user.run(resume, SHORT)  # the README's resume command
    summary = finished.stdout + finished.stderr
    assert "resumed from runs/quickstart/checkpoints/checkpoint_" in summary and "kNN top-1" in summary
    assert (run_dir / "backbone.safetensors").is_file() and not (run_dir / "skipped.json").exists()

    # The rest of the README's runnable commands, in order.
    pictures = set((run_dir / "pictures").glob("*.png"))
    user.run(show)
    assert set((run_dir / "pictures").glob("*.png")) - pictures  # a new picture in the run's pictures/
    user.run(knn)
    assert (run_dir / "eval_knn.json").is_file()
    user.run(export)
    out = clone / "exports" / "quickstart"

    # 4. The card: the install that works, and the import this CIFAR-stem model needs.
    card = (out / "README.md").read_text()
    assert "pip install hub-ccrop" not in card and "pip install -e ." in card
    assert "import hub_ccrop" in card and "plain timm does not know it" in card and "python train.py" not in card
    assert "Source of the kNN number: the training run's kNN monitor" in card  # the summary's number, named
    assert "`hub-ccrop eval knn` after training (`eval_knn.json`) measured" in card  # the later one, apart
    # 5. Your own images: the README's command on a folder of photos (no labels), shortened like the quickstart.
    own = next(c for c in commands if c.startswith("hub-ccrop train recipes/own_images.yaml"))
    photos = clone / "photos"
    photos.mkdir()
    for k in range(32):
        Image.new("RGB", (48 + k, 40), (8 * k, 90, 30)).save(photos / f"{k:02d}.jpg")
    trained = user.run(own, ["model.name=resnet_tiny_cifar", "model.channels_last=false", "data.image_size=16",
                             "data.batch_size=16", "data.num_workers=0", "train.epochs=2", "crop.warmup_epochs=1",
                             "crop.loc_interval=1", "train.mixed_precision=no", "method.options.queue_size=32",
                             "method.options.split_bn=2"])
    assert "data photos: 32 images without labels" in trained.stdout and "kNN monitor is off" in trained.stdout
    assert all((clone / "runs" / "own_images" / f).exists() for f in ("backbone.safetensors", "boxes.parquet", "pictures"))
    shutil.rmtree(photos)
    # runs/, exports/ and the caches leave the clone clean
    assert subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout == ""

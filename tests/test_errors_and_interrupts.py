"""User mistakes give one line and exit code 2; SIGINT/SIGTERM save a checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_ccrop import cli
from hub_ccrop.recipe import RecipeError, load_recipe
from hub_ccrop.synthetic import small_objects_dir
from hub_ccrop.training import train

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
INTERRUPT_LINE = re.compile(r"^interrupted \((SIGINT|SIGTERM)\): saved (\S+); continue with: (.+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def tiny_objects(tmp_path_factory) -> Path:
    return small_objects_dir(tmp_path_factory.mktemp("objects"), train=96, test=32)


def _overrides(data_dir: Path) -> list[str]:
    """12 steps of 8 per epoch, a localization pass after epoch 1, then ContrastiveCrop; a checkpoint every 2 steps."""
    return [f"data.data_dir={data_dir}", "data.batch_size=8", "train.epochs=2", "crop.warmup_epochs=1",
            "crop.loc_interval=1", "train.knn_every=0", "train.checkpoint_every_steps=2"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


# -- user mistakes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("model.name=resnet_tny_cifar", r"model.name: unknown timm model 'resnet_tny_cifar' \(did you mean resnet_tiny_cifar"),
    ("method.name=simclrr", r"method.name: unknown method 'simclrr' \(did you mean simclr\?\)"),
    ("method.options.temprature=0.2", r"method.options: unknown option\(s\) 'temprature'.*temperature"),
    ("data.dataset=small_object", r"data.dataset: unknown dataset 'small_object' \(did you mean small_objects or small_objects_hard\?\)"),
    ("data.data_dir=/no/such/folder", r"data.data_dir: folder /no/such/folder does not exist: fix the path"),
], ids=["model", "method", "method-option", "dataset", "data-dir"])
def test_recipe_names_are_checked_before_any_data_is_read(override, expected, tmp_path, capsys):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(QUICKSTART, [override])
    out = tmp_path / "run"
    assert cli.main(["train", str(QUICKSTART), "--set", override, "--output-dir", str(out)]) == 2
    assert re.search(expected, _one_error_line(capsys))
    assert not out.exists()


def test_multi_line_parser_errors_become_one_line(tmp_path, capsys):
    assert cli.main(["train", str(QUICKSTART), "--set", "data.splits=[train[:512]]"]) == 2
    assert "the value is not valid YAML (quote it?)" in _one_error_line(capsys)


def test_hub_dataset_offline_is_one_line_with_the_fix(tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    code = cli.main(["train", str(REPO / "recipes" / "simclr_cifar10_ccrop.yaml"), "--output-dir", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "uoft-cs/cifar10" in line and "set data.data_dir" in line and "to a local copy" in line
    assert not out.exists()  # failed before training: no run folder left behind


def test_missing_run_folder_and_debug(tmp_path, capsys):
    missing = str(tmp_path / "runs" / "nope")
    for argv in (["export", missing], ["show", missing], ["eval", "knn", missing, "--dataset", "small_objects"]):
        assert cli.main(argv) == 2, argv
        assert "nope" in _one_error_line(capsys)
    with pytest.raises(FileNotFoundError):
        cli.main(["export", missing, "--debug"])  # --debug (anywhere on the line) keeps the traceback


def test_bare_command_lists_the_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "show", "eval", "finetune", "export", "publish"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command


def test_existing_run_needs_resume(tiny_objects, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    args = ["train", str(QUICKSTART), "--output-dir", str(out)]
    for item in [*_overrides(tiny_objects), "train.max_steps=2"]:
        args += ["--set", item]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "already holds a run: pass --resume" in _one_error_line(capsys)


# -- interrupts ------------------------------------------------------------------------------------


def _interrupt(cmd: list[str], out: Path, cwd: Path, sig: signal.Signals, *, whole_group: bool) -> subprocess.CompletedProcess:
    """Start a run, send ``sig`` once its second step is checkpointed, and wait for it to stop."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (cwd / out / "checkpoints" / "checkpoint_000000002").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    if whole_group:  # Ctrl-C in a terminal: the launcher, the ranks and the DataLoader workers all get it
        os.killpg(proc.pid, sig)
    else:  # a scheduler preempting the job signals the launched process
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _resume_argv(command: str) -> tuple[list[str], dict[str, str]]:
    """The printed resume command as argv for this interpreter (same arguments, same launcher)."""
    words, env = shlex.split(command), {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:2] == ["hub-ccrop", "train"]:
        return [sys.executable, "-m", "hub_ccrop.cli", *words[1:]], env
    assert words[:2] == ["accelerate", "launch"], command
    return [sys.executable, "-m", "accelerate.commands.launch", *words[2:]], env


def _check_interrupted_then_resumed(result, cwd: Path, out: Path, sig: signal.Signals, reference: Path,
                                    world: int, capfd=None) -> None:
    """The printed command finishes the run with the uninterrupted run's weights. With ``capfd`` a
    ``hub-ccrop`` command runs in this process (the same ``cli.main``, without a second interpreter start)."""
    lines = INTERRUPT_LINE.findall(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]  # one line, once (not once per process)
    name, checkpoint, command = lines[0]
    assert name == sig.name and "Traceback" not in result.stderr.split("interrupted (")[0]
    saved = cwd / checkpoint
    assert saved.parent.parent == cwd / out and not (cwd / out / "backbone.safetensors").exists()
    step = int(saved.name.removeprefix("checkpoint_"))
    assert step > 2 and saved == sorted((cwd / out / "checkpoints").glob("checkpoint_*"))[-1]
    assert {f"random_states_{rank}.pkl" for rank in range(world)} <= {p.name for p in saved.iterdir()}
    argv, extra_env = _resume_argv(command)
    if capfd is not None and argv[1:3] == ["-m", "hub_ccrop.cli"] and not extra_env:
        cwd_before = Path.cwd()
        os.chdir(cwd)  # the command names the run folder relative to where it was printed
        try:
            code = cli.main(argv[3:])
        finally:
            os.chdir(cwd_before)
        captured = capfd.readouterr()
        assert code == 0, captured.err[-3000:]
        assert f"resumed from {checkpoint}" in captured.out + captured.err
    else:
        env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        resumed = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {checkpoint}" in resumed.stdout + resumed.stderr
    a, b = load_file(reference / "backbone.safetensors"), load_file(cwd / out / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_current_step_and_resume_ends_where_an_uninterrupted_run_does(
        sig, tiny_objects, tmp_path, one_thread, capfd):
    reference = tmp_path / "reference"
    train(load_recipe(QUICKSTART, [*_overrides(tiny_objects), "data.num_workers=0"]), reference)
    out = Path("run")  # relative, as users type it: the printed command is run from the same folder
    cmd = [sys.executable, "-m", "hub_ccrop.cli", "train", str(QUICKSTART), "--output-dir", str(out),
           "--set", "data.num_workers=1"]  # a DataLoader worker must not die of the signal either
    for item in _overrides(tiny_objects):
        cmd += ["--set", item]
    result = _interrupt(cmd, out, tmp_path, sig, whole_group=sig == signal.SIGINT)
    assert result.returncode == 128 + sig, result.stderr[-3000:]  # 130 / 143
    _check_interrupted_then_resumed(result, tmp_path, out, sig, reference, world=1, capfd=capfd)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_with_two_processes(sig, tiny_objects, tmp_path):
    """Both ranks save their part of the checkpoint at the same step; the printed command resumes exactly."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hub_ccrop", "train",
              str(QUICKSTART)]
    sets = [arg for item in [*_overrides(tiny_objects), "data.num_workers=0"] for arg in ("--set", item)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    reference = subprocess.run([*launch, "--output-dir", "reference", *sets], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = Path("run")
    result = _interrupt([*launch, "--output-dir", str(out), *sets], out, tmp_path, sig,
                        whole_group=sig == signal.SIGINT)
    # The ranks exit with 130/143; torch's launcher then reports the signal it got in its own way.
    assert result.returncode != 0
    _check_interrupted_then_resumed(result, tmp_path, out, sig, tmp_path / "reference", world=2)


# -- undecodable images ----------------------------------------------------------------------------


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_skipped_images_are_warned_once_and_listed_in_the_run_folder(tiny_objects, tmp_path, one_thread, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        table = pq.read_table(tiny_objects / f"{split}-00000-of-00001.parquet")
        if split == "train":  # two rows whose bytes are not an image
            images = table.column("image").to_pylist()
            for row in (5, 77):
                images[row] = {"bytes": b"not an image", "path": f"broken_{row}.png"}
            table = table.set_column(table.schema.get_field_index("image"), "image",
                                     pa.array(images, type=table.schema.field("image").type))
        pq.write_table(table, data / f"{split}-00000-of-00001.parquet")
    out = tmp_path / "run"
    args = ["train", str(QUICKSTART), "--output-dir", str(out)]
    for item in [*_overrides(data), "data.num_workers=2", "train.checkpoint_every_steps=null"]:
        args += ["--set", item]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every repeat would be printed: the run itself must warn once per id
        warnings.showwarning = _print_warning  # as Python prints them (pytest would record them instead)
        assert cli.main(args) == 0
    captured = capfd.readouterr()
    log = captured.out + captured.err
    # 2 epochs (in 2 DataLoader workers) and a localization pass meet each bad image: one warning each
    assert log.count("sample id 5: cannot decode image (broken_5.png)") == 1, log[-3000:]
    assert log.count("sample id 77: cannot decode image (broken_77.png)") == 1
    assert f"skipped 2 undecodable images (distinct ids, listed in {out / 'skipped.json'})" in log
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped["count"] == 2 and skipped["ids"] == [5, 77]
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 2

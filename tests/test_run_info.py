"""run.json through one typed object: round trip, older files, and show/export/eval on a run whose data
lives in a local folder (a spec name no registry knows, so only the recorded ``data_dir`` finds it)."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
import timm
import torch
from safetensors.torch import save_file

from hub_ccrop.boxes import BoxTable
from hub_ccrop.data import CIFAR10_MEAN, CIFAR10_STD, DatasetSpec, dataset_fingerprint, get_spec, num_ids
from hub_ccrop.errors import UserError
from hub_ccrop.run_info import RunInfo, Schedule

SCHEDULE = Schedule(crop="ccrop", k=0.3, alpha=0.6, warmup_epochs=1, loc_epochs=(1, 2), heatmap_alignment="official")


def test_round_trip_keeps_the_whole_spec(tmp_path):
    spec = DatasetSpec(
        "my_data", data_dir=str(tmp_path / "data"), data_files={"train": ["a.parquet", "b.parquet"]},
        image_column="img", label_column="fine", pretrain_splits=("train[:-100]",), train_split="train[:-100]",
        test_split="train[-100:]", image_size=48, eval_resize=(56, 48), mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1),
        num_classes=7, class_subset=(3, 1), extra_columns=("gt_box",),
    )
    info = RunInfo(model="resnet18", model_args={"drop_rate": 0.1}, input_size=(3, 48, 48), mean=spec.mean,
                   std=spec.std, crop_pct=0.875, method="moco_v2", method_options={"queue_size": 256}, dataset=spec,
                   num_rows=900, fingerprint="fp", epochs=5, batch_size=64, num_processes=2, grad_accum=2,
                   per_process_batch_size=16, schedule=SCHEDULE, license="apache-2.0", target="89.6")
    loaded = RunInfo.load(info.save(tmp_path).parent)
    assert loaded == info and loaded.dataset == spec and loaded.schedule == SCHEDULE
    raw = json.loads((tmp_path / "run.json").read_text())  # the flat layout readers of the JSON rely on
    assert raw["dataset"]["data_dir"] == spec.data_dir and raw["dataset"]["num_rows"] == 900
    assert (raw["batch_size"], raw["num_processes"], raw["grad_accum"], raw["per_process_batch_size"]) == (64, 2, 2, 16)
    assert raw["schedule"]["heatmap_alignment"] == "official" and raw["schedule"]["k"] == 0.3


def test_older_files_load_with_their_registered_spec(tmp_path):
    legacy = {  # what train.py wrote before the spec was recorded
        "model": "resnet18_cifar", "model_args": {}, "input_size": [3, 32, 32], "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD), "interpolation": "bilinear", "crop_pct": 1.0, "method": "simclr",
        "dataset": {"name": "cifar10", "hub_id": "uoft-cs/cifar10", "splits": ["train[:-5000]"], "num_rows": 50000,
                    "image_column": "img", "label_column": "label", "fingerprint": "fp",
                    "train_split": "train[:-5000]", "test_split": "train[-5000:]"},
        "epochs": 500, "batch_size": 512, "schedule": {"warmup_epochs": 100, "loc_epochs": [], "k": 0.1, "alpha": 0.1},
    }
    (tmp_path / "run.json").write_text(json.dumps(legacy))
    info = RunInfo.load(tmp_path)
    assert info.dataset == get_spec("cifar10", pretrain_splits=("train[:-5000]",), train_split="train[:-5000]",
                                    test_split="train[-5000:]")
    assert (info.num_rows, info.fingerprint, info.num_processes, info.grad_accum) == (50000, "fp", 1, 1)
    assert info.schedule == Schedule(crop="rcrop", k=0.1, alpha=0.1, warmup_epochs=100)  # no passes: R-Crop
    # a hand-made backbone folder: the model and a short input size are enough for eval
    (tmp_path / "run.json").write_text(json.dumps({"model": "resnet18", "input_size": 96}))
    bare = RunInfo.load(tmp_path)
    assert bare.input_size == (3, 96, 96) and bare.dataset is None and bare.data_config() == {
        "input_size": (3, 96, 96), "crop_pct": 1.0}


@pytest.mark.parametrize(("raw", "message"), [
    ({"input_size": 32}, "no 'model'"),
    ({"model": "resnet18", "schedule": {"crop": "ccrop", "alpha": 0.1}}, "malformed run info"),
    ({"model": "resnet18", "input_size": [1, 2, 3, 4]}, "input_size"),
])
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, raw, message):
    (tmp_path / "run.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message) as err:
        RunInfo.load(tmp_path)
    assert str(tmp_path / "run.json") in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def local_data_run(tmp_path_factory):
    """A run folder whose data is a local parquet folder under a name no registry knows."""
    from hub_ccrop.models import create_backbone
    from hub_ccrop.synthetic import small_objects_dir

    base = tmp_path_factory.mktemp("local_run")
    folder = small_objects_dir(base / "data", train=24, test=8, size=32)
    spec = DatasetSpec("my_objects", data_dir=str(folder), image_size=32, mean=(0.45,) * 3, std=(0.15,) * 3,
                       num_classes=10, extra_columns=("gt_box",))
    run = base / "run"
    run.mkdir()
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny_cifar")
    save_file(backbone.state_dict(), str(run / "backbone.safetensors"))
    num_rows, fingerprint = num_ids(spec), dataset_fingerprint(spec)
    table = BoxTable(num_rows, {"fingerprint": fingerprint})
    table.save(run / "boxes.parquet")
    RunInfo(model="resnet_tiny_cifar", input_size=(3, 32, 32), mean=spec.mean, std=spec.std, crop_pct=1.0,
            method="simclr", dataset=spec, num_rows=num_rows, fingerprint=fingerprint, epochs=2, batch_size=8,
            schedule=SCHEDULE).save(run)
    return run, spec


def test_show_reads_the_runs_own_data_from_its_data_dir(local_data_run, capsys):
    from hub_ccrop.show import show

    run, _ = local_data_run
    path = show(str(run), num_images=3)
    assert path == run / "pictures" / "show_0001.png" and path.stat().st_size > 5_000
    printed = capsys.readouterr().out
    assert "3 images: id 0, id 11, id 23" in printed  # evenly spaced over the folder's 24 training rows


def test_export_and_eval_read_the_run_info(local_data_run, tmp_path):
    from huggingface_hub import ModelCard

    from hub_ccrop.commands.evaluate import add_cli
    from hub_ccrop.evaluate import backbone_data_config, load_backbone
    from hub_ccrop.hub import export_run

    run, spec = local_data_run
    out = export_run(run, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert config["input_size"] == [3, 32, 32] and config["mean"] == [0.45] * 3 and config["crop_pct"] == 1.0
    card = ModelCard.load(out / "README.md").text
    assert "my_objects" in card and "threshold k = 0.3" in card
    assert BoxTable.load(out / "boxes.parquet").metadata["dataset"] == "my_objects"

    model = load_backbone(run)
    cfg = backbone_data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and tuple(cfg["mean"]) == spec.mean
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    command = (f"eval knn {shlex.quote(str(run))} --dataset {shlex.quote(spec.data_dir)} --k 5 --batch-size 8 "
               f"--num-workers 0 --no-progress --output {shlex.quote(str(tmp_path / 'knn'))}")
    args = parser.parse_args(shlex.split(command))
    result = args.func(args)
    assert (result["num_train"], result["num_test"]) == (24, 8)
    assert timm.create_model(f"local-dir:{out}", pretrained=True).num_features == model.num_features

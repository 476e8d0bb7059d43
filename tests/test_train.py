"""The training loop end to end on a tiny small-objects set: schedule, passes, resume, errors, recipes."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_ccrop.boxes import BoxTable
from hub_ccrop.cli import main as cli_main
from hub_ccrop.data import get_spec, load_images
from hub_ccrop.errors import UserError
from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone
from hub_ccrop.recipe import load_recipe
from hub_ccrop.synthetic import small_objects_dir
from hub_ccrop.training import NonFiniteLossError, summary, train

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS, TEST_ROWS = 96, 32


@pytest.fixture(scope="module")
def tiny_objects(tmp_path_factory) -> Path:
    return small_objects_dir(tmp_path_factory.mktemp("objects"), train=TRAIN_ROWS, test=TEST_ROWS)


def tiny_recipe(data_dir: Path, **sections):
    raw = {
        "name": "tiny",
        "model": {"name": "resnet_tiny_cifar"},
        "method": {"name": "simclr"},
        # 32 px (the data is 64 px) and 3 steps of 32 keep the runs short; pictures only where a test looks at them.
        "data": {"dataset": "small_objects", "data_dir": str(data_dir), "batch_size": 32, "num_workers": 0,
                 "image_size": 32},
        "crop": {"alpha": 0.6, "warmup_epochs": 1, "loc_interval": 1},
        "optim": {"lr": 0.1},
        "train": {"epochs": 3, "knn_every": 3, "knn_k": 20, "log_every": 1, "show_images": 0},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return load_recipe(raw)


@pytest.fixture(scope="module")
def shared_run(tiny_objects, tmp_path_factory) -> tuple[Path, dict]:
    """One 3-epoch run (warm-up, two passes, pictures, kNN) for the tests that only read its folder."""
    out = tmp_path_factory.mktemp("shared") / "run"
    return out, train(tiny_recipe(tiny_objects, train={"show_images": 4}), out)


def test_warmup_then_localization_then_contrastive_crop(shared_run, tiny_objects):
    out, metrics = shared_run
    gt = torch.tensor(load_images(get_spec("small_objects", data_dir=str(tiny_objects)))["gt_box"])
    gt_area = float((gt[:, 2:] - gt[:, :2]).prod(dim=1).mean())
    assert metrics["box_iou_whole_image"] == pytest.approx(gt_area, rel=1e-5) and metrics["knn_chance"] == 10
    printed = summary(tiny_recipe(tiny_objects), metrics, out)  # what the run printed at its end
    assert "(chance 10%)" in printed and f"(whole image {gt_area:.3f}, centred box of the same size" in printed
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["crop"] for h in history] == ["rcrop", "ccrop", "ccrop"]
    assert [("box_iou" in h) for h in history] == [True, True, False]  # passes after epochs 1 and 2
    assert [("knn_top1" in h) for h in history] == [False, False, True]  # train.knn_every=3
    assert metrics["knn_top1"] == history[-1]["knn_top1"] <= history[-1]["knn_top5"]
    assert 0 < metrics["box_iou"] <= 1
    assert 0 <= metrics["miss_rate_ccrop"] <= 1 and metrics["skipped_images"] == 0
    for epoch in (1, 2):
        for suffix in (".parquet", ".safetensors"):
            assert (out / "boxes" / f"epoch_{epoch:04d}{suffix}").is_file()
        assert (out / "pictures" / f"localization_epoch_{epoch:04d}.png").stat().st_size > 10_000
    table = BoxTable.load(out / "boxes.parquet")
    assert len(table) == TRAIN_ROWS and table.metadata["epoch"] == 2 and table.metadata["id_scheme"] == "row-index-v1"
    assert not torch.equal(table.boxes, BoxTable(TRAIN_ROWS).boxes)  # the pass changed the boxes
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "resnet_tiny_cifar" and run["input_size"] == [3, 32, 32]
    assert run["schedule"]["loc_epochs"] == [1, 2] and run["dataset"]["num_rows"] == TRAIN_ROWS
    assert (run["batch_size"], run["num_processes"], run["grad_accum"], run["per_process_batch_size"]) == (32, 1, 1, 32)
    assert run["dataset"]["test_split"] == "test" and metrics["eval_split"] == "test"
    backbone = create_backbone("resnet_tiny_cifar")
    backbone.load_state_dict(load_file(out / "backbone.safetensors"))
    assert (out / "recipe.yaml").is_file() and list((out / "logs").rglob("events.out.tfevents*"))


def test_resume_continues_to_the_same_final_state(tiny_objects, tmp_path):
    """A run stopped mid-epoch and resumed ends with the same weights and boxes as one that never stopped."""
    base = {"train": {"epochs": 2, "checkpoint_every_steps": 2, "knn_every": 0}, "crop": {"loc_epochs": [1, 2]}}
    full = tmp_path / "full"
    train(tiny_recipe(tiny_objects, **base), full)
    cut = tmp_path / "cut"
    stopped = train(tiny_recipe(tiny_objects, crop=base["crop"], train={**base["train"], "max_steps": 5}), cut)
    assert stopped == {"stopped_at_step": 5}  # step 5 of 6 trained, last checkpoint at step 4
    assert sorted(p.name for p in (cut / "checkpoints").iterdir())[-1] == "checkpoint_000000004"
    (cut / "checkpoints" / ".tmp_checkpoint_000000005").mkdir()  # a write killed half way: ignored
    train(tiny_recipe(tiny_objects, **base), cut, resume=True)
    a, b = load_file(full / "backbone.safetensors"), load_file(cut / "backbone.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(BoxTable.load(full / "boxes.parquet").boxes, BoxTable.load(cut / "boxes.parquet").boxes)


@pytest.mark.parametrize("data", [
    {"streaming": True},
    {"batched_views": True},
    {"batched_views": True, "device_resident": True},
    {"num_workers": 2},
], ids=["streaming", "batched", "device-resident", "workers"])
def test_every_data_path_trains_and_localizes(tiny_objects, tmp_path, data):
    train(tiny_recipe(tiny_objects, data=data, train={"epochs": 2, "knn_every": 0}), tmp_path)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["crop"] for h in history] == ["rcrop", "ccrop"] and history[0]["loc_images"] == TRAIN_ROWS
    table = BoxTable.load(tmp_path / "boxes.parquet")
    assert not torch.equal(table.boxes, BoxTable(TRAIN_ROWS).boxes)


def test_device_resident_passes_and_knn_decode_nothing(tiny_objects, tmp_path, monkeypatch):
    """device_resident: the training images are decoded once; the passes and the kNN monitor read the
    resident images (the test split is decoded once, too), however many passes and kNN runs there are."""
    from hub_ccrop.views import collate, eval, resident, rows

    decoded = []
    real = rows.decode_rows
    for module in (collate, eval, resident):  # every caller of the one decoding function
        monkeypatch.setattr(module, "decode_rows", lambda rows, **kw: decoded.append(len(
            rows["id"] if isinstance(rows, dict) else rows)) or real(rows, **kw))
    recipe = tiny_recipe(tiny_objects, data={"batched_views": True, "device_resident": True},
                         crop={"follow_images": 0}, train={"epochs": 3, "knn_every": 1, "show_images": 0})
    metrics = train(recipe, tmp_path)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert sum("loc_images" in h for h in history) == 2 and all("knn_top1" in h for h in history)
    assert not any("box_follow" in h for h in history)  # crop.follow_images 0: no follow check
    assert sorted(decoded) == [TEST_ROWS, TRAIN_ROWS]  # the test split and the training images, once each
    assert metrics["skipped_images"] == 0


def test_non_finite_watch_reports_the_first_bad_step():
    from hub_ccrop.training import NonFiniteWatch

    watch = NonFiniteWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0], start=1):
        watch.update(torch.tensor(loss), 4, step)
        if step == 2:
            watch.check(None)  # all finite so far: no error
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 4, step 3: .*Last good checkpoint: ckpt_7"):
        watch.check(Path("ckpt_7"))


def test_gradient_accumulation_lars_and_bf16_run(tiny_objects, tmp_path):
    recipe = tiny_recipe(tiny_objects, data={"batch_size": 16}, optim={"name": "lars", "lr": 0.3},
                         train={"epochs": 2, "grad_accum": 2, "knn_every": 0, "mixed_precision": "bf16"})
    metrics = train(recipe, tmp_path)
    assert metrics["epochs"] == 2 and torch.isfinite(torch.tensor(metrics["final_loss"]))


def test_published_boxes_start_contrastive_crop_without_warmup(tiny_objects, shared_run, tmp_path):
    first, _ = shared_run
    learned = BoxTable.load(first / "boxes.parquet")
    second = tmp_path / "second"
    recipe = tiny_recipe(tiny_objects, crop={"init_boxes": str(first / "boxes.parquet"), "loc_interval": 5},
                         train={"epochs": 1, "knn_every": 0})
    train(recipe, second)
    history = json.loads((second / "metrics.json").read_text())["history"]
    assert history[0]["crop"] == "ccrop" and "box_iou" not in history[0]  # no warm-up, no pass
    assert torch.equal(BoxTable.load(second / "boxes.parquet").boxes, learned.boxes)
    other = tiny_recipe(tiny_objects, data={"splits": ["train[:50]"]},
                        crop={"init_boxes": str(first / "boxes.parquet")}, train={"epochs": 1, "knn_every": 0})
    with pytest.raises(ValueError, match="does not match"):
        train(other, tmp_path / "third")


def test_show_draws_a_picture_for_a_run_and_for_own_images(shared_run, tmp_path, capsys):
    from PIL import Image

    from hub_ccrop.cli import main as cli

    run = tmp_path / "run"
    shutil.copytree(shared_run[0], run)  # show writes into the run's pictures/: a copy keeps the shared run as it is
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        Image.new("RGB", (50 + 10 * k, 40), (40 * k, 90, 200)).save(photos / f"p{k}.png")
    assert cli(["show", str(run), "--input", str(photos), "--out", str(tmp_path / "own.png")]) == 0
    assert (tmp_path / "own.png").stat().st_size > 5_000
    # own photos have no ground truth: area, centre and whether the boxes follow the content
    out = capsys.readouterr().out
    assert "\nboxes of these 3 images: mean box area " in out and "boxes follow the content" in out and "\n  so the boxes " in out
    # the run's own images (they have ground-truth boxes), into the run's pictures/, never over an earlier picture
    assert cli(["show", str(run), "--images", "2"]) == 0
    out = capsys.readouterr().out
    assert "boxes of these 2 images: IoU with the objects " in out and "boxes follow the content" in out
    assert cli(["show", str(run), "--images", "2"]) == 0
    assert sorted(p.name for p in (run / "pictures").glob("show_*.png")) == ["show_0001.png", "show_0002.png"]


def test_refuses_to_overwrite_a_run(tiny_objects, shared_run):
    out, _ = shared_run
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(UserError, match="--resume"):
        train(tiny_recipe(tiny_objects), out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing written


def test_non_finite_loss_stops_with_a_usable_checkpoint(tiny_objects, tmp_path):
    recipe = tiny_recipe(tiny_objects, optim={"lr": 1e30}, train={"checkpoint_every_steps": 1, "knn_every": 0})
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf).*Last good checkpoint: .*checkpoint_0+\d"):
        train(recipe, tmp_path)
    assert list((tmp_path / "checkpoints").glob("checkpoint_*"))


def test_cli_reports_recipe_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1\n")
    assert cli_main(["train", str(bad)]) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err


@cache
def _built(model: str, method: str, options: tuple) -> bool:
    return build_method(method, create_backbone(model), **dict(options)) is not None


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_builds_model_method_and_data_spec(path):
    recipe = load_recipe(path, ["data.dataset=small_objects"] if path.stem == "own_images" else [])  # a user's folder
    spec = get_spec(recipe.data.dataset)  # no download: specs are metadata
    assert spec.image_size in (32, 64, 96, 224) and spec.num_classes
    options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in recipe.method.options.items()))
    assert _built(recipe.model.name, recipe.method.name, options)  # (hashable: lists as tuples)
    if recipe.crop.mode == "ccrop":
        assert recipe.localization_epochs() and recipe.localization_epochs()[0] == recipe.crop.warmup_epochs

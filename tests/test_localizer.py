"""crop.localizer: another backbone (run folder, timm export, hf-hub:) draws the boxes; recorded where they go."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hub_ccrop.boxes import BoxTable
from hub_ccrop.data import get_spec, load_images
from hub_ccrop.evaluate import load_backbone
from hub_ccrop.hub import export_run
from hub_ccrop.localize import TRAINED_BACKBONE, localize_boxes
from hub_ccrop.localizer import external_localizer, pass_localizer
from hub_ccrop.recipe import RecipeError, load_recipe
from hub_ccrop.synthetic import small_objects_dir
from hub_ccrop.training import summary, train
from hub_ccrop.views import EvalCollate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_hub import make_run, seed_hf_cache  # noqa: E402

DATA_MEAN, DATA_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_prepare_gives_the_localizer_its_own_size_and_normalization(tmp_path):
    run, weights = make_run(tmp_path / "run", image_size=48)  # the localizer: 48 px, CIFAR mean/std
    localizer = external_localizer(str(run), DATA_MEAN, DATA_STD)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data_input = (pixels - torch.tensor(DATA_MEAN).view(1, 3, 1, 1)) / torch.tensor(DATA_STD).view(1, 3, 1, 1)
    cfg = json.loads((run / "run.json").read_text())
    resized = F.interpolate(pixels, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    expected = (resized - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(localizer.prepare(data_input.float()), expected.float(), atol=1e-5)
    assert localizer.external and localizer.metadata() == {"localizer": str(run), "localizer_network": "resnet10t",
                                                           "localizer_input_size": [48, 48]}
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(localizer.model(x), weights(x))
    trained = pass_localizer(None, weights, DATA_MEAN, DATA_STD, "cpu")
    assert trained.model is weights and trained.prepare(data_input) is data_input
    assert trained.metadata() == {"localizer": TRAINED_BACKBONE, "localizer_network": "resnet10t"}


def test_hf_hub_localizer_from_an_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    run, weights = make_run(tmp_path / "run", image_size=32)
    export = export_run(run, tmp_path / "export", repo_id="test-org/localizer")
    seed_hf_cache(tmp_path / "hub", "test-org/localizer", export)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert constants.HF_HUB_OFFLINE  # conftest: no network
    localizer = external_localizer("hf-hub:test-org/localizer", DATA_MEAN, DATA_STD)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(localizer.model(x), weights(x))
    assert localizer.size == (32, 32) and localizer.source == "hf-hub:test-org/localizer"


def tiny_recipe(data_dir: Path, epochs: int = 2, **crop):
    return load_recipe({
        "name": "tiny", "model": {"name": "resnet_tiny_cifar"}, "method": {"name": "simclr"},
        "data": {"dataset": "small_objects", "data_dir": str(data_dir), "batch_size": 32, "num_workers": 0,
                 "image_size": 32},
        "crop": {"alpha": 0.6, "k": 0.5, "warmup_epochs": 1, "loc_interval": 1, **crop},
        "optim": {"lr": 0.1},
        "train": {"epochs": epochs, "knn_every": 0, "log_every": 1, "show_images": 0},
    })


def test_recipe_checks_the_localizer_and_allows_no_warmup(tmp_path):
    run, _ = make_run(tmp_path / "run")
    with pytest.raises(RecipeError, match=r"crop.localizer: .*nowhere.* is not a run folder"):
        tiny_recipe(tmp_path, localizer=str(tmp_path / "nowhere"))
    assert tiny_recipe(tmp_path, localizer=str(run), warmup_epochs=0).localization_epochs() == [0, 1]
    assert tiny_recipe(tmp_path, warmup_epochs=0).localization_epochs() == [1]  # its own backbone: after epoch 1
    assert tiny_recipe(tmp_path, localizer="hf-hub:org/name").crop.localizer == "hf-hub:org/name"


def test_a_run_localized_by_another_run_from_the_first_epoch(tmp_path, one_thread):
    """A run folder trained here localizes a second run's passes (before epoch 1 and after it); the box tables,
    the history and metrics.json name it, and its boxes are the ones that backbone gives."""
    data = small_objects_dir(tmp_path / "data", train=64, test=16)
    first = tmp_path / "first"
    train(tiny_recipe(data, epochs=1, mode="rcrop"), first)
    out = tmp_path / "second"
    recipe = tiny_recipe(data, localizer=str(first), warmup_epochs=0)
    metrics = train(recipe, out)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[0]["localizer"] == str(first)
    assert [h.get("crop") for h in history] == [None, "ccrop", "ccrop"]  # ContrastiveCrop from epoch 1 on
    assert metrics["localizer"] == str(first) and "box_iou_centred" in metrics
    assert f"learned boxes ({first}): IoU with the objects" in summary(recipe, metrics, out)
    # every pass checks whether its boxes follow the content (all 64 images: fewer than crop.follow_images)
    passes = [h for h in history if "box_area" in h]
    assert passes and all(-1.0 < h["box_follow"] < 2.0 for h in passes) and "boxes follow the content" in summary(recipe, metrics, out)
    assert "\n    so the boxes know" in summary(recipe, metrics, out)  # ground truth: the verdict is the IoU gain's
    before = BoxTable.load(out / "boxes" / "epoch_0000.parquet")
    assert before.metadata["localizer"] == str(first) and before.metadata["epoch"] == 0
    assert before.metadata["localizer_network"] == "resnet_tiny_cifar"
    assert before.metadata["box_rule"] == recipe.crop.box_rule
    spec = get_spec("small_objects", data_dir=str(data), image_size=32)
    loader = DataLoader(load_images(spec), batch_size=32, collate_fn=EvalCollate(spec, purpose="localize"))
    assert recipe.crop.heatmap_flip  # the default: flip-averaged heatmaps
    ids, boxes = localize_boxes(load_backbone(first), loader, k=0.5, flip=True, progress=False)
    assert torch.equal(ids, torch.arange(64)) and torch.allclose(before.boxes, boxes)


def test_a_localizer_that_does_not_load_is_one_clear_line(tmp_path):
    from hub_ccrop.errors import UserError

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # looks like an export, holds no model
    with pytest.raises(UserError, match=r"crop.localizer: cannot load .*broken"):
        external_localizer(str(broken), DATA_MEAN, DATA_STD)

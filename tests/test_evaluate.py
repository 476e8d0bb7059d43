"""Evaluation (issue 6): kNN with known answers, the linear probe protocol, backbone loading, fine-tuning."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hub_ccrop.commands.evaluate import add_cli
from hub_ccrop.distributed import gather_by_id
from hub_ccrop.errors import UserError
from hub_ccrop.evaluate import (
    backbone_data_config,
    extract_features,
    finetune,
    freeze_except,
    knn_accuracy,
    knn_predict,
    linear_probe,
    linear_probe_on_features,
    load_backbone,
    topk_accuracy,
)


def clusters(num_classes: int, per_class: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """L2-normalized points around ``num_classes`` random unit centers, with their labels."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return F.normalize(feats, dim=1), labels


def color_images(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: reddish vs bluish noisy images (linearly separable in any reasonable feature space)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.3 * torch.randn(n, 3, size, size, generator=g)
    images[labels == 0, 0] += 1.0
    images[labels == 1, 2] += 1.0
    return images, labels


def loader_of(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False
) -> DataLoader:
    """``(images, ids, labels)`` batches as the project's evaluation loaders give them."""
    ids = torch.arange(len(labels))
    return DataLoader(TensorDataset(images, ids, labels), batch_size=batch_size, shuffle=shuffle)


def tiny_cnn() -> nn.Module:
    """A small conv + BN + pool feature extractor (fast stand-in for a backbone)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(state[k], v), k


# --------------------------------------------------------------------------------------------------- kNN


def test_knn_separated_clusters_is_perfect():
    feats, labels = clusters(10, 70)
    train = torch.arange(700) % 70 < 50  # 50 train / 20 test points per class
    train_x, train_y, test_x, test_y = feats[train], labels[train], feats[~train], labels[~train]
    acc = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10, k=200, temperature=0.1)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_knn_shuffled_labels_is_chance():
    train_x, train_y = clusters(10, 200)
    test_x, test_y = clusters(10, 300, seed=0)
    g = torch.Generator().manual_seed(3)
    shuffled = test_y[torch.randperm(len(test_y), generator=g)]
    acc = knn_accuracy(train_x, train_y, test_x, shuffled, num_classes=10)
    assert 7.0 < acc["top1"] < 13.0  # chance is 10% (3,000 test points: std ~0.55%)
    assert 44.0 < acc["top5"] < 56.0
    # shuffled training labels on 100 classes: predictions are right for about 1% of the clusters
    feats, labels = clusters(100, 30, seed=1)
    train = torch.arange(3000) % 30 < 20
    bank = labels[train][torch.randperm(int(train.sum()), generator=g)]
    acc = knn_accuracy(feats[train], bank, feats[~train], labels[~train], num_classes=100)
    assert acc["top1"] <= 5.0  # vs 100% with the true labels
    assert (
        knn_accuracy(feats[train], labels[train], feats[~train], labels[~train], num_classes=100)["top1"]
        == 100.0
    )


def test_knn_predict_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    train_x = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    train_y = torch.randint(0, 4, (40,), generator=g)
    test_x = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    scores = knn_predict(train_x, train_y, test_x, num_classes=4, k=5, temperature=0.5, chunk_size=3)
    for i in range(7):
        sim = train_x @ test_x[i]
        top = sim.topk(5)
        expected = torch.zeros(4)
        for s, j in zip(top.values, top.indices, strict=True):
            expected[train_y[j]] += torch.exp(s / 0.5)
        torch.testing.assert_close(scores[i], expected)
    # k larger than the bank is capped
    assert knn_predict(train_x, train_y, test_x, num_classes=4, k=1000).shape == (7, 4)
    with pytest.raises(ValueError):
        knn_predict(train_x, train_y - 1, test_x, num_classes=4)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    acc = topk_accuracy(scores, labels)
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top5"] == 100.0  # k capped at the number of classes


# ------------------------------------------------------------------------------------------ features


def test_extract_features_sorted_by_id_and_normalized():
    model = timm.create_model("resnet18", num_classes=0).train()
    images, labels = color_images(12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images[perm], perm, labels[perm])  # ids out of order
    ids, feats, out_labels = extract_features(model, DataLoader(data, batch_size=5), progress=False)
    assert torch.equal(ids, torch.arange(12))
    assert torch.equal(out_labels, labels)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    assert model.training  # mode restored
    with torch.no_grad():
        expected = F.normalize(model.eval()(images), dim=1)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)


def test_gather_by_id_drops_duplicates_single_process():
    ids = torch.tensor([3, 1, 2, 1, 0])
    values = torch.tensor([[30.0], [10.0], [20.0], [11.0], [0.0]])
    out_ids, out_values = gather_by_id(ids, values)
    assert out_ids.tolist() == [0, 1, 2, 3]
    assert out_values.flatten().tolist() == [0.0, 10.0, 20.0, 30.0]  # first occurrence kept


# ----------------------------------------------------------------------------------------- linear probe


def test_linear_probe_on_features_separable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 64, generator=g)
    logits = x @ torch.randn(64, 5, generator=g)
    top2 = logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1] > 2.0  # linearly separable with a margin
    x, y = x[margin][:1200], logits[margin][:1200].argmax(dim=1)
    result = linear_probe_on_features(
        x[:1000],
        y[:1000],
        x[1000:],
        y[1000:],
        num_classes=5,
        epochs=30,
        milestones=(20, 25),
        lr=1.0,
        batch_size=128,
        progress=False,
    )
    assert result["top1"] >= 93.0
    assert result["top5"] == 100.0
    assert "not the paper's protocol" in result["protocol"]
    assert len(result["history"]) == 30 and result["history"][-1]["lr"] == pytest.approx(0.01)
    assert result["best_top1"] >= result["top1"] and 1 <= result["best_epoch"] <= 30


def test_linear_probe_frozen_backbone_untouched():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0)
    backbone.train()  # the probe must switch it to eval mode itself
    before = state_copy(backbone)
    bn_modes: list[bool] = []
    backbone.bn1.register_forward_hook(lambda m, i, o: bn_modes.append(m.training))
    train_x, train_y = color_images(64)
    test_x, test_y = color_images(32, seed=1)
    result = linear_probe(
        backbone,
        loader_of(train_x, train_y, 16, shuffle=True),
        loader_of(test_x, test_y, 16),
        num_classes=2,
        epochs=4,
        milestones=(3,),
        lr=1.0,
        progress=False,
    )
    assert result["top1"] >= 90.0
    assert result["protocol"].startswith("linear-probe (paper)")
    assert {"top1", "top5", "best_top1", "best_epoch", "note", "history"} <= result.keys()
    assert result["top1"] == result["history"][-1]["top1"]  # the last epoch, the paper's protocol
    assert result["best_top1"] == max(h["top1"] for h in result["history"])
    assert bn_modes and not any(bn_modes)  # BN always ran in eval mode
    assert_same_state(backbone, before)  # weights, running stats, num_batches_tracked
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())  # restored


# ------------------------------------------------------------------------------------ loading, finetune


def write_run(tmp_path: Path, model: nn.Module, name: str = "resnet18") -> Path:
    run = tmp_path / "run"
    run.mkdir()
    save_file(model.state_dict(), str(run / "backbone.safetensors"))
    meta = {
        "model": name,
        "model_args": {},
        "input_size": 32,
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.2, 0.2],
    }
    (run / "run.json").write_text(json.dumps(meta))
    return run


def test_load_backbone_run_folder(tmp_path):
    torch.manual_seed(0)
    saved = timm.create_model("resnet18", num_classes=0)
    run = write_run(tmp_path, saved)
    model = load_backbone(run)
    assert_same_state(model, saved.state_dict())
    cfg = backbone_data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == (0.5, 0.4, 0.3)
    with_head = load_backbone(run, num_classes=7)
    assert with_head.get_classifier().out_features == 7
    assert torch.equal(with_head.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)
    feats = load_backbone(run, features_only=True, out_indices=(2, 4))
    assert [f.shape[1] for f in feats(torch.randn(1, 3, 64, 64))] == [128, 512]
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing")


def test_load_backbone_timm_export(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    saved = timm.create_model("resnet18", num_classes=0)
    save_for_hf(saved, str(tmp_path / "export"), safe_serialization=True)
    model = load_backbone(tmp_path / "export", num_classes=5)
    assert model.get_classifier().out_features == 5
    assert torch.equal(model.conv1.weight, saved.conv1.weight)
    assert torch.equal(model.layer3[0].bn1.running_var, saved.layer3[0].bn1.running_var)


def test_finetune_saved_backbone_new_head(tmp_path):
    from accelerate import Accelerator

    torch.manual_seed(0)
    saved = timm.create_model("resnet18", num_classes=0)
    model = load_backbone(write_run(tmp_path, saved), num_classes=3)
    assert model.get_classifier().out_features == 3
    frozen = freeze_except(model, ["layer4"])
    assert "layer1" in frozen and "layer4" not in frozen and "fc" not in frozen
    assert not model.layer1[0].conv1.weight.requires_grad and model.layer4[0].conv1.weight.requires_grad
    assert type(model.bn1).__name__ == "FrozenBatchNorm2d"  # frozen BN stays fixed in train mode
    frozen_before = model.layer2[0].conv1.weight.detach().clone()
    head_before = model.fc.weight.detach().clone()
    images, labels = color_images(24)
    labels = labels + (torch.arange(24) % 3 == 0).long()  # use all 3 classes
    result = finetune(
        model,
        loader_of(images, labels, 8, shuffle=True),
        loader_of(images, labels, 8),
        epochs=1,
        lr=0.01,
        accelerator=Accelerator(cpu=True),
        progress=False,
    )
    assert result["top1"] is not None and len(result["history"]) == 1
    assert torch.equal(model.layer2[0].conv1.weight, frozen_before)
    assert not torch.equal(model.fc.weight, head_before)
    with pytest.raises(ValueError):
        freeze_except(model, ["layer9"])


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def tiny_parquet(tmp_path) -> Path:
    """A tiny labeled image dataset in parquet (Image + ClassLabel features, CIFAR-like 'img' column)."""
    import datasets
    from PIL import Image

    def split(n: int, seed: int) -> datasets.Dataset:
        images, labels = color_images(n, size=32, seed=seed)
        pil = [
            Image.fromarray((x.clamp(-1, 2) / 3 * 255 + 85).byte().permute(1, 2, 0).numpy()) for x in images
        ]
        features = datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(names=["r", "b"])}
        )
        return datasets.Dataset.from_dict({"img": pil, "label": labels.tolist()}, features=features)

    root = tmp_path / "data"
    root.mkdir()
    split(32, 0).to_parquet(str(root / "train.parquet"))
    split(16, 1).to_parquet(str(root / "test.parquet"))
    return root


def run_cli(command: str) -> dict:
    """Parse ``command`` (shell syntax) with this module's subcommands and run it."""
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(shlex.split(command))
    return args.func(args)


def test_cli_knn_linear_finetune(tmp_path, tiny_parquet):
    torch.manual_seed(0)
    run = shlex.quote(str(write_run(tmp_path, timm.create_model("resnet18", num_classes=0))))
    # a local folder of parquet files (train.parquet, test.parquet), resolved by data.get_spec
    data = f"--dataset {shlex.quote(str(tiny_parquet))} --image-column img --num-workers 0 --no-progress"
    knn = run_cli(f"eval knn {run} {data} --batch-size 8")
    saved = json.loads((tmp_path / "run" / "eval_knn.json").read_text())
    assert saved["top1"] == knn["top1"] and saved["k"] == 200 and saved["image_column"] == "img"
    assert saved["num_train"] == 32 and saved["num_test"] == 16 and "date" in saved
    assert saved["dataset"] == str(tiny_parquet) and saved["label_column"] == "label"
    assert (saved["train_split"], saved["test_split"]) == ("train", "test")  # the spec's defaults
    assert saved["num_classes"] == 2  # max train label + 1 (a folder spec has no num_classes)

    fast = run_cli(f"eval linear {run} {data} --fast --epochs 3 --milestones 2")
    assert "cached-features" in json.loads((tmp_path / "run" / "eval_linear.json").read_text())["protocol"]
    assert fast["num_train"] == 32
    paper = run_cli(f"eval linear {run} {data} --epochs 2 --batch-size 16 --lr 1")
    assert paper["protocol"].startswith("linear-probe (paper)") and paper["epochs"] == 2
    assert fast["linear_protocol"].startswith("small-dataset protocol") and fast["batch_size"] == 512  # its default

    out = tmp_path / "ft"
    ft = run_cli(
        f"finetune {run} {data} --epochs 1 --batch-size 8 --trainable layer4 --output {shlex.quote(str(out))}"
    )
    assert ft["num_classes"] == 2 and "layer1" in ft["frozen_modules"]
    assert (out / "finetune.json").is_file() and (out / "model.safetensors").is_file()
    reloaded = load_backbone(out, num_classes=2)  # a timm export, trained head included (strict load)
    assert reloaded.get_classifier().out_features == 2


def test_cli_knn_named_spec_small_objects(tmp_path):
    """``--dataset small_objects`` with a small local copy, split slices and ``--holdout``."""
    from hub_ccrop.synthetic import small_objects_dir

    torch.manual_seed(0)
    run = shlex.quote(str(write_run(tmp_path, timm.create_model("resnet18", num_classes=0))))
    root = shlex.quote(str(small_objects_dir(tmp_path / "data", train=64, test=32)))
    data = f"--dataset small_objects --data-dir {root} --num-workers 0 --no-progress --batch-size 16"
    out = tmp_path / "so"
    result = run_cli(f"eval knn {run} {data} --train-split train[:48] --test-split test[-16:] --output {out}")
    saved = json.loads((out / "eval_knn.json").read_text())
    assert saved["top1"] == result["top1"] and saved["dataset"] == "small_objects"
    assert (saved["train_split"], saved["test_split"]) == ("train[:48]", "test[-16:]")
    assert saved["num_train"] == 48 and saved["num_test"] == 16
    assert saved["num_classes"] == 10  # from the spec
    assert saved["image_column"] == "image" and saved["label_column"] == "label"

    held = run_cli(f"eval knn {run} {data} --holdout 16 --output {out}")
    assert (held["train_split"], held["test_split"]) == ("train[:-16]", "train[-16:]")
    assert held["holdout"] == 16 and held["num_train"] == 48 and held["num_test"] == 16


def test_cli_dataset_resolution_and_label_checks(tmp_path, tiny_parquet):
    """``--dataset`` goes through ``data.get_spec``; unlabeled or out-of-range labels are clear errors."""
    import pyarrow.parquet as pq

    from hub_ccrop.commands.evaluate import _classification_spec, parse_data_files

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))

    def spec_of(command: str):
        return _classification_spec(parser.parse_args(["eval", "knn", "RUN", *shlex.split(command)]))

    hub = spec_of("--dataset org/name --image-column img --label-column fine --config-name c")
    assert (hub.hub_id, hub.image_column, hub.label_column, hub.config) == ("org/name", "img", "fine", "c")
    cifar = spec_of("--dataset cifar10 --data-dir /some/cifar10 --holdout 5000")
    assert cifar.data_dir == "/some/cifar10" and cifar.num_classes == 10 and cifar.image_column == "img"
    assert (cifar.train_split, cifar.test_split) == ("train[:-5000]", "train[-5000:]")
    sliced = spec_of("--dataset cifar10 --holdout 5000 --train-split train[:1000]")
    assert (sliced.train_split, sliced.test_split) == ("train[:1000]", "train[-5000:]")
    folder = spec_of(f"--dataset {shlex.quote(str(tiny_parquet))}")
    assert folder.data_dir == str(tiny_parquet) and folder.num_classes is None
    with pytest.raises(KeyError, match="unknown dataset"):
        spec_of("--dataset no-such-dataset")
    assert parse_data_files(["train=a.parquet", "b.parquet", "test=c.parquet"]) == {
        "train": ["a.parquet", "b.parquet"],
        "test": ["c.parquet"],
    }

    run = shlex.quote(str(write_run(tmp_path, timm.create_model("resnet18", num_classes=0))))
    data = f"--dataset {shlex.quote(str(tiny_parquet))} --image-column img --num-workers 0 --no-progress"
    with pytest.raises(KeyError, match="no label column"):
        run_cli(f"eval knn {run} {data} --label-column nothing")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for split in ("train", "test"):
        table = pq.read_table(tiny_parquet / f"{split}.parquet").drop_columns(["label"])
        pq.write_table(table, unlabeled / f"{split}.parquet")
    with pytest.raises(UserError, match="has no labels"):  # no label column
        run_cli(f"eval knn {run} --dataset {shlex.quote(str(unlabeled))} --image-column img --num-workers 0")
    with pytest.raises(UserError, match="unlabeled"):  # a label column with -1 rows
        run_cli(f"eval knn {run} --dataset {shlex.quote(str(unlabeled))} --image-column img --num-workers 0 "
                "--test-split test")
    with pytest.raises(UserError, match="num_classes"):
        run_cli(f"eval knn {run} {data} --num-classes 1")


def test_cli_rows_decoded_with_decode_image(tmp_path):
    """Items are ``(transform(decode_image(image, id)), id, label)``: odd modes become RGB, and a bad
    image names its sample id."""
    from PIL import Image

    from hub_ccrop.data import BadImageError
    from hub_ccrop.evaluate.transforms import _LabeledRows, classification_transform

    gray = Image.new("L", (8, 8), 7)
    rows = [
        {"id": 40, "image": gray, "label": 1},
        {"id": 41, "image": {"bytes": b"not an image", "path": "broken.png"}, "label": 0},
    ]
    cfg = {"input_size": (3, 8, 8), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0}
    dataset = _LabeledRows(rows, classification_transform(cfg, train=False))
    image, sample_id, label = dataset[0]
    assert image.shape == (3, 8, 8) and (sample_id, label) == (40, 1)
    torch.testing.assert_close(image, torch.full((3, 8, 8), 7 / 255))
    with pytest.raises(BadImageError, match=r"sample id 41.*broken\.png"):
        dataset[1]

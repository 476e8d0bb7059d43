"""Detection (issue 6): Faster R-CNN + FPN on a timm backbone, Hub-format data, mAP, detectron2 export."""

from __future__ import annotations

import argparse
import json
import pickle
import shlex

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from hub_ccrop.commands.detection import add_cli
from hub_ccrop.evaluate.detection import (
    DetectionDataset,
    TimmFPNBackbone,
    build_faster_rcnn,
    detection_collate,
    evaluate_detection,
    finetune_detection,
)
from hub_ccrop.evaluate.detectron2 import export_detectron2, from_detectron2, to_detectron2

COLORS = [(220, 40, 40), (40, 40, 220)]
# small RPN/ROI budgets and FPN width keep a CPU step well under a second
SMALL = dict(
    min_size=96,
    max_size=128,
    fpn_channels=64,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=64,
    box_detections_per_img=20,
)


def synthetic_detection(n: int = 8, size: int = 96, seed: int = 0) -> datasets.Dataset:
    """Gray images with 1-2 red (category 0) or blue (category 1) rectangles; COCO-style xywh boxes."""
    rng = np.random.default_rng(seed)
    images, objects = [], []
    for _ in range(n):
        pixels = np.full((size, size + 16, 3), 128, np.uint8)  # not square: boxes must not swap axes
        boxes, cats = [], []
        for _ in range(rng.integers(1, 3)):
            w, h = rng.integers(16, 40, size=2)
            x, y = rng.integers(0, size + 16 - w), rng.integers(0, size - h)
            cat = int(rng.integers(0, 2))
            pixels[y : y + h, x : x + w] = COLORS[cat]
            boxes.append([float(x), float(y), float(w), float(h)])
            cats.append(cat)
        images.append(Image.fromarray(pixels))
        objects.append({"bbox": boxes, "category": cats})
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=["red", "blue"])),
            },
        }
    )
    return datasets.Dataset.from_dict({"image": images, "objects": objects}, features=features)


def test_dataset_targets_and_collate():
    data = synthetic_detection(4)
    row = data[0]["objects"]
    ds = DetectionDataset(data)  # defaults: objects/bbox/category, xywh, offset 1
    image, target = ds[0]
    assert (
        image.shape == (3, 96, 112) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    )
    x, y, w, h = row["bbox"][0]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert target["labels"].tolist() == [c + 1 for c in row["category"]]  # 0 is the background
    assert int(target["image_id"]) == 0
    images, targets = detection_collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and int(targets[1]["image_id"]) == 1
    # flips move the boxes with the pixels
    torch.manual_seed(0)
    flipped = DetectionDataset(data, train=True)
    for _ in range(4):
        img, tgt = flipped[0]
        x0, y0, x1, y1 = tgt["boxes"][0].round().long().tolist()
        patch = img[:, y0:y1, x0:x1]
        assert (patch - patch[:, :1, :1]).abs().max() < 1e-6  # one flat color inside the box


def test_dataset_column_mapping_top_level_normalized_cxcywh():
    data = datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (100, 50))],
            "boxes": [[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.0, 0.1]]],  # second one is degenerate
            "cls": [[3, 4]],
        }
    )
    ds = DetectionDataset(
        data,
        image_column="img",
        objects_column=None,
        bbox_key="boxes",
        category_key="cls",
        box_format="cxcywh",
        normalized=True,
        category_offset=0,
    )
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[40.0, 15.0, 60.0, 35.0]]))
    assert target["labels"].tolist() == [3]


def test_dataset_decodes_with_decode_image():
    """Images go through ``data.decode_image``: odd modes become RGB, bad images name the row id."""
    from hub_ccrop.data import BadImageError

    data = [
        {"image": Image.new("L", (20, 10), 51), "objects": {"bbox": [[1.0, 1.0, 5.0, 5.0]], "category": [0]}},
        {"image": {"bytes": b"oops", "path": "bad.jpg"}, "objects": {"bbox": [], "category": []}},
    ]
    image, target = DetectionDataset(data)[0]
    assert image.shape == (3, 10, 20)
    torch.testing.assert_close(image, torch.full((3, 10, 20), 51 / 255))
    assert target["labels"].tolist() == [1]
    with pytest.raises(BadImageError, match=r"sample id 1.*bad\.jpg"):
        DetectionDataset(data)[1]


def test_frozen_bn_and_frozen_stages():
    body = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    model = build_faster_rcnn(body, 2, trainable_stages=3, min_size=64, max_size=96)
    fpn_backbone = model.backbone
    assert isinstance(fpn_backbone, TimmFPNBackbone) and fpn_backbone.out_channels == 256
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn_backbone.modules())
    assert type(fpn_backbone.body.bn1).__module__ == "torchvision.ops.misc"  # torchvision's FrozenBatchNorm2d
    assert (
        not fpn_backbone.body.conv1.weight.requires_grad
        and not fpn_backbone.body.layer1[0].conv1.weight.requires_grad
    )
    assert fpn_backbone.body.layer2[0].conv1.weight.requires_grad
    feats = fpn_backbone(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"] and all(f.shape[1] == 256 for f in feats.values())
    trainable = build_faster_rcnn(
        timm.create_model("resnet18", features_only=True),
        2,
        out_indices=(1, 2, 3, 4),
        frozen_bn=False,
        trainable_stages=5,
    )
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainable.backbone.modules())
    assert all(p.requires_grad for p in trainable.backbone.parameters())


def test_faster_rcnn_finetune_and_map_on_cpu(tmp_path):
    from accelerate import Accelerator

    torch.manual_seed(0)
    data = synthetic_detection(8)
    body = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    model = build_faster_rcnn(body, 2, **SMALL)
    train = DataLoader(
        DetectionDataset(data, train=True), batch_size=4, shuffle=True, collate_fn=detection_collate
    )
    test = DataLoader(DetectionDataset(data), batch_size=4, collate_fn=detection_collate)
    head_before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    result = finetune_detection(
        model,
        train,
        test,
        steps=3,
        lr=0.01,
        warmup_steps=2,
        accelerator=Accelerator(cpu=True),
        progress=False,
    )
    assert len(result["loss_history"]) == 3 and np.isfinite(result["final_loss"])
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= result[
        "loss_history"
    ][0].keys()
    assert not torch.equal(model.roi_heads.box_predictor.cls_score.weight, head_before)  # backward + step ran
    metrics = result["metrics"]
    assert metrics["num_images"] == 8
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert metrics[key] is None or 0.0 <= metrics[key] <= 100.0
    assert metrics["map"] is not None  # ground truth exists, so mAP is defined
    again = evaluate_detection(model, test, progress=False)
    assert again["map"] == pytest.approx(metrics["map"])


@pytest.mark.slow
def test_cli_finetune_detection_run_folder(tmp_path):
    from safetensors.torch import save_file

    root = tmp_path / "data"
    root.mkdir()
    synthetic_detection(8).to_parquet(str(root / "train.parquet"))
    synthetic_detection(4, seed=1).to_parquet(str(root / "test.parquet"))
    run = tmp_path / "run"
    run.mkdir()
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(run / "backbone.safetensors"))
    (run / "run.json").write_text(json.dumps({"model": "resnet18", "model_args": {}, "input_size": 96}))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    files = " ".join(
        shlex.quote(f"--data-files={split}={root / split}.parquet") for split in ("train", "test")
    )
    command = f"finetune-detection {shlex.quote(str(run))} --dataset parquet {files} --steps 2 --batch-size 4"
    command += " --warmup-steps 1 --min-size 96 --max-size 128 --num-workers 0 --no-progress"
    args = parser.parse_args(shlex.split(command))
    result = args.func(args)
    assert result["num_categories"] == 2  # from the ClassLabel feature
    assert result["image_column"] == "image" and result["objects_column"] == "objects"
    saved = json.loads((run / "detection" / "detection.json").read_text())
    assert saved["metrics"]["num_images"] == 4 and saved["steps"] == 2
    assert (run / "detection" / "detector.safetensors").is_file()


# ------------------------------------------------------------------------------------ detectron2 export


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "resnet18",
            {
                "stem.conv1.weight": (64, 3, 7, 7),
                "stem.conv1.norm.running_var": (64,),
                "res2.0.conv1.weight": (64, 64, 3, 3),
                "res2.1.conv2.norm.bias": (64,),
                "res3.0.shortcut.weight": (128, 64, 1, 1),
                "res3.0.shortcut.norm.running_mean": (128,),
                "res5.1.conv2.weight": (512, 512, 3, 3),
            },
        ),
        (
            "resnet50",
            {
                "stem.conv1.weight": (64, 3, 7, 7),
                "res2.0.conv3.weight": (256, 64, 1, 1),
                "res2.0.shortcut.weight": (256, 64, 1, 1),
                "res4.5.conv2.norm.weight": (256,),
                "res5.0.shortcut.norm.running_var": (2048,),
                "res5.2.conv3.weight": (2048, 512, 1, 1),
            },
        ),
    ],
)
def test_detectron2_export_names_shapes_round_trip(tmp_path, name, expected):
    model = timm.create_model(name, num_classes=0)
    path = export_detectron2(model, tmp_path / f"{name}.pkl")
    with path.open("rb") as f:
        payload = pickle.load(f)
    assert payload["matching_heuristics"] is True and payload["__author__"] == "hub_ccrop"
    weights = payload["model"]
    for key, shape in expected.items():
        assert weights[key].shape == shape, key
        assert isinstance(weights[key], np.ndarray)
    assert all(k.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for k in weights)
    assert not any("num_batches_tracked" in k or "layer" in k or ".bn" in k for k in weights)
    original = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    restored = from_detectron2(weights)
    assert restored.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(restored[k], v), k


def test_detectron2_export_rejects_unknown_keys_and_drops_head():
    with pytest.raises(ValueError, match="not a plain ResNet"):
        to_detectron2(timm.create_model("resnet18d", num_classes=0).state_dict())  # deep stem
    with_head = to_detectron2(timm.create_model("resnet18", num_classes=10).state_dict())
    assert not any(k.startswith("fc") or "fc." in k for k in with_head)
    with pytest.warns(UserWarning, match="stem"):
        state = timm.create_model("resnet18", num_classes=0).state_dict()
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
        to_detectron2(state)

"""Backbones: CIFAR-stem ResNets registered with timm, create_backbone, save_for_hf round trip."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from hub_ccrop.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR_MODELS,
    CifarResNet,
    create_backbone,
    feature_dim,
    prepare_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_are_registered_with_timm(name: str) -> None:
    assert timm.is_model(name)
    assert name in timm.list_models("*cifar*")
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (3, 32, 32)
    assert tuple(cfg.mean) == CIFAR10_MEAN and tuple(cfg.std) == CIFAR10_STD
    assert not cfg.url and not cfg.hf_hub_id and not cfg.has_weights
    assert cfg.license == "apache-2.0"


def test_resnet18_cifar_stem_and_shapes() -> None:
    model = timm.create_model("resnet18_cifar", num_classes=0)
    assert isinstance(model, CifarResNet)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.out_channels == 64
    assert isinstance(model.maxpool, nn.Identity)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [info["reduction"] for info in model.feature_info] == [1, 1, 2, 4, 8]
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 512, 4, 4)
    assert model(x).shape == (2, 512)
    assert feature_dim(model) == 512
    # same weights layout as timm's resnet18 apart from the stem conv
    reference = {k: v.shape for k, v in timm.create_model("resnet18", num_classes=0).state_dict().items()}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours.keys() == reference.keys()
    assert [k for k in ours if ours[k] != reference[k]] == ["conv1.weight"]


def test_other_cifar_models() -> None:
    r50 = create_backbone("resnet50_cifar")
    assert feature_dim(r50) == 2048
    assert r50.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 2048, 4, 4)
    r34 = create_backbone("resnet34_cifar")
    assert feature_dim(r34) == 512 and [len(getattr(r34, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_tiny_model_is_cheap() -> None:
    model = create_backbone("resnet_tiny_cifar")
    assert sum(p.numel() for p in model.parameters()) < 400_000
    assert model.conv1.out_channels == 16 and model.conv1.stride == (1, 1)
    assert feature_dim(model) == 128
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 128, 8, 8)
    assert model(x).shape == (2, 128)


def test_create_backbone_any_timm_model() -> None:
    resnet = create_backbone("resnet18")
    assert resnet.num_classes == 0
    assert resnet(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert feature_dim(vit) == 192
    x = torch.randn(2, 3, 32, 32)
    assert vit(x).shape == (2, 192)
    assert vit.forward_features(x).shape == (2, 1 + 16, 192)  # tokens (class + 4x4 patches)


def test_create_backbone_rejects_classifier() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("resnet_tiny_cifar", num_classes=10)
    assert create_backbone("resnet_tiny_cifar", num_classes=0).num_classes == 0


def test_cifar_resnet_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="stem_width"):
        timm.create_model("resnet_tiny_cifar", stem_width=15)
    with pytest.raises(ValueError, match="output_stride"):
        timm.create_model("resnet_tiny_cifar", output_stride=16)


def test_save_for_hf_round_trip_is_bit_identical(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_backbone("resnet_tiny_cifar", stem_width=32)  # a non-default architecture argument
    for module in model.modules():  # non-trivial BatchNorm statistics too
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "resnet_tiny_cifar"
    assert config["model_args"]["stem_width"] == 32

    restored = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert isinstance(restored, CifarResNet)
    assert restored.num_classes == 0 and restored.conv1.out_channels == 32
    expected, actual = model.state_dict(), restored.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), restored.eval()(x))
    # and through create_backbone
    again = create_backbone(f"local-dir:{tmp_path}", pretrained=True)
    assert torch.equal(again.eval()(x), model(x))


def test_prepare_model_options() -> None:
    model = nn.Sequential(create_backbone("resnet_tiny_cifar"), nn.BatchNorm1d(128))
    plain = prepare_model(model)
    assert plain is model
    converted = prepare_model(model, sync_bn=True, channels_last=True)
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert converted[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # without a process group SyncBatchNorm behaves as BatchNorm (CPU ok)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    assert converted(x).shape == (4, 128)

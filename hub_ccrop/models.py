"""Backbones: any timm model, plus CIFAR-stem ResNets registered with timm.

The CIFAR-stem ResNets (3x3 conv stride 1, no max-pool; for 32-96 px images) are registered with timm's
model registry when this module is imported, so after ``import hub_ccrop.models``::

    timm.create_model("resnet18_cifar")                         # a fresh model
    timm.create_model("local-dir:DIR", pretrained=True)         # a folder written by timm's save_for_hf
    timm.create_model("hf-hub:ORG/NAME", pretrained=True)       # the same folder pushed to the Hub

Everything needed to rebuild a model lives in its constructor arguments (``CifarResNet`` is a subclass of
timm's ``ResNet`` whose constructor builds the CIFAR stem), so the ``config.json`` that timm writes
(architecture + ``model_args``) is enough to restore it.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from hub_ccrop.data import CIFAR10_MEAN, CIFAR10_STD
from hub_ccrop.distributed import convert_cpu_sync_bn

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR_MODELS",
    "CifarResNet",
    "create_backbone",
    "feature_dim",
    "prepare_model",
]



class CifarResNet(ResNet):
    """timm ``ResNet`` with the CIFAR stem: one 3x3 conv, stride 1, no max-pool (output stride 8).

    ``stem_width`` is the width of that conv (64 as in the paper); every other argument is timm's
    ``ResNet`` argument (``block``, ``layers``, ``channels``, ``global_pool``, ``drop_path_rate``, ...).
    The parameter names are timm's (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        *,
        in_chans: int = 3,
        stem_width: int = 64,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        if stem_width < 2 or stem_width % 2:
            raise ValueError(f"stem_width must be an even number >= 2, got {stem_width}")
        if output_stride != 32:
            raise ValueError("CifarResNet supports only output_stride=32 (no dilation)")
        # timm's deep stem is the one whose output width follows stem_width (stem_width * 2); build it, then
        # replace its convs by the single CIFAR conv. bn1/act1 and the stages are timm's, unchanged.
        super().__init__(
            block, layers, in_chans=in_chans, stem_width=stem_width // 2, stem_type="deep", **kwargs
        )
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.conv1 = nn.Conv2d(
            in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False, **factory
        )
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # timm's reductions assume a stride-4 stem; this stem has stride 1.
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // 4)


def _cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


# Read by timm's ``register_model`` (it looks up ``default_cfgs`` in the module of each entrypoint).
default_cfgs = generate_default_cfgs(
    {
        "resnet18_cifar": _cifar_cfg(),
        "resnet34_cifar": _cifar_cfg(),
        "resnet50_cifar": _cifar_cfg(),
        "resnet_tiny_cifar": _cifar_cfg(),
    }
)


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 with the CIFAR stem (the paper's backbone for CIFAR/STL/Tiny ImageNet); 512 features."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_cifar_resnet("resnet18_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-34 with the CIFAR stem; 512 features."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_cifar_resnet("resnet34_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-50 with the CIFAR stem; 2048 features."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_cifar_resnet("resnet50_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_tiny_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """A tiny CIFAR-stem ResNet for CPU tests and the quickstart: one BasicBlock per stage, widths
    16-32-64-128 (about 0.3M parameters); 128 features."""
    model_args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)
    return _create_cifar_resnet("resnet_tiny_cifar", pretrained, **dict(model_args, **kwargs))


CIFAR_MODELS = ("resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "resnet_tiny_cifar")


def create_backbone(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``).

    ``name`` is any ``timm.create_model`` name, including the CIFAR-stem ResNets above, ``hf-hub:ORG/NAME``
    and ``local-dir:PATH``. ``model(x)`` gives pooled features ``[B, feature_dim(model)]``;
    ``model.forward_features(x)`` gives the last feature map (``[B, C, h, w]`` for CNNs, tokens for ViTs).
    Extra ``kwargs`` go to ``timm.create_model`` and are recorded by timm for ``save_for_hf``.
    """
    num_classes = kwargs.pop("num_classes", 0)
    if num_classes:
        raise ValueError(
            f"create_backbone builds feature extractors (num_classes=0), got num_classes={num_classes}"
        )
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


def feature_dim(model: nn.Module) -> int:
    """Width of ``model(x)``'s pooled features (timm's ``head_hidden_size``, else ``num_features``)."""
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(model).__name__} has no 'num_features'; is it a timm model?")


def prepare_model(module: nn.Module, *, sync_bn: bool = False, channels_last: bool = False,
                  device_type: str = "cuda") -> nn.Module:
    """Runtime options for a whole training module (an ``SSLMethod``, so heads and momentum encoders too).

    ``sync_bn`` converts every BatchNorm to ``nn.SyncBatchNorm`` (statistics over all processes), or, for
    ``device_type="cpu"`` where torch's refuses to run, to ``CPUSyncBatchNorm`` (the same result over gloo).
    ``channels_last`` stores conv weights in NHWC, which the inputs should match
    (``x.to(memory_format=torch.channels_last)``). Returns the module to use.
    """
    if sync_bn:
        module = convert_cpu_sync_bn(module) if device_type == "cpu" else nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module

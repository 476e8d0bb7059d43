"""Loading a pretrained backbone (run folder, timm export, ``hf-hub:``, ``timm:``), its data config, and
the inference helpers every evaluation shares (device, frozen mode, one forward with autocast)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import hub_ccrop.models  # noqa: F401  (registers the CIFAR-stem ResNets, e.g. resnet18_cifar, with timm)
from hub_ccrop.inference import autocast
from hub_ccrop.run_info import RUN_FILE, RunInfo


@contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradients inside the block; the previous state is restored afterwards."""
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.train(was_training)



def _forward(
    model: nn.Module,
    images: Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
) -> Tensor:
    """``model(images)`` on ``device`` with optional autocast/channels_last, as float32."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, autocast_dtype):
        out = model(images)
    return out.float()



def load_backbone(source: str | Path, *, num_classes: int = 0, **timm_kwargs: Any) -> nn.Module:
    """Load a pretrained backbone through timm.

    ``source`` is (a) a run folder (``run.json`` + ``backbone.safetensors``), (b) a local timm export
    (``config.json`` + ``model.safetensors``) or ``local-dir:DIR``, (c) ``hf-hub:ORG/NAME``, or
    (d) ``timm:NAME`` for timm's own pretrained weights (baselines). ``num_classes > 0`` adds a new,
    randomly initialized head; ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``features_only=True,
    out_indices=(1, 2, 3, 4)``, ``drop_path_rate``). Weights are read from safetensors (or timm's
    loaders). The model's ``pretrained_cfg`` carries the run's input size and mean/std, so
    ``backbone_data_config(model)`` gives the matching preprocessing.
    """
    features_only = bool(timm_kwargs.get("features_only", False))
    if features_only and num_classes:
        raise ValueError("load_backbone: features_only=True and num_classes > 0 are exclusive")
    head = {} if features_only else {"num_classes": num_classes}
    src = str(source)
    if src.startswith(("hf-hub:", "local-dir:")):
        return timm.create_model(src, pretrained=True, **head, **timm_kwargs)
    if src.startswith("timm:"):
        return timm.create_model(src[len("timm:") :], pretrained=True, **head, **timm_kwargs)
    path = Path(src)
    if (path / RUN_FILE).is_file():
        run = RunInfo.load(path)
        weights = path / "backbone.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found (a run folder needs its backbone.safetensors)")
        # the run's backbone has no classifier: load it strictly with num_classes=0, then add the head
        overlay = {"file": str(weights), "num_classes": 0, **run.data_config()}
        kwargs = {**run.model_args, **timm_kwargs, "num_classes": 0}
        model = timm.create_model(run.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        if num_classes:
            model.reset_classifier(num_classes)
        return model
    if (path / "config.json").is_file():
        return timm.create_model(f"local-dir:{path}", pretrained=True, **head, **timm_kwargs)
    raise FileNotFoundError(
        f"{source!r} is not a run folder (run.json), a timm export (config.json), hf-hub:ORG/NAME or timm:NAME"
    )


def backbone_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``) of a model."""
    return timm.data.resolve_model_data_config(model)


"""Detectron2 export: the key renaming of MoCo's ``detection/convert-pretrain-to-detectron2.py`` for ResNets."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hub_ccrop.evaluate.backbone import load_backbone

# ----------------------------------------------------------------------------------------------------
# detectron2 export (MoCo's key renaming)

_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
_TO_D2 = [
    (re.compile(r"^conv1\.weight$"), "stem.conv1.weight"),
    (re.compile(r"^bn1\.(\w+)$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"), "res{n}.\\2.conv\\3.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"), "res{n}.\\2.conv\\3.norm.\\4"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"), "res{n}.\\2.shortcut.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"), "res{n}.\\2.shortcut.norm.\\3"),
]
_FROM_D2 = [
    (re.compile(r"^stem\.conv1\.weight$"), "conv1.weight"),
    (re.compile(r"^stem\.conv1\.norm\.(\w+)$"), r"bn1.\1"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.weight$"), "layer{n}.\\2.conv\\3.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$"), "layer{n}.\\2.bn\\3.\\4"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.weight$"), "layer{n}.\\2.downsample.0.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$"), "layer{n}.\\2.downsample.1.\\3"),
]


def _rename(key: str, rules: list[tuple[re.Pattern, str]], stage_shift: int) -> str | None:
    """Apply the first matching rule; ``{n}`` in a template is the captured stage number + ``stage_shift``."""
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            if "{n}" in template:
                template = template.replace("{n}", str(int(match.group(1)) + stage_shift))
            return match.expand(template)
    return None


def to_detectron2(state_dict: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Rename a timm/torchvision ResNet state dict to detectron2's ResNet names (numpy arrays).

    ``conv1 -> stem.conv1``, ``bn1 -> stem.conv1.norm``, ``layerN -> res(N+1)``, ``bnK -> convK.norm``,
    ``downsample.0 -> shortcut``, ``downsample.1 -> shortcut.norm`` (MoCo's converter). Classifier weights
    and ``num_batches_tracked`` are dropped; any other key (SE blocks, deep stems, ...) is an error.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith(_CLASSIFIER_PREFIXES):
            continue
        new = _rename(key, _TO_D2, +1)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value.detach().cpu().numpy()
    if unknown:
        raise ValueError(f"not a plain ResNet (detectron2 has no names for): {unknown[:8]}")
    if "stem.conv1.weight" in out and out["stem.conv1.weight"].shape[-1] != 7:
        warnings.warn(
            "the stem conv is not 7x7 (a CIFAR stem?): detectron2's standard ResNet stem will not match it",
            stacklevel=2,
        )
    return out


def from_detectron2(model: Mapping[str, Any]) -> dict[str, Tensor]:
    """Inverse of ``to_detectron2``: detectron2 ResNet names back to timm names (torch tensors)."""
    out = {}
    for key, value in model.items():
        new = _rename(key, _FROM_D2, -1)
        if new is None:
            raise ValueError(f"unknown detectron2 key {key!r}")
        out[new] = torch.as_tensor(np.asarray(value))
    return out


def export_detectron2(source: str | Path | nn.Module, output: str | Path) -> Path:
    """Write a backbone (``load_backbone`` source or module) as a detectron2 ``.pkl``.

    The file holds ``{"model": {name: ndarray}, "__author__": "hub_ccrop", "matching_heuristics": True}``,
    usable as ``MODEL.WEIGHTS`` with detectron2's R-50 (or R-18/R-34 with ``RESNETS.DEPTH`` and
    ``RES2_OUT_CHANNELS: 64``) configs, like MoCo's converted checkpoints.
    """
    module = source if isinstance(source, nn.Module) else load_backbone(source)
    payload = {
        "model": to_detectron2(module.state_dict()),
        "__author__": "hub_ccrop",
        "matching_heuristics": True,
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as f:
        pickle.dump(payload, f)
    return output


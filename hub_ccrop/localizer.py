"""The backbone that draws the boxes: the one being trained (the paper's), or another one (``crop.localizer``).

A stronger localizer than a backbone still learning, for example a DINO-pretrained ViT, whose attention is
known to find objects, makes better boxes from the first epoch on: with one, ``crop.warmup_epochs`` can
be 0 (a pass runs before the first epoch). It is used only for the localization passes and their pictures,
never trained. It is loaded with :func:`hub_ccrop.evaluate.backbone.load_backbone`: a run folder, a timm export
folder, ``hf-hub:ORG/NAME`` or ``timm:NAME``, and gets the images at its own input size and normalization.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_ccrop.errors import UserError
from hub_ccrop.evaluate.backbone import backbone_data_config, load_backbone
from hub_ccrop.localize import TRAINED_BACKBONE, check_localizer_source

__all__ = ["TRAINED_BACKBONE", "Localizer", "box_settings", "check_localizer_source", "external_localizer",
           "network_name", "pass_localizer", "table_metadata"]


@dataclass
class Localizer:
    """A backbone for the passes and how the passes' images reach it.

    Pass images arrive normalized with the data's ``mean``/``std`` at the data's size; :meth:`prepare` gives
    an external localizer its own normalization and input ``size`` (the backbone being trained takes them
    as they are). Boxes are fractions of the image, so they do not depend on the size the localizer saw.
    """

    model: nn.Module
    source: str = TRAINED_BACKBONE
    size: tuple[int, int] | None = None
    scale: Tensor | None = None  # [3]: localizer input = data input * scale + shift, per channel
    shift: Tensor | None = None

    @property
    def external(self) -> bool:
        return self.source != TRAINED_BACKBONE

    def prepare(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images normalized for the data -> the localizer's input."""
        if not self.external:
            return images
        if self.size is not None and tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images.float(), size=self.size, mode="bilinear", align_corners=False, antialias=True)
        scale = self.scale.to(images.device, images.dtype).view(1, 3, 1, 1)
        shift = self.shift.to(images.device, images.dtype).view(1, 3, 1, 1)
        return images * scale + shift

    def metadata(self) -> dict[str, Any]:
        """What a box table records about the localizer."""
        meta: dict[str, Any] = {"localizer": self.source, "localizer_network": network_name(self.model)}
        if self.external:
            meta["localizer_input_size"] = list(self.size) if self.size else None
        return meta


def network_name(model: nn.Module) -> str:
    """The timm architecture name of ``model`` (its class name when it has no timm config)."""
    model = getattr(model, "_orig_mod", model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


@lru_cache(maxsize=2)
def _load(source: str, device: str) -> nn.Module:
    try:
        model = load_backbone(source)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # missing files, offline Hub, bad config, other weights
        raise UserError(f"crop.localizer: cannot load {source!r} ({type(e).__name__}: {e}); give a run folder, "
                        "a timm export folder or hf-hub:ORG/NAME that loads offline") from e
    return model.to(device).eval().requires_grad_(False)


def external_localizer(source: str, mean: tuple[float, ...], std: tuple[float, ...],
                       device: torch.device | str = "cpu") -> Localizer:
    """Load ``source`` (once per process and device) for images normalized with ``mean``/``std``."""
    model = _load(source, str(device))
    cfg = backbone_data_config(model)
    data_mean, data_std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    own_mean = torch.tensor(cfg["mean"], dtype=torch.float64)
    own_std = torch.tensor(cfg["std"], dtype=torch.float64)
    # x_own = (x_data * data_std + data_mean - own_mean) / own_std: one affine map per channel
    scale, shift = data_std / own_std, (data_mean - own_mean) / own_std
    size = tuple(int(s) for s in cfg["input_size"][-2:])
    return Localizer(model, source, size, scale.float(), shift.float())


def pass_localizer(source: str | None, trained: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device | str) -> Localizer:
    """The localizer of a pass: ``trained`` (the backbone being trained) when ``source`` is None, else ``source``."""
    if source is None:
        return Localizer(trained)
    return external_localizer(source, mean, std, device)


def box_settings(crop: Any) -> dict[str, Any]:
    """The box keyword arguments of :func:`hub_ccrop.localize.localize_boxes` from a recipe's ``crop`` section."""
    return {"k": crop.k, "alignment": crop.heatmap_alignment, "rule": crop.box_rule, "flip": crop.heatmap_flip}


def table_metadata(crop: Any, localizer: Localizer) -> dict[str, Any]:
    """What a pass's box table records about how its boxes were made."""
    return {"k": crop.k, "heatmap_alignment": crop.heatmap_alignment, "box_rule": crop.box_rule,
            "heatmap_flip": crop.heatmap_flip, **localizer.metadata()}

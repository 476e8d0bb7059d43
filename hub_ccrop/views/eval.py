"""The one eval transform (un-augmented, normalized): localization passes, the kNN monitor, the kNN /
linear CLI and ``hub-ccrop show`` see the same pixels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import functional as TF

from hub_ccrop.data import DatasetSpec
from hub_ccrop.views.rows import SkipCounter, decode_rows, max_side_for

__all__ = ["EvalCollate", "eval_image"]


def eval_image(img: Tensor, size: int | tuple[int, int], resize: int | None = None) -> Tensor:
    """The one eval transform, uint8 ``[(B,) 3, H, W]`` -> uint8 ``[(B,) 3, *size]``: localization passes, the
    kNN monitor, the kNN/linear CLI and ``hub-ccrop show`` all call it (antialiased tensor resizes).

    ``resize=None``: the whole image resized to ``size`` (an int: squared) (boxes cover the whole image;
    small datasets at native size pass through). ``resize``: shorter side to ``resize``, then a centre
    crop of ``size`` (ImageNet-style classification eval, e.g. 256 / 224).
    """
    hw = [size, size] if isinstance(size, int) else list(size)
    if resize is not None:
        return TF.center_crop(TF.resize(img, resize, antialias=True), hw)
    if list(img.shape[-2:]) != hw:
        img = TF.resize(img, hw, antialias=True)
    return img


class EvalCollate:
    """rows -> ``(images, ids, labels)`` with the un-augmented eval transform, normalized.

    ``purpose="classify"`` (kNN / linear eval): native size for small datasets, resize
    ``eval_resize[0]`` + center crop ``eval_resize[1]`` for ImageNet-like ones.
    ``purpose="localize"`` (heatmaps -> boxes, which must cover the whole image): native size, or the
    whole image resized to ``eval_resize[1]`` squared (the official ``Resize((224, 224))``).
    Images not at the native size are resized to ``spec.image_size`` squared.
    """

    def __init__(self, spec: DatasetSpec, *, purpose: str = "classify", strict: bool = False) -> None:
        if purpose not in ("classify", "localize"):
            raise ValueError(f"purpose must be 'classify' or 'localize', got {purpose!r}")
        self.spec = spec
        self.purpose = purpose
        self.strict = strict
        self.skipped = SkipCounter()
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_side = max_side_for(spec)

    @property
    def output_size(self) -> int:
        return self.spec.image_size if self.spec.eval_resize is None else self.spec.eval_resize[1]

    def transform(self, img: Tensor) -> Tensor:
        """One uint8 ``[3, H, W]`` image (or a ``[B, 3, H, W]`` batch) -> uint8 ``[3, S, S]`` (``[B, 3, S, S]``),
        by :func:`eval_image`."""
        crop = self.spec.eval_resize is not None and self.purpose == "classify"
        return eval_image(img, self.output_size, self.spec.eval_resize[0] if crop else None)

    def prepare(self, images: Tensor) -> Tensor:
        """A uint8 ``[B, 3, H, W]`` batch of same-size images, on any device -> the normalized eval batch
        (what ``__call__`` makes from rows; used on device-resident images)."""
        x = self.transform(images).to(torch.float32).div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> tuple[Tensor, Tensor, Tensor]:
        images, ids, labels = decode_rows(
            rows, as_tensor=True, strict=self.strict, counter=self.skipped, max_side=self.max_side
        )
        s = self.output_size
        if not images:
            return torch.zeros(0, 3, s, s), ids, labels
        x = torch.stack([self.transform(im) for im in images]).to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std, ids, labels



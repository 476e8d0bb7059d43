"""Crop rectangles for every view group of a batch: ContrastiveCrop (Algorithm 1 inside each image's box)
or RandomResizedCrop (the whole image as the box, alpha 1), one mechanism for both
(:func:`hub_ccrop.crop.sample_crop_params`), per image and batched paths alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hub_ccrop.boxes import BoxTable
from hub_ccrop.choices import CROP_MODES
from hub_ccrop.crop import sample_crop_params
from hub_ccrop.recipe import ViewGroup

__all__ = ["CropSampler", "two_views"]


def two_views(scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3), **group: object) -> list[ViewGroup]:
    """The paper's view groups: two identical views per image (a recipe without ``views:``)."""
    return [ViewGroup(count=2, scale=[float(s) for s in scale], ratio=[float(r) for r in ratio], **group)]


class CropSampler:
    """Every crop's rectangle ``[num_crops, B, 4]`` ``(i, j, h, w)`` for a batch of ids and image sizes,
    group after group (``groups``: resolved :class:`~hub_ccrop.recipe.ViewGroup` s with scale and ratio).

    ``mode = "rcrop"``: RandomResizedCrop for every group (the warm-up); ``"ccrop"``: ContrastiveCrop with
    each id's box from ``box_table`` and ``alpha`` for the groups whose ``crop`` is ``"ccrop"`` (groups with
    ``crop: rcrop`` always crop the whole image). ``mode`` lives in shared memory, so persistent DataLoader
    workers see a switch made in the main process without rebuilding the loader.
    """

    def __init__(self, box_table: BoxTable | None, groups: Sequence[ViewGroup] | None = None, *, alpha: float = 1.0,
                 mode: str = "rcrop") -> None:  # fmt: skip
        self.box_table = box_table
        self.groups = list(groups) if groups is not None else two_views()
        for group in self.groups:
            if group.scale is None or group.ratio is None:
                raise ValueError("CropSampler needs resolved view groups (scale and ratio set): Recipe.view_groups")
        self.alpha = float(alpha)
        self._mode = torch.zeros((), dtype=torch.int64).share_memory_()
        self.mode = mode

    @property
    def counts(self) -> list[int]:
        return [group.count for group in self.groups]

    @property
    def mode(self) -> str:
        return CROP_MODES[int(self._mode)]

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in CROP_MODES:
            raise ValueError(f"mode must be one of {CROP_MODES}, got {value!r}")
        if value == "ccrop" and self.box_table is None:
            raise ValueError("mode 'ccrop' needs a box table")
        self._mode.fill_(CROP_MODES.index(value))

    def boxes(self, ids: Tensor, mode: str | None = None) -> Tensor:
        """The boxes a mode uses: the whole image (rcrop) or the table's (ccrop)."""
        if (mode or self.mode) == "rcrop":
            return torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(ids), 4)
        return self.box_table.lookup(ids)

    def __call__(self, ids: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = len(ids)
        if n == 0:
            return torch.zeros(sum(self.counts), 0, 4, dtype=torch.int64)
        mode = self.mode  # read the shared flag once per batch
        out = []
        for group in self.groups:
            ccrop = mode == "ccrop" and group.crop == "ccrop"
            params = sample_crop_params(
                self.boxes(ids, "ccrop" if ccrop else "rcrop").repeat(group.count, 1),
                sizes.repeat(group.count, 1),
                scale=group.scale,
                ratio=group.ratio,
                alpha=self.alpha if ccrop else 1.0,
                generator=generator,
            )
            out.append(params.view(group.count, n, 4))
        return out[0] if len(out) == 1 else torch.cat(out)

"""What the collate stage hands on: :class:`Views` (augmented crops, one tensor per view group), or,
for augmentation on the training device, a :class:`RawBatch` / :class:`EncodedBatch` (pixels or encoded
bytes plus every crop's rectangle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["EncodedBatch", "RawBatch", "Views"]


@dataclass
class Views:
    """The augmented views of a batch: one float tensor ``[count, B, 3, S, S]`` per view group, in the
    recipe's ``views:`` order (group 0 holds the global crops), the sample ids and labels ``[B]``.

    Groups of different sizes stay separate tensors; methods read ``crops`` (every crop ``[B, 3, S, S]``,
    group by group), ``global_crops`` / ``local_crops``, or the groups themselves.
    """

    groups: list[Tensor]
    ids: Tensor
    labels: Tensor

    @classmethod
    def of(cls, *crops: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> Views:
        """Views from plain ``[B, 3, S, S]`` crops; consecutive crops of one size form one group."""
        if not crops:
            raise ValueError("Views.of needs at least one crop")
        groups: list[list[Tensor]] = []
        for crop in crops:
            if groups and groups[-1][0].shape == crop.shape:
                groups[-1].append(crop)
            else:
                groups.append([crop])
        batch = crops[0].shape[0]
        none = torch.full((batch,), -1, dtype=torch.int64)
        return cls([torch.stack(g) for g in groups], none if ids is None else ids, none if labels is None else labels)

    @property
    def crops(self) -> list[Tensor]:
        return [crop for group in self.groups for crop in group.unbind(0)]

    @property
    def counts(self) -> list[int]:
        return [group.shape[0] for group in self.groups]

    @property
    def num_crops(self) -> int:
        return sum(self.counts)

    @property
    def num_global(self) -> int:
        return self.groups[0].shape[0]

    @property
    def global_crops(self) -> list[Tensor]:
        return list(self.groups[0].unbind(0))

    @property
    def local_crops(self) -> list[Tensor]:
        return self.crops[self.num_global :]

    @property
    def batch_size(self) -> int:
        return self.groups[0].shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Views:
        """Crops to ``device``; ids and labels stay where they are (the host: the batch seed reads the ids)."""
        return Views([g.to(device, non_blocking=non_blocking) for g in self.groups], self.ids, self.labels)

    def pin_memory(self) -> Views:
        return Views([g.pin_memory() for g in self.groups], self.ids, self.labels)


class RawBatch(NamedTuple):
    """Decoded images and every crop's rectangle, before any pixel op (see :class:`ViewsAugment`).

    ``images`` uint8 ``[B, 3, H, W]`` (smaller images are edge-padded to the largest; ``sizes`` holds
    each real ``(H, W)``), ``crops`` int64 ``[num_crops, B, 4]`` ``(i, j, h, w)`` (the view groups' crops
    in order), ``ids``/``labels`` int64 ``[B]``.
    ``.to(device)`` moves the pixels and labels; ``sizes``, ``crops`` and ``ids`` stay on the host, where
    the augmentation and the batch seed read them (reading them from a device would stall it every batch).
    """

    images: Tensor
    sizes: Tensor
    crops: Tensor
    ids: Tensor
    labels: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RawBatch:
        images, labels = (t.to(device, non_blocking=non_blocking) for t in (self.images, self.labels))
        return RawBatch(images, self.sizes, self.crops, self.ids, labels)

    def pin_memory(self) -> RawBatch:
        return RawBatch(self.images.pin_memory(), self.sizes, self.crops, self.ids, self.labels.pin_memory())


class EncodedBatch(NamedTuple):
    """A batch whose images are still encoded (JPEG bytes), for decoding on the training device
    (:meth:`ViewCollate.decode_on`). ``sizes`` come from the image headers and ``crops`` are drawn
    from them, exactly as for a :class:`RawBatch`."""

    values: list[Any]
    sizes: Tensor
    crops: Tensor
    ids: Tensor
    labels: Tensor

    def pin_memory(self) -> EncodedBatch:
        return self  # bytes: nothing to pin

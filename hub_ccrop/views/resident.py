"""Device-resident mode: a small dataset decoded once into a uint8 tensor on the training device; batches
are index lookups plus the batched view pipeline (no DataLoader, no per-step decoding)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from hub_ccrop.views.batch import RawBatch
from hub_ccrop.views.rows import SkipCounter, decode_rows
from hub_ccrop.views.sampler import CropSampler

__all__ = ["DeviceResidentImages"]


class DeviceResidentImages:
    """A small dataset (CIFAR/STL/Tiny/small_objects sized) decoded once into uint8 ``[N, 3, H, W]`` on a device.

    No per-step decoding and no DataLoader: each step gathers a batch by index and runs
    :class:`~hub_ccrop.views.augment.ViewsAugment` on the device::

        resident = DeviceResidentImages(load_images(spec), device)
        groups = recipe.view_groups(spec.image_size)
        crops = CropSampler(box_table, groups, alpha=0.1)     # or collate.crops
        augment = ViewsAugment(groups, spec.mean, spec.std).to(device)
        for epoch in range(epochs):
            crops.mode = "ccrop" if epoch >= warmup else "rcrop"
            for raw in resident.iter_batches(512, crops, epoch=epoch, seed=seed,
                                             rank=rank, world_size=world_size):
                views = Views(augment(raw), raw.ids, raw.labels)
                ...
        for images, ids, labels in resident.iter_eval(1024, EvalCollate(spec).prepare):  # passes, kNN
            ...

    Every rank holds the whole dataset and takes its own slice of one seeded permutation per epoch
    (all ranks get the same number of batches). Images must all have the same size.
    """

    def __init__(
        self,
        rows: Any,
        device: torch.device | str = "cpu",
        *,
        strict: bool = False,
        chunk_size: int = 1024,
        skipped: SkipCounter | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.skipped = SkipCounter() if skipped is None else skipped  # a run passes its own: ids reported once
        chunks, ids, labels = [], [], []
        for batch in _iter_chunks(rows, chunk_size):
            images, id_t, label_t = decode_rows(batch, as_tensor=True, strict=strict, counter=self.skipped, max_side=None)
            for im, sid in zip(images, id_t.tolist(), strict=True):
                if chunks and im.shape != chunks[0].shape:
                    raise ValueError(
                        f"sample id {sid} has size {tuple(im.shape[1:])}, others {tuple(chunks[0].shape[1:])}: "
                        "device-resident mode needs same-size images (use the DataLoader path)"
                    )
                chunks.append(im)
            ids.append(id_t)
            labels.append(label_t)
        if not chunks:
            raise ValueError("no decodable images")
        self.images = torch.stack(chunks).to(self.device)
        self.ids_cpu = torch.cat(ids)
        self.ids = self.ids_cpu.to(self.device)
        self.labels = torch.cat(labels).to(self.device)
        height, width = self.images.shape[2:]
        self._size = torch.tensor([height, width], dtype=torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def num_batches(self, batch_size: int, *, world_size: int = 1, drop_last: bool = True) -> int:
        per_rank = len(self) // world_size
        return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)

    def positions(self, *, epoch: int = 0, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> Tensor:
        """This rank's row positions for an epoch (a seeded permutation, identical on every rank)."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        else:
            order = torch.arange(n)
        per_rank = n // world_size
        return order[rank : per_rank * world_size : world_size]

    def iter_batches(
        self,
        batch_size: int,
        crops: CropSampler,
        *,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        generator: torch.Generator | None = None,
    ) -> Iterator[RawBatch]:
        """:class:`RawBatch` es: images and labels on the device; crop rectangles (drawn from the box
        table), sizes and ids on the host, like ``RawBatch.to`` leaves them."""
        pos = self.positions(epoch=epoch, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)
        stop = len(pos) - len(pos) % batch_size if drop_last else len(pos)
        for begin in range(start_batch * batch_size, stop, batch_size):
            p = pos[begin : begin + batch_size]
            ids = self.ids_cpu[p]
            sizes = self._size.expand(len(p), 2)
            rect = crops(ids, sizes, generator=generator)
            p_dev = p.to(self.device, non_blocking=True)
            yield RawBatch(self.images[p_dev], sizes, rect, ids, self.labels[p_dev])

    def iter_eval(
        self, batch_size: int, prepare: Callable[[Tensor], Tensor], *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(prepare(images), ids, labels)`` of this rank's share, every row exactly once, on the device.

        ``prepare`` maps a uint8 batch to the model's input, e.g. :meth:`EvalCollate.prepare`.
        """
        pos = torch.arange(rank, len(self), world_size, device=self.device)
        for begin in range(0, len(pos), batch_size):
            p = pos[begin : begin + batch_size]
            yield prepare(self.images[p]), self.ids[p], self.labels[p]


def _iter_chunks(rows: Any, chunk_size: int) -> Iterable[Any]:
    """Batches of rows (dicts of columns) from a datasets Dataset/IterableDataset or a list of rows."""
    if hasattr(rows, "iter"):
        yield from rows.iter(batch_size=chunk_size)
        return
    rows = list(rows)
    for begin in range(0, len(rows), chunk_size):
        yield rows[begin : begin + chunk_size]

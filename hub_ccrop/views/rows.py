"""Rows -> decoded images: undecodable images skipped (one warning per id, counted across DataLoader
workers), batches padded to one size, the decode-size cap of a dataset."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hub_ccrop.data import (
    BadImageError,
    BadImageWarning,
    DatasetSpec,
    decode_image,
    decode_to_tensor,
    get_spec,
    list_specs,
)

__all__ = ["SkipCounter", "decode_rows", "keep_good", "max_side_for", "skip_bad_image", "stack_padded"]

Rows = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def max_side_for(spec: DatasetSpec) -> int | None:
    """Images larger than this are shrunk at decode: None for the registered native-size (32-96 px) sets,
    else ``max(640, 2 * image_size)``: ImageNet-like sets and anyone's own photos, where a 12 MP phone
    photo would otherwise be decoded whole for every crop (also bounds the padded batch of the batched path)."""
    if spec.eval_resize is None and spec.name in list_specs():
        registered = get_spec(spec.name)
        if (registered.hub_id, registered.generator, registered.eval_resize) == (spec.hub_id, spec.generator, None):
            return None
    return max(640, 2 * spec.image_size)


class SkipCounter:
    """Count of skipped (undecodable) images, summed over all DataLoader workers (shared memory).

    With ``num_ids`` it also records which ids were skipped, so that an id is warned about once, whatever
    the number of epochs, passes and workers that meet it (an id sits in one batch at a time: no races).
    """

    SLOTS = 64

    def __init__(self, num_ids: int = 0) -> None:
        self._slots = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        self._seen = torch.zeros(num_ids, dtype=torch.bool).share_memory_()

    def add(self, n: int = 1, sample_id: int | None = None) -> bool:
        """Count ``n`` skips; False when ``sample_id`` was recorded before (no need to warn again)."""
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self.SLOTS - 1)  # one writer per slot: no races
        self._slots[slot] += n
        if sample_id is None or not 0 <= sample_id < len(self._seen):
            return True
        first = not bool(self._seen[sample_id])
        self._seen[sample_id] = True
        return first

    def ids(self) -> list[int]:
        """The recorded ids (with ``num_ids``), sorted."""
        return self._seen.nonzero().flatten().tolist()

    @property
    def value(self) -> int:
        return int(self._slots.sum())

    def __int__(self) -> int:
        return self.value





def _columns(rows: Rows) -> tuple[list, list, list]:
    """images, ids, labels from a list of rows or a dict of columns."""
    if isinstance(rows, Mapping):
        images, ids = list(rows["image"]), list(rows["id"])
        labels = list(rows["label"]) if "label" in rows else [-1] * len(ids)
        return images, ids, labels
    try:
        return [r["image"] for r in rows], [r["id"] for r in rows], [r.get("label", -1) for r in rows]
    except KeyError as err:
        raise KeyError(f"collate rows need 'id' and 'image' columns (use hub_ccrop.data.load_images): {err}") from err


def decode_rows(
    rows: Rows,
    *,
    as_tensor: bool,
    strict: bool,
    counter: SkipCounter,
    max_side: int | None,
) -> tuple[list[Any], Tensor, Tensor]:
    """Decode a batch; an undecodable image is skipped with a warning naming its id (or raises if strict)."""
    decode = decode_to_tensor if as_tensor else decode_image
    return keep_good(rows, lambda value, sid: decode(value, sid, max_side=max_side), strict=strict, counter=counter)


def keep_good(
    rows: Rows,
    read: Callable[[Any, Any], Any],
    *,
    strict: bool,
    counter: SkipCounter,
) -> tuple[list[Any], Tensor, Tensor]:
    """``read(image, id)`` of each row; a row it fails on (:class:`BadImageError`) is skipped with a warning
    naming its id and counted, or raises if strict. Returns the results, ids and labels of the others."""
    images, ids, labels = _columns(rows)
    out, keep = [], []
    for k, (value, sid) in enumerate(zip(images, ids, strict=True)):
        try:
            out.append(read(value, sid))
        except BadImageError as err:
            if strict:
                raise
            skip_bad_image(err, counter)
            continue
        keep.append(k)
    id_t = torch.as_tensor([int(ids[k]) for k in keep], dtype=torch.int64)
    label_t = torch.as_tensor([int(labels[k]) for k in keep], dtype=torch.int64)
    return out, id_t, label_t


def skip_bad_image(err: BadImageError, counter: SkipCounter) -> None:
    """Count a skipped image; warn only the first time its id is skipped (epochs, passes, workers)."""
    sample_id = int(err.sample_id) if isinstance(err.sample_id, int | np.integer) else None
    if counter.add(sample_id=sample_id):
        warnings.warn(f"skipping {err}", BadImageWarning, stacklevel=4)


def stack_padded(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """uint8 ``[3, h, w]`` images (on one device) -> ``[B, 3, H, W]`` edge-replicated to the largest size,
    and sizes ``[B, 2]`` (on the host).

    The batch is channels-last: decoders hand out ``[3, h, w]`` views of ``[h, w, 3]`` pixels, so each copy
    is a plain one, and the batched executor's uint8 resize runs its vectorized channels-last kernel."""
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64).reshape(-1, 2)
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), sizes
    height, width = (int(v) for v in sizes.max(0).values)
    if bool((sizes == sizes[0]).all()):  # [h, w, 3] pixels stacked: one copy, channels-last
        return torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2), sizes
    out = torch.empty(len(images), 3, height, width, dtype=torch.uint8, device=images[0].device,
                      memory_format=torch.channels_last)  # fmt: skip
    for b, im in enumerate(images):
        h, w = im.shape[1:]
        out[b, :, :h, :w] = im
        if w < width:
            out[b, :, :h, w:] = im[:, :, w - 1 : w]  # replicate the edge: roi_align's border clamp stays exact
        if h < height:
            out[b, :, h:, :] = out[b, :, h - 1 : h, :]
    return out, sizes

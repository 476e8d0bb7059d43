"""The collate stage: two augmented views per image (ContrastiveCrop or RandomResizedCrop).

One mechanism for both crops: :class:`CropSampler` draws both views' ``(i, j, h, w)`` with
:func:`hub_ccrop.crop.sample_crop_params`; RandomResizedCrop is the whole-image box with alpha 1
(mode ``"rcrop"``), ContrastiveCrop each id's box from the :class:`~hub_ccrop.boxes.BoxTable` with
``alpha`` (mode ``"ccrop"``). The mode lives in shared memory, so persistent DataLoader workers see a
switch made in the main process without rebuilding the loader.

Three ways to run the paper's pipeline (crop -> flip 0.5 -> ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 ->
grayscale p=0.2 -> [Gaussian blur sigma 0.1-2 p=0.5] -> normalize), all drawing every parameter from
the same distributions (crop geometry is exact on both paths; the batched ops are torchvision's tensor
ops; the PIL path rounds to uint8 between ColorJitter ops, as torchvision's PIL transforms do):

* per image (``batched=False``): PIL + torchvision transforms in the DataLoader workers (the
  official code's pipeline);
* batched (``batched=True``): the collate decodes the batch to uint8 and :class:`BatchedViewAugment`
  crops + resizes every view in one ``roi_align`` and applies flip/jitter/gray/blur as batched tensor
  ops, in the workers (CPU) or, with ``raw=True``, on the training device after ``.to(device)``;
* device-resident (:class:`DeviceResidentImages`): a CIFAR-sized dataset decoded once into a uint8
  tensor on the device, batches are index lookups + :class:`BatchedViewAugment`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from hub_ccrop.boxes import BoxTable
from hub_ccrop.crop import sample_crop_params
from hub_ccrop.data import (
    BadImageError,
    BadImageWarning,
    DatasetSpec,
    decode_image,
    decode_on_device,
    decode_to_tensor,
    image_size,
)

__all__ = [
    "MODES",
    "BatchedViewAugment",
    "CropSampler",
    "DeviceResidentImages",
    "EncodedBatch",
    "EvalCollate",
    "RawBatch",
    "SkipCounter",
    "TwoViewCollate",
    "eval_image",
]

MODES = ("rcrop", "ccrop")
JITTER = (0.4, 0.4, 0.4, 0.1)
BLUR_SIGMA = (0.1, 2.0)


def blur_kernel_size(size: int) -> int:
    """Odd kernel of about 10% of the view size (23 at 224 px), as in SimCLR / MoCo v2."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def max_side_for(spec: DatasetSpec) -> int | None:
    """Images larger than this are shrunk at decode: None for native-size (32-96 px) datasets,
    640 px for ImageNet-like ones (bounds decode time and the padded batch of the batched path)."""
    return None if spec.eval_resize is None else 640


# -- shared state ----------------------------------------------------------------------------------


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


class CropSampler:
    """Both views' crop rectangles ``[2, B, 4]`` ``(i, j, h, w)`` for a batch of ids and sizes.

    ``mode = "rcrop"``: RandomResizedCrop (whole-image box, alpha 1); ``"ccrop"``: ContrastiveCrop with
    each id's box from ``box_table`` and ``alpha``. ``mode`` is stored in shared memory.
    """

    def __init__(
        self,
        box_table: BoxTable | None,
        *,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        alpha: float = 1.0,
        mode: str = "rcrop",
    ) -> None:
        self.box_table = box_table
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.alpha = float(alpha)
        self._mode = torch.zeros((), dtype=torch.int64).share_memory_()
        self.mode = mode

    @property
    def mode(self) -> str:
        return MODES[int(self._mode)]

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        if value == "ccrop" and self.box_table is None:
            raise ValueError("mode 'ccrop' needs a box table")
        self._mode.fill_(MODES.index(value))

    def boxes(self, ids: Tensor, mode: str | None = None) -> Tensor:
        """The boxes a mode uses: the whole image (rcrop) or the table's (ccrop)."""
        if (mode or self.mode) == "rcrop":
            return torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(ids), 4)
        return self.box_table.lookup(ids)

    def __call__(self, ids: Tensor, sizes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = len(ids)
        if n == 0:
            return torch.zeros(2, 0, 4, dtype=torch.int64)
        mode = self.mode  # read the shared flag once per batch
        ccrop = mode == "ccrop"
        boxes = self.boxes(ids, mode)
        params = sample_crop_params(
            boxes.repeat(2, 1),
            sizes.repeat(2, 1),
            scale=self.scale,
            ratio=self.ratio,
            alpha=self.alpha if ccrop else 1.0,
            generator=generator,
        )
        return params.view(2, n, 4)


# -- batches ---------------------------------------------------------------------------------------


class RawBatch(NamedTuple):
    """Decoded images and both views' crop rectangles, before any pixel op (see :class:`BatchedViewAugment`).

    ``images`` uint8 ``[B, 3, H, W]`` (smaller images are edge-padded to the largest; ``sizes`` holds
    each real ``(H, W)``), ``crops`` int64 ``[2, B, 4]`` ``(i, j, h, w)``, ``ids``/``labels`` int64 ``[B]``.
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
    (:meth:`TwoViewCollate.decode_on`). ``sizes`` come from the image headers and ``crops`` are drawn
    from them, exactly as for a :class:`RawBatch`."""

    values: list[Any]
    sizes: Tensor
    crops: Tensor
    ids: Tensor
    labels: Tensor

    def pin_memory(self) -> EncodedBatch:
        return self  # bytes: nothing to pin


def _columns(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> tuple[list, list, list]:
    """images, ids, labels from a list of rows or a dict of columns."""
    if isinstance(rows, Mapping):
        images, ids = list(rows["image"]), list(rows["id"])
        labels = list(rows["label"]) if "label" in rows else [-1] * len(ids)
        return images, ids, labels
    try:
        return [r["image"] for r in rows], [r["id"] for r in rows], [r.get("label", -1) for r in rows]
    except KeyError as err:
        raise KeyError(f"collate rows need 'id' and 'image' columns (use hub_ccrop.data.load_images): {err}") from err


def _decode_all(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    *,
    as_tensor: bool,
    strict: bool,
    counter: SkipCounter,
    max_side: int | None,
) -> tuple[list[Any], Tensor, Tensor]:
    """Decode a batch; an undecodable image is skipped with a warning naming its id (or raises if strict)."""
    decode = decode_to_tensor if as_tensor else decode_image
    return _keep_good(rows, lambda value, sid: decode(value, sid, max_side=max_side), strict=strict, counter=counter)


def _keep_good(
    rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
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
            _skip(err, counter)
            continue
        keep.append(k)
    id_t = torch.as_tensor([int(ids[k]) for k in keep], dtype=torch.int64)
    label_t = torch.as_tensor([int(labels[k]) for k in keep], dtype=torch.int64)
    return out, id_t, label_t


def _skip(err: BadImageError, counter: SkipCounter) -> None:
    """Count a skipped image; warn only the first time its id is skipped (epochs, passes, workers)."""
    sample_id = int(err.sample_id) if isinstance(err.sample_id, int | np.integer) else None
    if counter.add(sample_id=sample_id):
        warnings.warn(f"skipping {err}", BadImageWarning, stacklevel=4)


def stack_padded(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """uint8 ``[3, h, w]`` images (on one device) -> ``[B, 3, H, W]`` edge-replicated to the largest size,
    and sizes ``[B, 2]`` (on the host)."""
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.int64).reshape(-1, 2)
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), sizes
    height, width = (int(v) for v in sizes.max(0).values)
    if bool((sizes == sizes[0]).all()):
        return torch.stack(list(images)), sizes
    out = torch.empty(len(images), 3, height, width, dtype=torch.uint8, device=images[0].device)
    for b, im in enumerate(images):
        h, w = im.shape[1:]
        out[b, :, :h, :w] = im
        out[b, :, :h, w:] = im[:, :, w - 1 : w]  # replicate the edge: roi_align's border clamp stays exact
        out[b, :, h:, :] = out[b, :, h - 1 : h, :]
    return out, sizes


# -- batched pixel ops ------------------------------------------------------------------------------


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma ``[n, 1, H, W]`` (torchvision's rgb_to_grayscale / PIL's convert("L"))."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _per_image(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def _blend_(x: Tensor, f: Tensor, other: Tensor | None) -> Tensor:
    """``clamp(f * x + (1 - f) * other, 0, 1)`` in place (``other`` None = black): torchvision's ``_blend``,
    which brightness (black), contrast (the mean gray) and saturation (the gray image) all are."""
    x.mul_(f)
    if other is not None:
        x.add_(other * (1 - f))
    return x.clamp_(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """Brightness per image, in place."""
    return _blend_(x, _per_image(f), None)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Contrast per image (blend with the mean gray level), in place."""
    return _blend_(x, _per_image(f), _gray(x).mean(dim=(1, 2, 3), keepdim=True))


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Saturation per image (blend with the gray image), in place."""
    return _blend_(x, _per_image(f), _gray(x))


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the HSV hue by ``f`` (in [-0.5, 0.5]) per image; value and saturation stay.

    Float arithmetic only (boolean selects are slow on CPU): torchvision's rgb->hsv->rgb round trip.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / chroma.clamp(min=1e-12)  # gray pixels: all numerators below are exactly 0
    is_r = torch.eq(maxc, r).to(x.dtype)
    is_g = torch.eq(maxc, g).to(x.dtype) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    # hue in [0, 6): sector offset + position inside the sector
    h = is_r * ((g - b) * inv) + is_g * (2.0 + (b - r) * inv) + is_b * (4.0 + (r - g) * inv)
    h = h + 6.0 * f.view(-1, 1, 1)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):  # channel = v - chroma * clamp(min(k, 4 - k), 0, 1)
        k = h + n
        k = k - 6.0 * torch.floor(k / 6.0)
        torch.sub(maxc, chroma * torch.minimum(k, 4.0 - k).clamp_(0, 1), out=out[:, c])
    return out


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-image Gaussian blur with torchvision's kernel and reflect padding.

    Each 1-D pass is a matrix product with a banded ``[S, S]`` matrix that has the padding folded in
    (GEMMs are far faster than per-image grouped convolutions, on CPUs and GPUs alike).
    """
    n, c, height, width = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].to(x.dtype)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [n, k]

    def band(size: int) -> Tensor:  # [n, size, size]: out[i] = sum_j band[i, j] * in[j]
        offsets = torch.arange(kernel_size, device=x.device) - kernel_size // 2
        src = torch.arange(size, device=x.device)[:, None] + offsets[None, :]
        src = torch.where(src < 0, -src, torch.where(src >= size, 2 * (size - 1) - src, src))  # reflect
        out = torch.zeros(n, size, size, device=x.device, dtype=x.dtype)
        return out.scatter_add_(2, src.expand(n, size, kernel_size), kernel[:, None, :].expand(n, size, kernel_size))

    y = x.reshape(n, c * height, width) @ band(width).transpose(1, 2)  # rows
    y = band(height)[:, None] @ y.view(n, c, height, width)  # columns
    return y


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's op ids 0-3
PERMUTATIONS = tuple(itertools.permutations(range(4)))  # ColorJitter's randperm(4): uniform over these 24


class BatchedViewAugment(nn.Module):
    """Crop + resize (one ``roi_align``) + flip/jitter/gray/blur + normalize for a :class:`RawBatch`.

    ``view1, view2 = augment(raw_batch)`` on whatever device the batch is on. Each view draws its own
    flip, jitter (factors and order), grayscale and blur exactly like the torchvision transforms of the
    per-image path. ``generator`` (on the batch's device) makes it reproducible.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        blur: bool = False,
        flip_p: float = 0.5,
        jitter: Sequence[float] = JITTER,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = BLUR_SIGMA,
    ) -> None:
        super().__init__()
        self.size = int(size)
        self.blur = blur
        self.flip_p, self.jitter_p, self.gray_p, self.blur_p = flip_p, jitter_p, gray_p, blur_p
        self.jitter = tuple(float(v) for v in jitter)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.kernel_size = blur_kernel_size(self.size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, jitter={self.jitter}, blur={self.blur}"

    def crop_resize(self, images: Tensor, crops: Tensor, order: Tensor | None = None) -> Tensor:
        """``[2B, 3, S, S]`` float in [0, 1]: every view's ``(i, j, h, w)`` region resized, view 1s first, or
        in ``order`` (a permutation of the views) when given.

        Small images (up to 2S x 2S): one ``roi_align`` over the batch, antialiased by averaging
        ``ceil(h / S)`` x ``ceil(w / S)`` bilinear samples per output pixel (computed with ``grid_sample``
        when that is one sample, e.g. CIFAR). Larger ones: each image is
        converted to float only over the union of its two views (an ImageNet batch padded to 640 px
        would otherwise be a ~1.2 GB float copy) and each view resized with torchvision's antialiased
        bilinear resize (``F.interpolate(antialias=True)``, what its tensor ``RandomResizedCrop`` does;
        a separable filter, 2-3x faster than ``roi_align`` at 224 px on a CPU).
        """
        n_views, batch = crops.shape[:2]
        rect = crops.cpu()  # host rectangles (RawBatch keeps them there): no device sync
        size = (self.size, self.size)
        height, width = images.shape[-2:]
        if height * width <= 4 * self.size * self.size:
            i, j, h, w = rect.reshape(-1, 4).to(torch.float32).unbind(1)
            index = torch.arange(batch).repeat(n_views)
            if order is not None:
                view_order = order.cpu()
                i, j, h, w, index = i[view_order], j[view_order], h[view_order], w[view_order], index[view_order]
            x = images.to(torch.float32)
            if rect.numel() and int(rect[..., 2:].max()) <= self.size:
                # No crop larger than the view: roi_align takes one bilinear sample per output pixel, at the
                # bin centers; grid_sample at the same points gives the same numbers, twice as fast on a CPU.
                steps = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size
                gx = (j[:, None] + steps * w[:, None]) * (2 / width) - 1
                gy = (i[:, None] + steps * h[:, None]) * (2 / height) - 1
                grid = torch.stack([gx[:, None, :].expand(-1, self.size, -1), gy[:, :, None].expand(-1, -1, self.size)], -1)
                source = x.index_select(0, index.to(x.device))
                out = F.grid_sample(source, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
            else:
                rois = torch.stack([index.to(torch.float32), j, i, j + w, i + h], dim=1)
                out = roi_align(x, rois.to(images.device), output_size=size, sampling_ratio=-1, aligned=True)
            return out.div_(255.0)
        top, left = rect[..., 0].amin(0).tolist(), rect[..., 1].amin(0).tolist()
        bottom = (rect[..., 0] + rect[..., 2]).amax(0).tolist()
        right = (rect[..., 1] + rect[..., 3]).amax(0).tolist()
        slot = (torch.arange(n_views * batch) if order is None else torch.argsort(order.cpu())).tolist()
        out = torch.empty(n_views * batch, 3, *size, device=images.device)
        for b in range(batch):
            y0, x0 = top[b], left[b]
            union = images[b : b + 1, :, y0 : bottom[b], x0 : right[b]].to(torch.float32)
            for v in range(n_views):
                i, j, h, w = rect[v, b].tolist()
                view = union[:, :, i - y0 : i - y0 + h, j - x0 : j - x0 + w]
                out[slot[v * batch + b]] = F.interpolate(view, size=size, mode="bilinear", antialias=True)[0]
        return out.div_(255.0)

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Per-view parameters, drawn like the torchvision transforms of the per-image path."""

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=device)

        p = {"flip": rand(n) < self.flip_p, "jitter": rand(n) <= self.jitter_p}  # RandomApply: unless p < U
        for name, v in zip(("brightness", "contrast", "saturation", "hue"), self.jitter, strict=True):
            lo, hi = (-v, v) if name == "hue" else (max(0.0, 1 - v), 1 + v)
            p[name] = lo + (hi - lo) * rand(n)
        p["order"] = torch.randint(len(PERMUTATIONS), (n,), generator=generator, device=device)
        p["gray"] = rand(n) < self.gray_p
        p["blur"] = (rand(n) <= self.blur_p) & self.blur
        p["sigma"] = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * rand(n)
        return p

    def _factors(self, p: dict[str, Tensor]) -> tuple[list[Tensor], list[int]]:
        factors = [p[k] for k in ("brightness", "contrast", "saturation", "hue")]
        return factors, [k for k, v in enumerate(self.jitter) if v > 0]

    def _color_masked(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Accelerators: the whole batch, selected per view without a host sync. At each of the four
        jitter positions, brightness/contrast/saturation are one blend ``f * x + (1 - f) * other`` with
        per-view ``f`` and ``other`` (black, mean gray or gray image), then hue where it is due."""
        factors, active = self._factors(p)
        x = torch.where(_per_image(p["flip"]), x.flip(-1), x)
        order = torch.tensor(PERMUTATIONS, device=x.device)[p["order"]]
        one, zero = torch.ones_like(factors[0]), torch.zeros_like(factors[0])
        for pos in range(4):
            op = torch.where(p["jitter"], order[:, pos], -1)  # -1: no jitter for this view
            f = torch.where(op == 0, factors[0], torch.where(op == 1, factors[1], torch.where(op == 2, factors[2], one)))
            gray = _gray(x)
            other = (_per_image(torch.where(op == 1, 1 - f, zero)) * gray.mean(dim=(1, 2, 3), keepdim=True)
                     + _per_image(torch.where(op == 2, 1 - f, zero)) * gray)  # fmt: skip
            x = (x * _per_image(f)).add_(other).clamp_(0, 1)
            if 3 in active:
                x = torch.where(_per_image(op == 3), adjust_hue(x, factors[3]), x)
        x = torch.where(_per_image(p["gray"]), _gray(x).expand_as(x), x)
        if self.blur:
            x = torch.where(_per_image(p["blur"]), gaussian_blur(x, p["sigma"], self.kernel_size), x)
        return x

    @staticmethod
    def _grouping(p: dict[str, Tensor]) -> tuple[Tensor, list[int]]:
        """CPU: a view order sorted by (jitter order, flip, gray, blur), and the group bounds in it.

        Group ``g`` (one of the 24 jitter orders, or 24 = no jitter) holds 8 subgroups
        ``s = 4 * flip + 2 * gray + blur``, rows ``bounds[8 * g + s] : bounds[8 * g + s + 1]``.
        """
        n_perm = len(PERMUTATIONS)
        group = torch.where(p["jitter"], p["order"], n_perm)
        key = ((group * 2 + p["flip"]) * 2 + p["gray"]) * 2 + p["blur"]
        order = torch.argsort(key, stable=True)
        bounds = [0, *itertools.accumulate(torch.bincount(key, minlength=8 * (n_perm + 1)).tolist())]
        return order, bounds

    def _color_grouped(self, xs: Tensor, p: dict[str, Tensor], bounds: list[int]) -> Tensor:
        """CPU, in place on views sorted by :meth:`_grouping`: every op runs on contiguous rows, in
        chunks of about 1 MB (large fresh temporaries cost page faults and cache misses)."""
        factors, active = self._factors(p)
        chunk = max(1, (1 << 20) // (xs[0:1].numel() * xs.element_size() or 1))

        def apply(lo: int, hi: int, fn: Any, *args: Tensor) -> None:
            for a in range(bounds[lo], bounds[hi], chunk):
                rows = slice(a, min(a + chunk, bounds[hi]))
                view = xs[rows]
                out = fn(view, *(t[rows] for t in args))
                if out is not view:  # the blends work in place
                    view.copy_(out)

        for g in range(len(PERMUTATIONS) + 1):
            base = 8 * g
            if g < len(PERMUTATIONS):
                for op in PERMUTATIONS[g]:
                    if op in active:
                        apply(base, base + 8, JITTER_OPS[op], factors[op])
            apply(base + 4, base + 8, lambda v: v.flip(-1))
            for gray in (base + 2, base + 6):
                apply(gray, gray + 2, lambda v: _gray(v).expand(-1, 3, -1, -1))
            if self.blur:
                for blur in (base + 1, base + 3, base + 5, base + 7):
                    apply(blur, blur + 1, lambda v, sg: gaussian_blur(v, sg, self.kernel_size), p["sigma"])
        return xs

    def color(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Flip, ColorJitter (p, random order of the 4 ops), grayscale, blur with per-view parameters."""
        p = self.sample(x.shape[0], x.device, generator)
        if x.device.type != "cpu":
            return self._color_masked(x, p)
        order, bounds = self._grouping(p)
        xs = self._color_grouped(x.index_select(0, order), {k: v[order] for k, v in p.items()}, bounds)
        return xs.index_select(0, torch.argsort(order))

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` in place."""
        return x.sub_(self.mean).div_(self.std)

    def forward(self, batch: RawBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        images, crops = batch.images, batch.crops
        n = crops.shape[0] * crops.shape[1]
        p = self.sample(n, images.device, generator)
        if images.device.type != "cpu":
            x = self.normalize(self._color_masked(self.crop_resize(images, crops), p))
        else:  # views come out of roi_align already grouped, are augmented in place, then unsorted once
            order, bounds = self._grouping(p)
            xs = self.crop_resize(images, crops, order)
            xs = self.normalize(self._color_grouped(xs, {k: v[order] for k, v in p.items()}, bounds))
            x = xs.index_select(0, torch.argsort(order))
        b = crops.shape[1]
        return x[:b], x[b:]


# -- the collate stage ------------------------------------------------------------------------------


class TwoViewCollate:
    """DataLoader ``collate_fn``: rows -> ``(view1, view2, ids, labels)`` (or a :class:`RawBatch`).

    ``batched=False``: per-image PIL path; ``batched=True``: :class:`BatchedViewAugment` runs here (in
    the workers); ``raw=True``: return the :class:`RawBatch` and run ``self.augment`` on the device;
    ``device_decode=True`` (with raw, on CUDA): return an :class:`EncodedBatch` (image headers read,
    nothing decoded) and decode it on the device with :meth:`decode_on` (nvJPEG, CPU fallback per image).
    ``mode`` (``"rcrop"``/``"ccrop"``) can be set any time, also while persistent workers run.
    Undecodable images are skipped with a :class:`~hub_ccrop.data.BadImageWarning` naming the id and
    counted in ``self.skipped`` (shared across workers); ``strict=True`` raises instead. A batch can
    therefore be shorter than requested (or empty).
    """

    def __init__(
        self,
        box_table: BoxTable | None,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        alpha: float = 1.0,
        blur: bool = False,
        mode: str = "rcrop",
        batched: bool = False,
        raw: bool = False,
        device_decode: bool = False,
        strict: bool = False,
        max_side: int | None = None,
        **pipeline: Any,
    ) -> None:
        self.size = int(size)
        self.crops = CropSampler(box_table, scale=scale, ratio=ratio, alpha=alpha, mode=mode)
        # The one description of the paper's pipeline (flip_p, jitter, jitter_p, gray_p, blur_p,
        # blur_sigma); the per-image PIL transforms below are built from it too.
        self.augment = a = BatchedViewAugment(size, mean, std, blur=blur, **pipeline)
        self.batched = batched or raw or device_decode
        self.raw = raw or device_decode
        self.device_decode = device_decode
        self.strict = strict
        self.max_side = max_side
        self.skipped = SkipCounter()
        steps: list[nn.Module] = [
            T.RandomHorizontalFlip(a.flip_p),
            T.RandomApply([T.ColorJitter(*a.jitter)], p=a.jitter_p),
            T.RandomGrayscale(a.gray_p),
        ]
        if blur:
            steps.append(T.RandomApply([T.GaussianBlur(a.kernel_size, a.blur_sigma)], p=a.blur_p))
        self.pil_transform = T.Compose(steps)

    @classmethod
    def from_spec(cls, spec: DatasetSpec, box_table: BoxTable | None, **kwargs: Any) -> TwoViewCollate:
        """Size, mean/std, blur and ``max_side`` from the dataset spec; ``kwargs`` override."""
        defaults = {
            "size": spec.image_size, "mean": spec.mean, "std": spec.std, "blur": spec.blur,
            "max_side": max_side_for(spec),
        }  # fmt: skip
        return cls(box_table, **{**defaults, **kwargs})

    @property
    def mode(self) -> str:
        return self.crops.mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.crops.mode = value

    def __call__(
        self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor] | RawBatch | EncodedBatch:
        if self.device_decode:
            read = lambda value, sid: (value, image_size(value, sid, max_side=self.max_side))  # noqa: E731
            pairs, ids, labels = _keep_good(rows, read, strict=self.strict, counter=self.skipped)
            sizes = torch.tensor([size for _, size in pairs], dtype=torch.int64).reshape(-1, 2)
            return EncodedBatch([value for value, _ in pairs], sizes, self.crops(ids, sizes), ids, labels)
        images, ids, labels = _decode_all(
            rows, as_tensor=self.batched, strict=self.strict, counter=self.skipped, max_side=self.max_side
        )
        if self.batched:
            stacked, sizes = stack_padded(images)
            raw = RawBatch(stacked, sizes, self.crops(ids, sizes), ids, labels)
            if self.raw:
                return raw
            with torch.no_grad():
                view1, view2 = self.augment(raw)
            return view1, view2, ids, labels
        return (*self._per_image(images, ids), ids, labels)

    def decode_on(self, batch: EncodedBatch, device: torch.device | str, decoder: Callable[..., Any] | None = None
                  ) -> RawBatch:  # fmt: skip
        """The :class:`RawBatch` of an :class:`EncodedBatch`, decoded on ``device`` (see
        :func:`~hub_ccrop.data.decode_on_device`); images nothing decodes are skipped and counted."""
        decoded = decode_on_device(batch.values, batch.ids.tolist(), device, max_side=self.max_side, decoder=decoder)
        keep = []
        for k, img in enumerate(decoded):
            if not isinstance(img, BadImageError) and tuple(img.shape[1:]) != tuple(batch.sizes[k].tolist()):
                img = BadImageError(int(batch.ids[k]), f"decoded size {tuple(img.shape[1:])} differs from its header")
            if isinstance(img, BadImageError):
                if self.strict:
                    raise img
                _skip(img, self.skipped)
            else:
                keep.append(k)
        index = torch.tensor(keep, dtype=torch.int64)
        if keep:
            images, _ = stack_padded([decoded[k] for k in keep])
        else:
            images = torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=device)
        return RawBatch(images, batch.sizes[index], batch.crops[:, index], batch.ids[index],
                        batch.labels[index].to(device))

    def _per_image(self, images: list[Image.Image], ids: Tensor) -> tuple[Tensor, Tensor]:
        """The classic CPU path: PIL crop+resize and torchvision transforms per view."""
        s = self.size
        sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.int64).reshape(-1, 2)
        crops = self.crops(ids, sizes).tolist()
        out = np.empty((2, len(images), s, s, 3), dtype=np.uint8)
        for v in range(2):
            for b, im in enumerate(images):
                i, j, h, w = crops[v][b]
                view = im.resize((s, s), Image.BILINEAR, box=(j, i, j + w, i + h))
                out[v, b] = np.asarray(self.pil_transform(view))
        x = torch.from_numpy(out).permute(0, 1, 4, 2, 3).to(torch.float32).div_(255.0)
        x = self.augment.normalize(x.reshape(-1, 3, s, s)).reshape(2, len(images), 3, s, s)
        return x[0], x[1]


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
        images, ids, labels = _decode_all(
            rows, as_tensor=True, strict=self.strict, counter=self.skipped, max_side=self.max_side
        )
        s = self.output_size
        if not images:
            return torch.zeros(0, 3, s, s), ids, labels
        x = torch.stack([self.transform(im) for im in images]).to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std, ids, labels


# -- device-resident mode ---------------------------------------------------------------------------


class DeviceResidentImages:
    """A small dataset (CIFAR/STL/Tiny/small_objects sized) decoded once into uint8 ``[N, 3, H, W]`` on a device.

    No per-step decoding and no DataLoader: each step gathers a batch by index and runs
    :class:`BatchedViewAugment` on the device::

        resident = DeviceResidentImages(load_images(spec), device)
        crops = CropSampler(box_table, alpha=0.1)             # or collate.crops
        augment = BatchedViewAugment(spec.image_size, spec.mean, spec.std).to(device)
        for epoch in range(epochs):
            crops.mode = "ccrop" if epoch >= warmup else "rcrop"
            for raw in resident.iter_batches(512, crops, epoch=epoch, seed=seed,
                                             rank=rank, world_size=world_size):
                view1, view2 = augment(raw)
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
            images, id_t, label_t = _decode_all(batch, as_tensor=True, strict=strict, counter=self.skipped, max_side=None)
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

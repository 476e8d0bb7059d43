"""The batched executor of the view pipeline: crop + resize every view of a batch at once, then flip,
colour jitter, grayscale, blur and solarize with per-view parameters drawn exactly as torchvision's
transforms draw them (grouped by operation on CPUs, masked without host syncs on accelerators)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from hub_ccrop.recipe import ViewGroup
from hub_ccrop.views.batch import RawBatch
from hub_ccrop.views.ops import (
    BLUR_SIGMA,
    JITTER,
    JITTER_OPS,
    PERMUTATIONS,
    adjust_hue,
    blur_kernel_size,
    gaussian_blur,
    gray,
    per_image,
    solarize,
)

__all__ = ["BatchedViewAugment", "ViewsAugment"]


class BatchedViewAugment(nn.Module):
    """One view group's pipeline for a :class:`RawBatch`: crop + resize (one ``roi_align``) +
    flip/jitter/gray/blur/solarize + normalize.

    ``augment(raw_batch)`` -> ``[count, B, 3, S, S]`` on whatever device the batch is on, for the
    ``count`` crops in ``raw_batch.crops``. Each view draws its own flip, jitter (factors and order),
    grayscale, blur and solarization exactly like the torchvision transforms of the per-image path.
    ``generator`` (on the batch's device) makes it reproducible.
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
        solarize_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.size = int(size)
        self.blur = blur
        self.flip_p, self.jitter_p, self.gray_p, self.blur_p = flip_p, jitter_p, gray_p, blur_p
        self.solarize_p = float(solarize_p)
        self.jitter = tuple(float(v) for v in jitter)
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.kernel_size = blur_kernel_size(self.size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_group(cls, group: ViewGroup, mean: Sequence[float], std: Sequence[float]) -> BatchedViewAugment:
        """The pipeline of a resolved view group (``Recipe.view_groups``); blur is on when ``blur_p > 0``."""
        return cls(group.size, mean, std, blur=group.blur_p > 0, flip_p=group.flip_p, jitter=group.jitter,
                   jitter_p=group.jitter_p, gray_p=group.gray_p, blur_p=group.blur_p, blur_sigma=group.blur_sigma,
                   solarize_p=group.solarize_p)

    def extra_repr(self) -> str:
        return f"size={self.size}, jitter={self.jitter}, blur={self.blur}, solarize_p={self.solarize_p}"

    def crop_resize(self, images: Tensor, crops: Tensor, order: Tensor | None = None) -> Tensor:
        """``[count * B, 3, S, S]`` float in [0, 1]: every view's ``(i, j, h, w)`` region resized, crop-major, or
        in ``order`` (a permutation of the views) when given.

        Small images (up to 2S x 2S): one ``roi_align`` over the batch, antialiased by averaging
        ``ceil(h / S)`` x ``ceil(w / S)`` bilinear samples per output pixel (computed with ``grid_sample``
        when that is one sample, e.g. CIFAR). Larger ones: each view resized with torchvision's antialiased
        bilinear resize (``F.interpolate(antialias=True)``, what its tensor ``RandomResizedCrop`` does). On a
        CPU it resizes the uint8 pixels of a channels-last batch (:func:`~hub_ccrop.views.stack_padded`):
        torch's vectorized uint8 kernel, ~6x faster than in float, within one grey level of it (torchvision's
        tensor transforms on uint8 images do the same). Elsewhere each image is converted to float over the
        union of its views only (an ImageNet batch padded to 640 px would otherwise be a ~1.2 GB float copy).
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
        slot = (torch.arange(n_views * batch) if order is None else torch.argsort(order.cpu())).tolist()
        if images.device.type == "cpu":
            pixels = images.contiguous(memory_format=torch.channels_last)  # a no-op for stack_padded's batches
            resized = torch.empty(n_views * batch, 3, *size, dtype=torch.uint8, memory_format=torch.channels_last)
            for (v, b), (i, j, h, w) in zip(itertools.product(range(n_views), range(batch)), rect.view(-1, 4).tolist(),
                                            strict=True):  # fmt: skip
                view = pixels[b : b + 1, :, i : i + h, j : j + w]
                resized[slot[v * batch + b]] = F.interpolate(view, size=size, mode="bilinear", antialias=True)[0]
            return resized.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        top, left = rect[..., 0].amin(0).tolist(), rect[..., 1].amin(0).tolist()
        bottom = (rect[..., 0] + rect[..., 2]).amax(0).tolist()
        right = (rect[..., 1] + rect[..., 3]).amax(0).tolist()
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
        if self.solarize_p > 0:  # drawn last: pipelines without solarization draw what they always drew
            p["solarize"] = rand(n) < self.solarize_p
        return p

    def _factors(self, p: dict[str, Tensor]) -> tuple[list[Tensor], list[int]]:
        factors = [p[k] for k in ("brightness", "contrast", "saturation", "hue")]
        return factors, [k for k, v in enumerate(self.jitter) if v > 0]

    def _color_masked(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Accelerators: the whole batch, selected per view without a host sync. At each of the four
        jitter positions, brightness/contrast/saturation are one blend ``f * x + (1 - f) * other`` with
        per-view ``f`` and ``other`` (black, mean gray or gray image), then hue where it is due."""
        factors, active = self._factors(p)
        x = torch.where(per_image(p["flip"]), x.flip(-1), x)
        order = torch.tensor(PERMUTATIONS, device=x.device)[p["order"]]
        one, zero = torch.ones_like(factors[0]), torch.zeros_like(factors[0])
        for pos in range(4):
            op = torch.where(p["jitter"], order[:, pos], -1)  # -1: no jitter for this view
            f = torch.where(op == 0, factors[0], torch.where(op == 1, factors[1], torch.where(op == 2, factors[2], one)))
            luma = gray(x)
            other = (per_image(torch.where(op == 1, 1 - f, zero)) * luma.mean(dim=(1, 2, 3), keepdim=True)
                     + per_image(torch.where(op == 2, 1 - f, zero)) * luma)  # fmt: skip
            x = (x * per_image(f)).add_(other).clamp_(0, 1)
            if 3 in active:
                x = torch.where(per_image(op == 3), adjust_hue(x, factors[3]), x)
        x = torch.where(per_image(p["gray"]), gray(x).expand_as(x), x)
        if self.blur:
            x = torch.where(per_image(p["blur"]), gaussian_blur(x, p["sigma"], self.kernel_size), x)
        return self._solarize(x, p)

    @staticmethod
    def _solarize(x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Solarize the views drawn for it (the last op, as in BYOL's pipeline)."""
        if "solarize" not in p:
            return x
        return torch.where(per_image(p["solarize"]), solarize(x), x)

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
            for gray_rows in (base + 2, base + 6):
                apply(gray_rows, gray_rows + 2, lambda v: gray(v).expand(-1, 3, -1, -1))
            if self.blur:
                for blur in (base + 1, base + 3, base + 5, base + 7):
                    apply(blur, blur + 1, lambda v, sg: gaussian_blur(v, sg, self.kernel_size), p["sigma"])
        if "solarize" in p:  # only the views drawn for it (a full-batch select costs a quarter of the time)
            rows = p["solarize"].nonzero().squeeze(1)
            xs.index_copy_(0, rows, solarize(xs.index_select(0, rows)))
        return xs

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` in place."""
        return x.sub_(self.mean).div_(self.std)

    def forward(self, batch: RawBatch, generator: torch.Generator | None = None) -> Tensor:
        images, crops = batch.images, batch.crops
        n = crops.shape[0] * crops.shape[1]
        p = self.sample(n, images.device, generator)
        if images.device.type != "cpu":
            x = self.normalize(self._color_masked(self.crop_resize(images, crops), p))
        else:  # views come out of the resize already grouped, are augmented in place, then unsorted once
            order, bounds = self._grouping(p)
            xs = self.crop_resize(images, crops, order)
            xs = self.normalize(self._color_grouped(xs, {k: v[order] for k, v in p.items()}, bounds))
            x = xs.index_select(0, torch.argsort(order))
        return x.view(*crops.shape[:2], *x.shape[1:])


class ViewsAugment(nn.Module):
    """Every view group's :class:`BatchedViewAugment`: a :class:`RawBatch` (crops of all groups, in order)
    -> one ``[count, B, 3, S, S]`` tensor per group. Groups draw their parameters one after another from
    the same generator."""

    def __init__(self, groups: Sequence[ViewGroup], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.counts = [group.count for group in groups]
        self.groups = nn.ModuleList(BatchedViewAugment.from_group(group, mean, std) for group in groups)

    def forward(self, batch: RawBatch, generator: torch.Generator | None = None) -> list[Tensor]:
        crops = batch.crops.split(self.counts) if len(self.counts) > 1 else [batch.crops]
        return [augment(batch._replace(crops=c), generator) for augment, c in zip(self.groups, crops, strict=True)]



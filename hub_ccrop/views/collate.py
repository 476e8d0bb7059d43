"""The collate stage: rows -> :class:`~hub_ccrop.views.batch.Views` (every view group's crops), by one of
two executors of the same pipeline: per image (PIL + torchvision transforms in the DataLoader workers,
the official code's pipeline) or batched (:class:`~hub_ccrop.views.augment.ViewsAugment`, in the workers
on the CPU or on the training device)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from hub_ccrop.boxes import BoxTable
from hub_ccrop.data import BadImageError, DatasetSpec, decode_on_device, image_size
from hub_ccrop.recipe import ViewGroup
from hub_ccrop.views.augment import BatchedViewAugment, ViewsAugment
from hub_ccrop.views.batch import EncodedBatch, RawBatch, Views
from hub_ccrop.views.ops import BLUR_SIGMA, JITTER, gaussian_blur
from hub_ccrop.views.rows import (
    SkipCounter,
    decode_rows,
    keep_good,
    max_side_for,
    skip_bad_image,
    stack_padded,
)
from hub_ccrop.views.sampler import CropSampler, two_views

__all__ = ["ViewCollate", "pil_pipeline"]


class GaussianBlurPIL(nn.Module):
    """torchvision's ``GaussianBlur`` for PIL images (the same sigma draw, kernel, reflect padding and rounding
    back to uint8), computed with the batched executor's :func:`~hub_ccrop.views.ops.gaussian_blur`:
    separable and without denormal taps, ~20x faster than torchvision's 2-D convolution at 224 px."""

    def __init__(self, kernel_size: int, sigma: Sequence[float]) -> None:
        super().__init__()
        self.kernel_size, self.sigma = kernel_size, (float(sigma[0]), float(sigma[1]))

    def forward(self, img: Image.Image) -> Image.Image:
        sigma = T.GaussianBlur.get_params(*self.sigma)  # torchvision's draw: the RNG advances as before
        x = TF.pil_to_tensor(img)[None].to(torch.float32)
        return TF.to_pil_image(gaussian_blur(x, torch.tensor([sigma]), self.kernel_size).round_().to(torch.uint8)[0])


def pil_pipeline(augment: BatchedViewAugment) -> T.Compose:
    """The per-image executor of a group's pipeline: torchvision's PIL transforms with the same
    probabilities and ranges as the batched executor (``augment``)."""
    steps: list[nn.Module] = [
        T.RandomHorizontalFlip(augment.flip_p),
        T.RandomApply([T.ColorJitter(*augment.jitter)], p=augment.jitter_p),
        T.RandomGrayscale(augment.gray_p),
    ]
    if augment.blur:
        steps.append(T.RandomApply([GaussianBlurPIL(augment.kernel_size, augment.blur_sigma)], p=augment.blur_p))
    if augment.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=augment.solarize_p))
    return T.Compose(steps)


class ViewCollate:
    """DataLoader ``collate_fn``: rows -> :class:`Views` (or a :class:`RawBatch` / :class:`EncodedBatch`).

    ``groups``: resolved view groups (``Recipe.view_groups``); without them, two identical views of
    ``size`` with ``scale``, ``ratio``, ``blur`` and the pipeline keywords (``flip_p``, ``jitter``, ...).
    ``batched=False``: per-image PIL path; ``batched=True``: :class:`ViewsAugment` runs here (in
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
        mean: Sequence[float],
        std: Sequence[float],
        groups: Sequence[ViewGroup] | None = None,
        size: int | None = None,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        blur: bool = False,
        alpha: float = 1.0,
        mode: str = "rcrop",
        batched: bool = False,
        raw: bool = False,
        device_decode: bool = False,
        strict: bool = False,
        max_side: int | None = None,
        **pipeline: Any,
    ) -> None:
        if groups is None:
            if size is None:
                raise ValueError("ViewCollate needs view groups or a size")
            pipeline = {"jitter": list(JITTER), "blur_sigma": list(BLUR_SIGMA), **pipeline}
            pipeline["blur_p"] = pipeline.get("blur_p", 0.5) if blur else 0.0
            groups = two_views(scale, ratio, size=int(size), **pipeline)
        self.groups = list(groups)
        self.crops = CropSampler(box_table, self.groups, alpha=alpha, mode=mode)
        self.augment = ViewsAugment(self.groups, mean, std)
        self.pil_pipelines = [pil_pipeline(augment) for augment in self.augment.groups]
        self.batched = batched or raw or device_decode
        self.raw = raw or device_decode
        self.device_decode = device_decode
        self.strict = strict
        self.max_side = max_side
        self.skipped = SkipCounter()

    @classmethod
    def from_spec(cls, spec: DatasetSpec, box_table: BoxTable | None, **kwargs: Any) -> ViewCollate:
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

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> Views | RawBatch | EncodedBatch:
        if self.device_decode:
            read = lambda value, sid: (value, image_size(value, sid, max_side=self.max_side))  # noqa: E731
            pairs, ids, labels = keep_good(rows, read, strict=self.strict, counter=self.skipped)
            sizes = torch.tensor([size for _, size in pairs], dtype=torch.int64).reshape(-1, 2)
            return EncodedBatch([value for value, _ in pairs], sizes, self.crops(ids, sizes), ids, labels)
        images, ids, labels = decode_rows(
            rows, as_tensor=self.batched, strict=self.strict, counter=self.skipped, max_side=self.max_side
        )
        if self.batched:
            stacked, sizes = stack_padded(images)
            raw = RawBatch(stacked, sizes, self.crops(ids, sizes), ids, labels)
            if self.raw:
                return raw
            with torch.no_grad():
                return Views(self.augment(raw), ids, labels)
        return Views(self._per_image(images, ids), ids, labels)

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
                skip_bad_image(img, self.skipped)
            else:
                keep.append(k)
        index = torch.tensor(keep, dtype=torch.int64)
        if keep:
            images, _ = stack_padded([decoded[k] for k in keep])
        else:
            images = torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=device)
        return RawBatch(images, batch.sizes[index], batch.crops[:, index], batch.ids[index],
                        batch.labels[index].to(device))

    def _per_image(self, images: list[Image.Image], ids: Tensor) -> list[Tensor]:
        """The classic CPU path: PIL crop + resize and torchvision transforms per view, group by group."""
        sizes = torch.tensor([[im.height, im.width] for im in images], dtype=torch.int64).reshape(-1, 2)
        crops = self.crops(ids, sizes).tolist()
        out, first = [], 0
        for augment, transform, count in zip(self.augment.groups, self.pil_pipelines, self.crops.counts, strict=True):
            s = augment.size
            pixels = np.empty((count, len(images), s, s, 3), dtype=np.uint8)
            for v in range(count):
                for b, im in enumerate(images):
                    i, j, h, w = crops[first + v][b]
                    view = im.resize((s, s), Image.BILINEAR, box=(j, i, j + w, i + h))
                    pixels[v, b] = np.asarray(transform(view))
            x = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).to(torch.float32).div_(255.0)
            out.append(augment.normalize(x.reshape(-1, 3, s, s)).reshape(count, len(images), 3, s, s))
            first += count
        return out

"""ContrastiveCrop sampling: Algorithm 1 of Peng et al. (CVPR 2022), per image and batched.

Boxes are ``(x0, y0, x1, y1)`` in [0, 1]; crop parameters are torchvision's ``(i, j, h, w)``.
With the whole-image box and ``alpha = 1`` both forms draw exactly from RandomResizedCrop's
distribution, so RandomResizedCrop views are ContrastiveCrop views with ``FULL_BOX``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

__all__ = ["FULL_BOX", "ContrastiveCrop", "object_miss_rate", "sample_beta", "sample_crop_params"]

FULL_BOX: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
MAX_TRIES = 10


def _fallback_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback: a central crop with the ratio clamped."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(v, hi))


class ContrastiveCrop(torch.nn.Module):
    """Crop a box-guided random area of an image and resize it (torchvision RandomResizedCrop style).

    ``transform(img, box)`` returns the resized crop; ``box=None`` means the whole image.
    ``alpha`` is the Beta(alpha, alpha) parameter of the center-suppressed position sampling.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        alpha: float = 0.6,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        _check_ranges(scale, ratio, alpha)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        self.alpha = float(alpha)
        self.interpolation = interpolation
        self.antialias = antialias

    def get_params(
        self,
        img: Image.Image | Tensor,
        box: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[int, int, int, int]:
        """Sample ``(i, j, h, w)`` for ``img`` guided by ``box`` (Algorithm 1)."""
        _, height, width = F.get_dimensions(img)
        x0, y0, x1, y1 = FULL_BOX if box is None else (float(v) for v in box)
        # One draw from the torch RNG seeds a scalar RNG: keeps DataLoader worker seeding and
        # explicit generators working while the per-image path stays as cheap as torchvision's.
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        area = height * width
        for _ in range(MAX_TRIES):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            return _fallback_crop(height, width, self.ratio)
        j0 = _clamp(math.floor(x0 * width) - w // 2, 0, width - w)
        j1 = _clamp(math.floor(x1 * width) - w // 2, 0, width - w)
        i0 = _clamp(math.floor(y0 * height) - h // 2, 0, height - h)
        i1 = _clamp(math.floor(y1 * height) - h // 2, 0, height - h)
        u = rng.betavariate(self.alpha, self.alpha)
        v = rng.betavariate(self.alpha, self.alpha)
        j = j0 + min(math.floor((j1 - j0 + 1) * u), j1 - j0)
        i = i0 + min(math.floor((i1 - i0 + 1) * v), i1 - i0)
        return i, j, h, w

    def forward(
        self,
        img: Image.Image | Tensor,
        box: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Image.Image | Tensor:
        i, j, h, w = self.get_params(img, box, generator)
        return F.resized_crop(img, i, j, h, w, list(self.size), self.interpolation, antialias=self.antialias)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"alpha={self.alpha}, interpolation={self.interpolation.value})"
        )


def _check_ranges(scale: Sequence[float], ratio: Sequence[float], alpha: float) -> None:
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def _sample_log_gamma(shape: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """log of ``n`` Gamma(shape, 1) draws: Marsaglia-Tsang, shape < 1 boosted by U**(1/shape) in log space.

    Candidates are drawn with a small surplus and the first ``n`` accepted ones kept (the acceptance
    rate is above 95%), so one pass of a few tensor ops almost always suffices.
    """
    boost = shape < 1
    d = (shape + 1 if boost else shape) - 1 / 3
    c = 1 / math.sqrt(9 * d)
    accepted, have = [], 0
    while have < n:
        m = int((n - have) * 1.08) + 16
        x = torch.randn(m, generator=generator, dtype=torch.float64, device=device)
        u = torch.rand(m, generator=generator, dtype=torch.float64, device=device)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        accepted.append(v[ok])
        have += accepted[-1].numel()
    out = torch.log(torch.cat(accepted)[:n]) + math.log(d)
    if boost:
        out += torch.log(torch.rand(n, generator=generator, dtype=torch.float64, device=device)) / shape
    return out


def sample_beta(
    alpha: float, n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) in float64, seedable (torch.distributions.Beta is not)."""
    device = torch.device(device)
    if alpha == 1:
        return torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    log_xy = _sample_log_gamma(alpha, 2 * n, generator, device)
    return torch.sigmoid(log_xy[:n] - log_xy[n:])


def sample_crop_params(
    boxes: Tensor,
    sizes: Tensor,
    *,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Vectorized Algorithm 1: ``(i, j, h, w)`` int64 ``[B, 4]`` for boxes ``[B, 4]`` and sizes ``[B, 2]`` (H, W).

    Same distribution as :meth:`ContrastiveCrop.get_params`, with no Python loop over images.
    Runs on the boxes' device; ``generator`` must live on that device.
    """
    _check_ranges(scale, ratio, alpha)
    device = boxes.device
    n = boxes.shape[0]
    boxes = boxes.to(torch.float64)
    height = sizes[:, 0].to(device=device, dtype=torch.float64)
    width = sizes[:, 1].to(device=device, dtype=torch.float64)

    area = (height * width)[:, None]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * _rand((n, MAX_TRIES), generator, device))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand((n, MAX_TRIES), generator, device))
    w_try = torch.round(torch.sqrt(target_area * aspect))
    h_try = torch.round(torch.sqrt(target_area / aspect))
    ok = (w_try > 0) & (w_try <= width[:, None]) & (h_try > 0) & (h_try <= height[:, None])
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # first accepted try
    w = w_try.gather(1, first)[:, 0]
    h = h_try.gather(1, first)[:, 0]

    # torchvision's fallback (central crop, ratio clamped) where no try was accepted.
    failed = ~ok.any(dim=1)
    in_ratio = width / height
    fb_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)
    fb_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)
    w = torch.where(failed, fb_w, w)
    h = torch.where(failed, fb_h, h)

    u = sample_beta(alpha, 2 * n, generator=generator, device=device)  # positions in x, then in y

    def position(lo: Tensor, hi: Tensor, extent: Tensor, crop: Tensor, draws: Tensor) -> Tensor:
        half = torch.div(crop, 2, rounding_mode="floor")
        start = (torch.floor(lo * extent) - half).clamp(min=torch.zeros_like(crop), max=extent - crop)
        stop = (torch.floor(hi * extent) - half).clamp(min=torch.zeros_like(crop), max=extent - crop)
        return start + torch.minimum(torch.floor((stop - start + 1) * draws), stop - start)

    j = position(boxes[:, 0], boxes[:, 2], width, w, u[:n])
    i = position(boxes[:, 1], boxes[:, 3], height, h, u[n:])
    i = torch.where(failed, torch.div(height - h, 2, rounding_mode="floor"), i)
    j = torch.where(failed, torch.div(width - w, 2, rounding_mode="floor"), j)
    return torch.stack([i, j, h, w], dim=1).to(torch.int64)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)


def object_miss_rate(
    objects: Tensor,
    boxes: Tensor,
    sizes: Tensor,
    *,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    alpha: float = 1.0,
    min_cover: float = 0.2,
    repeats: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Share of view pairs in which at least one view covers less than ``min_cover`` of the object.

    The paper's false positives: ``objects`` are ground-truth boxes ``[N, 4]``; ContrastiveCrop pairs use
    ``boxes`` and ``alpha``, RandomResizedCrop pairs the whole image and alpha 1. ``sizes`` is ``[N, 2]`` (H, W).
    """
    g = torch.Generator().manual_seed(seed)
    sizes = sizes.to(torch.float64)
    obj_px = objects.to(torch.float64) * sizes[:, [1, 0, 1, 0]]
    obj_area = ((obj_px[:, 2] - obj_px[:, 0]) * (obj_px[:, 3] - obj_px[:, 1])).clamp_min(1e-9)

    def coverage(crop_boxes: Tensor, a: float) -> Tensor:
        i, j, h, w = sample_crop_params(crop_boxes, sizes.long(), scale=scale, ratio=ratio, alpha=a, generator=g).T
        lt_x, lt_y = torch.maximum(obj_px[:, 0], j), torch.maximum(obj_px[:, 1], i)
        rb_x, rb_y = torch.minimum(obj_px[:, 2], j + w), torch.minimum(obj_px[:, 3], i + h)
        return (rb_x - lt_x).clamp(min=0) * (rb_y - lt_y).clamp(min=0) / obj_area

    full = torch.tensor([FULL_BOX], dtype=torch.float32).expand_as(boxes)
    rates = {}
    for name, crop_boxes, a in (("rcrop", full, 1.0), ("ccrop", boxes, alpha)):
        misses = [(coverage(crop_boxes, a) < min_cover) | (coverage(crop_boxes, a) < min_cover) for _ in range(repeats)]
        rates[name] = torch.cat(misses).double().mean().item()
    return rates

"""The pixel operations of the view pipeline, on float ``[n, 3, H, W]`` batches in [0, 1] with one
parameter per image: torchvision's colour transforms written for whole batches, Gaussian blur as two
banded matrix products, solarization. :class:`~hub_ccrop.views.augment.BatchedViewAugment` runs them."""

from __future__ import annotations

import functools
import itertools

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "BLUR_SIGMA",
    "JITTER",
    "JITTER_OPS",
    "NEGLIGIBLE_TAP",
    "PERMUTATIONS",
    "SOLARIZE_THRESHOLD",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "gaussian_blur",
    "gray",
    "per_image",
    "solarize",
]

JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(brightness, contrast, saturation, hue) of SimCLR / MoCo v2
BLUR_SIGMA = (0.1, 2.0)
# Gaussian taps below this move a blurred [0, 1] pixel by less than 1e-10, but as they underflow
# (exp(-0.5 * (t / sigma) ** 2) for sigma 0.3-0.8 at 23 taps) they and their products with the second pass's
# taps and with pixels make denormal numbers, which slow every product ~10x on x86 CPUs.
NEGLIGIBLE_TAP = 1e-12
SOLARIZE_THRESHOLD = 0.5  # torchvision's threshold for float images (128 for uint8 / PIL)


def blur_kernel_size(size: int) -> int:
    """Odd kernel of about 10% of the view size (23 at 224 px), as in SimCLR / MoCo v2."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma ``[n, 1, H, W]`` (torchvision's rgb_to_grayscale / PIL's convert("L"))."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def per_image(f: Tensor) -> Tensor:
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
    return _blend_(x, per_image(f), None)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Contrast per image (blend with the mean gray level), in place."""
    return _blend_(x, per_image(f), gray(x).mean(dim=(1, 2, 3), keepdim=True))


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Saturation per image (blend with the gray image), in place."""
    return _blend_(x, per_image(f), gray(x))


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


@functools.lru_cache(maxsize=64)
def _band_taps(size: int, kernel_size: int, device: torch.device) -> Tensor:
    """``[m, size, size]`` tap indices of a reflect-padded 1-D filter as a matrix: ``out[i]`` takes
    ``in[j]`` with tap ``taps[l, i, j]`` for each layer ``l`` (``kernel_size`` = none). Near the borders a
    reflected tap lands on a pixel that a direct tap also reads, hence more than one layer."""
    layers = [torch.full((size, size), kernel_size, dtype=torch.int64)]
    for i, t in itertools.product(range(size), range(kernel_size)):
        j = abs(i + t - kernel_size // 2)  # reflect at 0 ...
        j = 2 * (size - 1) - j if j >= size else j  # ... and at size - 1
        layer = next((la for la in layers if la[i, j] == kernel_size), None)
        if layer is None:
            layer = torch.full((size, size), kernel_size, dtype=torch.int64)
            layers.append(layer)
        layer[i, j] = t
    return torch.stack(layers).to(device)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-image Gaussian blur with torchvision's kernel (taps below :data:`NEGLIGIBLE_TAP` zeroed) and
    reflect padding, ``x`` float ``[n, c, H, W]``, ``sigma`` ``[n]``.

    Each 1-D pass is a matrix product with a banded ``[S, S]`` matrix that has the padding folded in
    (GEMMs are far faster than per-image grouped convolutions, on CPUs and GPUs alike).
    """
    n, c, height, width = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None].to(device=x.device, dtype=x.dtype)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [n, k]
    kernel = F.pad(kernel.masked_fill_(kernel < NEGLIGIBLE_TAP, 0.0), (0, 1))  # tap index kernel_size: 0

    def band(size: int) -> Tensor:  # [n, size, size]: out[i] = sum_j band[i, j] * in[j]
        taps = _band_taps(size, kernel_size, x.device)
        return kernel.index_select(1, taps.view(-1)).view(n, *taps.shape).sum(dim=1)

    y = x.reshape(n, c * height, width) @ band(width).transpose(1, 2)  # rows
    return band(height)[:, None] @ y.view(n, c, height, width)  # columns


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's op ids 0-3
PERMUTATIONS = tuple(itertools.permutations(range(4)))  # ColorJitter's randperm(4): uniform over these 24


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Invert the pixels at or above ``threshold`` (torchvision's ``F.solarize`` on float images)."""
    return torch.where(x >= threshold, 1.0 - x, x)

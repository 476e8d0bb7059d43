"""Semantic-aware localization (DESIGN.md 2.2): heatmaps of the last feature map -> boxes.

Heatmaps: for CNNs the channel sum of the last feature map (the paper's choice). For token models
(ViT-style) the patch tokens of the last block, reshaped to the patch grid, reduced by their L2 norm
(a channel sum of transformer tokens carries no spatial signal).

Alignment (DESIGN.md 2.2): feature cell ``o`` of a map with total stride ``S`` is centred on input pixel
``a + S*o``; ``a = 0`` for stride-2 conv/pool stems, ``(S-1)/2`` for patchify stems. :func:`cell_centres`
measures ``(S, a)`` per architecture and input size, and the heatmap is resampled so that every cell sits
on its receptive-field centre before thresholding. ``alignment="official"`` instead reproduces the
official code's ``update_box`` (bilinear ``align_corners=False`` upsampling, which places cell ``o`` at
``S*o + (S-1)/2``, and its box rule ``x1 = last/W``), for paper reproduction.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_ccrop.attention import cls_attention_maps, heatmap_candidates, heatmap_source, vit_heatmaps
from hub_ccrop.box_follow import FollowCheck
from hub_ccrop.choices import BOX_RULES
from hub_ccrop.distributed import gather_by_id
from hub_ccrop.inference import autocast, run_batches

__all__ = [
    "ALIGNMENTS",
    "BOX_RULES",
    "TRAINED_BACKBONE",
    "CellCentres",
    "boxes_from_heatmaps",
    "boxes_from_maps",
    "cell_centres",
    "check_localizer_source",
    "feature_map",
    "heatmaps",
    "image_boxes",
    "input_heatmaps",
    "localize_boxes",
    "model_boxes",
    "normalize_heatmaps",
    "official_boxes_from_heatmaps",
    "picture_heatmaps",
    "source_heatmaps",
    "upsample_heatmaps",
]

ALIGNMENTS = ("receptive_field", "official")
Maps = tuple[Tensor, Tensor]  # normalized heatmaps [B, H, W] at the input size, which were constant [B]
TRAINED_BACKBONE = "the backbone being trained"  # crop.localizer unset: the paper's localizer
_LOCALIZER_PREFIXES = ("hf-hub:", "timm:", "local-dir:")


def check_localizer_source(source: str) -> str | None:
    """Why ``source`` cannot be a localizer (one line), or None; the Hub is not asked (that is the load's job)."""
    if source.startswith(_LOCALIZER_PREFIXES):
        return None if source.partition(":")[2].strip() else f"{source!r} names no model"
    path = Path(source).expanduser()
    if (path / "run.json").is_file() or (path / "config.json").is_file():
        return None
    return (f"{source!r} is not a run folder (run.json), a timm export folder (config.json), hf-hub:ORG/NAME "
            "or timm:NAME")


def _is_token_model(model: nn.Module) -> bool:
    return hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_intermediates")


def feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """The last feature map ``[B, C, h, w]`` of a timm backbone (CNN, NHWC-output or token model)."""
    if _is_token_model(model):
        # Un-normed patch tokens of the last block, prefix tokens dropped, reshaped to NCHW.
        return model.forward_intermediates(images, indices=1, intermediates_only=True)[-1]
    feats = model.forward_features(images)
    if feats.ndim != 4:
        raise ValueError(
            f"{type(model).__name__}.forward_features returned shape {tuple(feats.shape)}; "
            "expected a [B, C, h, w] feature map (or a timm token model with forward_intermediates)"
        )
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        feats = feats.permute(0, 3, 1, 2)
    return feats


def heatmaps(model: nn.Module, images: Tensor, source: str = "feature_norm") -> Tensor:
    """Raw (un-normalized) heatmaps ``[B, h, w]`` in float32: channel sum, or token L2 norm; with ``source``
    ``cls_attention`` (or ``auto`` on a ViT) the class token's last-block attention (``attention.py``)."""
    if heatmap_source(model, source) == "cls_attention":
        return cls_attention_maps(model, images)
    maps = feature_map(model, images).float()
    return maps.norm(dim=1) if _is_token_model(model) else maps.sum(dim=1)


def normalize_heatmaps(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image min-max to [0, 1]. Returns ``(normalized, constant)``; constant maps become 0."""
    maps = maps.float()
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values
    span = flat.max(dim=1).values - lo
    constant = ~(span > 1e-6 * lo.abs().clamp_min(1.0))
    norm = (maps - lo[:, None, None]) / torch.where(constant, 1.0, span)[:, None, None]
    return torch.where(constant[:, None, None], 0.0, norm), constant


@dataclass(frozen=True)
class CellCentres:
    """Feature cell ``(r, c)`` is centred on input pixel ``(offset[0] + stride[0]*r, offset[1] + stride[1]*c)``
    (pixel indices: pixel ``i`` spans ``[i, i+1)``, so its centre is ``i + 0.5`` in continuous units)."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    @classmethod
    def patchify(cls, map_size: tuple[int, int], size: tuple[int, int]) -> CellCentres:
        """Cells tiling the input evenly (``a = (S-1)/2``): what ``align_corners=False`` upsampling assumes."""
        stride = (size[0] / map_size[0], size[1] / map_size[1])
        return cls(stride, ((stride[0] - 1) / 2, (stride[1] - 1) / 2))


# A constant input level that keeps every activation (ReLU, GELU, SiLU, sigmoid gates) in its linear
# regime during the probe; float64 keeps the ramp's ~1 px differences exact on top of it.
_PROBE_LEVEL = 1e4
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _extrapolate(x: Tensor, dim: int, before: int, after: int) -> Tensor:
    """Pad ``x`` along ``dim`` by continuing each line linearly (exact for maps affine in position)."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    step_lo = x.narrow(dim, 1, 1) - first if n > 1 else torch.zeros_like(first)
    step_hi = last - x.narrow(dim, n - 2, 1) if n > 1 else torch.zeros_like(last)
    shape = [1] * x.ndim
    shape[dim] = -1
    lo = torch.arange(before, 0, -1, dtype=x.dtype).view(shape)
    hi = torch.arange(1, after + 1, dtype=x.dtype).view(shape)
    return torch.cat([first - step_lo * lo, x, last + step_hi * hi], dim=dim)


def _pads(module: nn.Module) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of the conv/pool ``module``."""
    padding = module.padding
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":  # PyTorch puts the odd pixel on the bottom/right
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ph, ph, pw, pw


def _extrapolating(module: nn.Module) -> nn.Module:
    """Make a conv/avg-pool pad by linear extrapolation instead of zeros (a pre-hook, own padding off)."""
    def pre_hook(mod: nn.Module, args: tuple) -> tuple:
        top, bottom, left, right = mod.probe_pads
        x = _extrapolate(_extrapolate(args[0], 2, top, bottom), 3, left, right)
        return (x, *args[1:])

    module.probe_pads = _pads(module)
    module.padding = 0 if isinstance(module, nn.AvgPool2d) else (0, 0)
    if isinstance(module, nn.Conv2d):
        module.padding_mode = "zeros"  # reflect/circular convs would pad again from their cached amounts
    module.register_forward_pre_hook(pre_hook)
    return module


def _affine_probe_copy(model: nn.Module) -> nn.Module:
    """A float64 CPU copy whose feature map is an exactly linear, translation-covariant function of the input.

    Every conv/linear averages its inputs (uniform weights, no bias), norms are identities, max-pools are
    average pools of the same window, layer scales are 1, and zero padding becomes linear extrapolation:
    so an input that is affine in position stays affine through every layer, as on an infinite image,
    and the moment of cell ``o``'s receptive field is read off without border truncation.
    """
    probe = copy.deepcopy(getattr(model, "_orig_mod", model)).to("cpu", torch.float64).eval()
    for name, module in list(probe.named_modules()):
        parent, _, attr = name.rpartition(".")
        owner = probe.get_submodule(parent) if name else None
        if isinstance(module, _NORMS) and owner is not None:
            setattr(owner, attr, nn.Identity())
        elif isinstance(module, nn.MaxPool2d) and owner is not None and module.dilation in (1, (1, 1)):
            avg = nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
            setattr(owner, attr, _extrapolating(avg))
        elif isinstance(module, nn.Conv2d | nn.AvgPool2d):
            _extrapolating(module)
    with torch.no_grad():
        for module in probe.modules():
            for pname, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.Conv2d | nn.Linear) and pname == "weight":
                    param.fill_(1.0 / param[0].numel())
                else:  # biases would break linearity; scales (layer scale gamma, ...) become 1
                    param.fill_(0.0 if pname == "bias" else 1.0)
    return probe


def _architecture_key(model: nn.Module) -> tuple:
    """What decides cell placement: the class and every conv/pool window, in module order."""
    model = getattr(model, "_orig_mod", model)
    layers = tuple(
        (type(m).__name__, *(str(getattr(m, a, None)) for a in ("kernel_size", "stride", "padding", "dilation")))
        for m in model.modules() if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d)
    )
    return type(model).__name__, layers


_CENTRES: dict[tuple, CellCentres] = {}


def cell_centres(model: nn.Module, size: tuple[int, int]) -> CellCentres:
    """Where the cells of ``model``'s last feature map sit on an input of ``size`` (H, W); cached.

    CNNs: measured on a linearized copy (:func:`_affine_probe_copy`): inputs ``L``, ``L + x`` and
    ``L + y`` give each cell's receptive-field centroid exactly, and a line fit gives ``(S, a)``.
    Token models: from the patch-embedding conv (``a = d(k-1)/2 - p``). Models the probe cannot
    linearize (attention, content-dependent gates) fall back to the patchify placement, with a warning.
    """
    size = (int(size[0]), int(size[1]))
    key = (_architecture_key(model), size)
    if key not in _CENTRES:
        _CENTRES[key] = _token_centres(model, size) if _is_token_model(model) else _probe_centres(model, size)
    return _CENTRES[key]


def _token_centres(model: nn.Module, size: tuple[int, int]) -> CellCentres:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d) or isinstance(proj.padding, str):
        grid = tuple(getattr(model.patch_embed, "grid_size", (1, 1)))
        return CellCentres.patchify(grid, size)
    pads = _pads(proj)
    stride = tuple(float(s) for s in proj.stride)
    offset = tuple(d * (k - 1) / 2 - p for d, k, p in zip(proj.dilation, proj.kernel_size, pads[::2], strict=True))
    return CellCentres(stride, offset)


@torch.no_grad()
def _probe_centres(model: nn.Module, size: tuple[int, int]) -> CellCentres:
    probe = _affine_probe_copy(model)
    height, width = size
    ramp_y = torch.arange(height, dtype=torch.float64).view(height, 1).expand(height, width)
    ramp_x = torch.arange(width, dtype=torch.float64).view(1, width).expand(height, width)
    level = torch.full((height, width), _PROBE_LEVEL, dtype=torch.float64)
    x = torch.stack([level, level + ramp_y, level + ramp_x])[:, None].expand(3, 3, height, width)
    out = feature_map(probe, x.contiguous()).mean(dim=1)  # [3, h, w]; channels are all equal
    mass = out[0] / _PROBE_LEVEL
    centroid_y, centroid_x = (out[1] - out[0]) / mass, (out[2] - out[0]) / mass
    fits = [_line_fit(centroid_y, dim=0), _line_fit(centroid_x, dim=1)]
    if any(fit is None for fit in fits):
        warnings.warn(
            f"{type(model).__name__}: its feature map is not a linear function of the input with uniform "
            "weights (attention or gating?), so its cells are placed as patches tiling the image "
            "(the receptive-field alignment cannot be measured for this architecture)", stacklevel=3)
        return CellCentres.patchify(tuple(out.shape[-2:]), size)
    (stride_y, offset_y), (stride_x, offset_x) = fits
    return CellCentres((stride_y, stride_x), (offset_y, offset_x))


def _line_fit(centroid: Tensor, dim: int, tol: float = 1e-3) -> tuple[float, float] | None:
    """``(S, a)`` with ``centroid = a + S*o`` along ``dim`` for every cell, or None if it is not a line."""
    if not torch.isfinite(centroid).all():
        return None
    n = centroid.shape[dim]
    o = torch.arange(n, dtype=torch.float64).view((-1, 1) if dim == 0 else (1, -1))
    stride = float((centroid.narrow(dim, n - 1, 1) - centroid.narrow(dim, 0, 1)).mean() / (n - 1)) if n > 1 else 1.0
    offset = float((centroid - stride * o).mean())
    if stride <= 0 or (centroid - (offset + stride * o)).abs().max() > tol:
        return None
    return round(stride, 6) + 0.0, round(offset, 6) + 0.0  # float64 rounding noise off; -0.0 -> 0.0


@lru_cache(maxsize=64)
def _interpolation_matrix(length: int, cells: int, stride: float, offset: float) -> Tensor:
    """``[length, cells]`` linear-interpolation weights: pixel ``i`` reads cell coordinate ``(i - a)/S``,
    clamped to the first/last cell (as bilinear upsampling does beyond the outermost centres)."""
    u = ((torch.arange(length, dtype=torch.float64) - offset) / stride).clamp(0, cells - 1)
    lo = u.floor().long().clamp(max=max(cells - 2, 0))
    frac = u - lo
    weights = torch.zeros(length, cells, dtype=torch.float64)
    weights[torch.arange(length), lo] = 1 - frac
    if cells > 1:
        weights[torch.arange(length), lo + 1] += frac
    return weights.float()


def upsample_heatmaps(maps: Tensor, size: tuple[int, int], centres: CellCentres | None = None) -> Tensor:
    """``[B, h, w]`` -> ``[B, H, W]``: each cell on its centre, linear in between (exact, separable).

    ``centres=None`` is bilinear ``align_corners=False`` upsampling (cells as patches tiling the image).
    """
    if centres is None:
        return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    (h, w), (height, width) = maps.shape[-2:], size
    rows = _interpolation_matrix(height, h, centres.stride[0], centres.offset[0]).to(maps.device)
    cols = _interpolation_matrix(width, w, centres.stride[1], centres.offset[1]).to(maps.device)
    return torch.einsum("yh,bhw,xw->byx", rows, maps.float(), cols)


def _closure(mask: Tensor, whole: Tensor, end: int) -> Tensor:
    """Boxes ``[B, 4]`` around the active pixels of ``mask`` ``[B, H, W]``; the end edge of the last active
    pixel ``p`` is ``(p + end)/W``; ``whole`` images and empty masks give the whole image."""
    height, width = mask.shape[-2:]
    cols, rows = mask.any(dim=1), mask.any(dim=2)  # [B, W], [B, H]

    def extent(active: Tensor, length: int) -> tuple[Tensor, Tensor]:
        first = active.to(torch.int8).argmax(dim=1)
        last = length - 1 - active.flip(1).to(torch.int8).argmax(dim=1)
        return first / length, (last + end) / length

    x0, x1 = extent(cols, width)
    y0, y1 = extent(rows, height)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    full = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    return torch.where((whole | ~cols.any(dim=1))[:, None], full, boxes)


def boxes_from_heatmaps(maps: Tensor, size: tuple[int, int], k: float = 0.1,
                        centres: CellCentres | None = None) -> Tensor:
    """Boxes ``[B, 4]`` (x0, y0, x1, y1) in [0, 1] from raw heatmaps ``[B, h, w]``.

    Min-max normalize, upsample to the input ``size`` (H, W) with each cell on its ``centres``
    (:func:`upsample_heatmaps`), threshold at ``k`` and take the rectangular closure of the active
    pixels; pixel column ``c`` covers ``[c/W, (c+1)/W]``. Constant maps and empty masks give the whole image.
    """
    if maps.ndim != 3:
        raise ValueError(f"heatmaps must be [B, h, w], got {tuple(maps.shape)}")
    norm, constant = normalize_heatmaps(maps)
    return _closure(upsample_heatmaps(norm, size, centres) > k, constant, end=1)


def official_boxes_from_heatmaps(maps: Tensor, size: tuple[int, int], k: float = 0.1) -> Tensor:
    """The official ``update_box`` (``DDP_*_ccrop.py``), batched, as ``(x0, y0, x1, y1)`` boxes.

    Subtract the min, divide by the max, bilinear ``align_corners=False`` upsampling, threshold ``> k``,
    box ``(first/W, first/H, last/W, last/H)``: the last active pixel's left edge, not its right edge.
    Constant maps (NaN there) and empty masks give the whole image here.
    """
    if maps.ndim != 3:
        raise ValueError(f"heatmaps must be [B, h, w], got {tuple(maps.shape)}")
    norm, constant = normalize_heatmaps(maps)
    return _closure(upsample_heatmaps(norm, size) > k, constant, end=0)


def _check_alignment(alignment: str) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")


def _check_rule(rule: str) -> None:
    if rule not in BOX_RULES:
        raise ValueError(f"box rule must be one of {BOX_RULES}, got {rule!r}")


def _largest_component(mask: Tensor) -> Tensor:
    """The largest 8-connected component of each ``[B, H, W]`` mask (ties: the one found first in raster order).

    Batched label propagation: every active pixel starts with its own label and takes the largest label of
    its 3x3 neighbourhood until nothing changes (at most one step per pixel of the longest path)."""
    batch, height, width = mask.shape
    index = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, height, width)
    labels = torch.where(mask, index, 0.0)  # float32 holds integers up to 2**24 exactly
    while True:
        grown = torch.where(mask, F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0], 0.0)
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.long().flatten(1)
    counts = torch.zeros(batch, height * width + 1, device=mask.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    counts[:, 0] = 0  # background
    best = counts.argmax(dim=1)
    return mask & (labels.long() == best[:, None, None])


def boxes_from_maps(maps: Tensor, constant: Tensor, k: float | Tensor = 0.1, rule: str = "threshold",
                    alignment: str = "receptive_field") -> Tensor:
    """Boxes ``[B, 4]`` from normalized heatmaps ``[B, H, W]`` at the input size (:func:`input_heatmaps`).

    ``rule``: ``"threshold"`` (the paper's: the rectangle around every pixel above ``k``),
    ``"largest_component"`` (around the largest 8-connected region above ``k`` only: a second hot spot on
    the background does not stretch the box) or ``"quantile"`` (threshold at each map's own ``k``-quantile:
    the box keeps the hottest ``1 - k`` of the pixels whatever the map's contrast). The box's end edge is
    the last active pixel's end, ``(last + 1) / W``, or with ``alignment="official"`` the official code's
    ``last / W``. Constant maps: the whole image.
    """
    _check_rule(rule)
    _check_alignment(alignment)
    if rule == "quantile":
        k = torch.quantile(maps.flatten(1).float(), float(k), dim=1)[:, None, None]
    mask = maps > k
    if rule == "largest_component":
        mask = _largest_component(mask)
    return _closure(mask, constant, end=0 if alignment == "official" else 1)


def _input_maps(model: nn.Module, images: Tensor, alignment: str, sources: tuple[str, ...]) -> list[Maps]:
    # one forward pass for both ViT maps (only ViTs have two candidates, heatmap_candidates)
    raws = [heatmaps(model, images, sources[0])] if len(sources) == 1 else list(map(vit_heatmaps(model, images).get, sources))
    size = tuple(images.shape[-2:])
    centres = None if alignment == "official" else cell_centres(model, size)
    with torch.autocast(images.device.type, enabled=False):  # the network may run in bf16, the geometry does not
        normalized = [normalize_heatmaps(raw) for raw in raws]
        return [(upsample_heatmaps(norm, size, centres), constant) for norm, constant in normalized]


def source_heatmaps(model: nn.Module, images: Tensor, alignment: str = "receptive_field", flip: bool = False,
                    sources: tuple[str, ...] = ("feature_norm",)) -> list[Maps]:
    """:func:`input_heatmaps` of each of ``sources`` (concrete sources, :func:`hub_ccrop.attention.heatmap_candidates`),
    with one forward pass per image orientation whatever their number."""
    _check_alignment(alignment)
    maps = _input_maps(model, images, alignment, sources)
    if not flip:
        return maps
    flipped = _input_maps(model, images.flip(-2, -1), alignment, sources)
    out = []
    with torch.autocast(images.device.type, enabled=False):
        for (upright, constant), (turned, constant_turned) in zip(maps, flipped, strict=True):
            norm, constant_sum = normalize_heatmaps(upright + turned.flip(-2, -1))
            out.append((norm, constant_sum | (constant & constant_turned)))
    return out


def input_heatmaps(model: nn.Module, images: Tensor, alignment: str = "receptive_field",
                   flip: bool = False, heatmap: str = "feature_norm") -> tuple[Tensor, Tensor]:
    """Normalized heatmaps ``[B, H, W]`` at the input size of ``images``, and which maps were constant.

    ``heatmap``: the source (:func:`heatmaps`; ``auto`` is one map here, attention for a ViT: the choice between
    the two ViT maps is :func:`localize_boxes`'). ``flip``: also localize the images flipped on both axes (rotated by 180 degrees) and average the two
    maps, the second flipped back. The flip is undone on the *input pixel grid*, after each map's cells
    were placed on their own receptive-field centres (a stride-2 stem's cells do not sit symmetrically in
    the image, so flipping the cell grid would misplace them). What a map owes to the position in the
    image rather than to the content (zero padding, the cells' placement) moves to the opposite side in
    the flipped map and cancels; what the content makes hot stays. The average is min-max normalized again.
    """
    return source_heatmaps(model, images, alignment, flip, (heatmap_source(model, heatmap),))[0]


def image_boxes(model: nn.Module, images: Tensor, k: float = 0.1, alignment: str = "receptive_field",
                rule: str = "threshold", flip: bool = False, heatmap: str = "feature_norm") -> Tensor:
    """Boxes ``[B, 4]`` of a batch of (normalized) ``images`` from ``model``'s heatmaps: :func:`input_heatmaps`
    then :func:`boxes_from_maps`. With the defaults this is :func:`model_boxes` of the images' heatmaps."""
    maps, constant = input_heatmaps(model, images, alignment, flip, heatmap)
    return boxes_from_maps(maps, constant, k, rule, alignment)


def model_boxes(model: nn.Module, maps: Tensor, size: tuple[int, int], k: float = 0.1,
                alignment: str = "receptive_field") -> Tensor:
    """Boxes from ``model``'s raw heatmaps ``maps`` on inputs of ``size``, with the chosen ``alignment``."""
    _check_alignment(alignment)
    if alignment == "official":
        return official_boxes_from_heatmaps(maps, size, k)
    return boxes_from_heatmaps(maps, size, k, cell_centres(model, size))


def picture_heatmaps(model: nn.Module, maps: Tensor, size: tuple[int, int],
                     alignment: str = "receptive_field") -> Tensor:
    """Normalized heatmaps ``[B, H, W]`` at the input size, placed as :func:`model_boxes` places them."""
    _check_alignment(alignment)
    norm, _ = normalize_heatmaps(maps)
    return upsample_heatmaps(norm, size, None if alignment == "official" else cell_centres(model, size))


@torch.no_grad()
def localize_boxes(
    model: nn.Module,
    loader: Iterable,
    *,
    k: float = 0.1,
    alignment: str = "receptive_field",
    heatmap: str = "feature_norm",
    rule: str = "threshold",
    flip: bool = False,
    prepare: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    accelerator=None,
    progress: bool = True,
    follow: FollowCheck | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``(images, ids, labels)`` batches; return ``(ids, boxes)`` sorted by id.

    With an ``accelerate.Accelerator`` over several processes, each process localizes its shard and
    the results are gathered **by id** (duplicates from uneven shards are dropped), so every process
    returns the same full table. The model's train/eval mode is restored afterwards.
    ``alignment``: ``"receptive_field"`` (each cell on its receptive-field centre, :func:`cell_centres`)
    or ``"official"`` (the official code's boxes, :func:`official_boxes_from_heatmaps`). ``heatmap``: the
    heatmap source (``auto``, ``cls_attention``, ``feature_norm``; see :func:`heatmaps`). ``rule`` and
    ``flip``: :func:`image_boxes`. ``prepare`` maps a loader batch to ``model``'s input (another backbone's
    normalization and size, :class:`hub_ccrop.localizer.Localizer`); boxes are fractions of the image either way.
    ``follow``: a :class:`hub_ccrop.box_follow.FollowCheck`, run on the first images (its ``score()`` after).
    With ``heatmap="auto"`` on a ViT it checks both ViT maps (:func:`hub_ccrop.attention.heatmap_candidates`)
    and the pass keeps the attention's boxes unless they fail the check, then those of the map whose boxes
    follow the content best (:attr:`hub_ccrop.box_follow.FollowCheck.best`; the kept one: ``follow.source``).
    """
    _check_alignment(alignment)
    _check_rule(rule)
    sources = heatmap_candidates(model, heatmap) if follow is not None else (heatmap_source(model, heatmap),)

    def box_fn(images: Tensor) -> Tensor:  # [B, sources, 4]
        with autocast(images.device, autocast_dtype):
            maps = source_heatmaps(model, images, alignment, flip, sources)
        return torch.stack([boxes_from_maps(m, constant, k, rule, alignment) for m, constant in maps], dim=1)

    def boxes_of(images: Tensor) -> tuple[Tensor, ...]:
        return (box_fn(images),) if follow is None else (box_fn(images), follow.offsets(box_fn, images))

    ids, _, columns = run_batches(model, loader, boxes_of, device=device, accelerator=accelerator, prepare=prepare,
                                  channels_last=channels_last, progress=progress, desc="localize")
    widths = (4,) if follow is None else (4, 2)  # boxes, follow offsets
    columns = columns or [torch.empty(0, len(sources), width, device=ids.device) for width in widths]  # an empty shard
    ids, boxes, *offsets = gather_by_id(ids, *columns, accelerator=accelerator)
    if follow is None:
        return ids, boxes[:, 0]
    follow.record(offsets[0], sources)
    return ids, boxes[:, follow.best]

"""Pictures: images with their heatmaps and boxes, and ContrastiveCrop vs RandomResizedCrop view pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from hub_ccrop.crop import sample_crop_params
from hub_ccrop.recipe import ViewGroup

__all__ = ["draw_localization_grid", "to_uint8"]


def to_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo the normalization of ``[N, 3, H, W]`` images: uint8 pixels for pictures."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def _rect(ax, box: Sequence[float], width: int, height: int, color: str, style: str = "-") -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 * width - 0.5, y0 * height - 0.5), (x1 - x0) * width, (y1 - y0) * height,
                           fill=False, edgecolor=color, linewidth=1.5, linestyle=style))


def draw_localization_grid(
    images: Tensor,
    heatmaps: Tensor,
    boxes: Tensor,
    path: str | Path,
    *,
    alpha: float,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    gt_boxes: Tensor | None = None,
    ids: Sequence[int | str] | None = None,
    title: str = "",
    seed: int = 0,
    groups: Sequence[ViewGroup] | None = None,
    centre: Sequence[float] | None = None,  # the table's mean box centre (x, y): _mark_centre
) -> Path:
    """Save a PNG grid: one row per image with its box, its heatmap, two ContrastiveCrop views and two
    RandomResizedCrop views (crop rectangles drawn on the image, same seed for every call), and with
    ``groups`` (resolved view groups) a last column with every group's crops drawn on the image.

    ``images`` are uint8 ``[N, 3, H, W]``; ``heatmaps`` are ``[N, h, w]`` in [0, 1]; ``boxes`` ``[N, 4]``.
    """
    n, _, height, width = images.shape
    sizes = torch.tensor([[height, width]] * n)
    g = torch.Generator().manual_seed(seed)
    ccrop = [sample_crop_params(boxes.float(), sizes, scale=scale, ratio=ratio, alpha=alpha, generator=g)
             for _ in range(2)]
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    rcrop = [sample_crop_params(full, sizes, scale=scale, ratio=ratio, alpha=1.0, generator=g) for _ in range(2)]

    columns = ["box", "heatmap", "C-Crop view 1", "C-Crop view 2", "R-Crop view 1", "R-Crop view 2"]
    group_crops = _group_crops(groups, boxes.float(), full, sizes, alpha, g) if groups else []
    if group_crops:
        columns.append("view groups")
    # a bare Figure (no pyplot): no backend switch, no global figure registry, safe in notebooks and threads
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * n + 0.4))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for r in range(n):
        label = None if ids is None else ids[r] if isinstance(ids[r], str) else f"id {int(ids[r])}"
        _draw_row(axes[r], images[r].permute(1, 2, 0).cpu().numpy(), heatmaps[r], boxes[r],
                  None if gt_boxes is None else gt_boxes[r], label, [params[r] for params in ccrop + rcrop])
        if group_crops:
            _draw_group_crops(axes[r, -1], images[r].permute(1, 2, 0).cpu().numpy(),
                              [(color, crops[:, r]) for color, crops in group_crops])
        _mark_centre(axes[r, 0], centre, width, height)
    for c, name in enumerate(columns):
        axes[0, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = "yellow: learned box" + (", cyan dashed: ground truth" if gt_boxes is not None else "") + _centre_legend(centre)
    if group_crops:
        legend += "; view groups: " + ", ".join(f"{color} {group.count} x {group.size} px ({group.crop})"
                                                for (color, _), group in zip(group_crops, groups, strict=True))
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


GROUP_COLORS = ("lime", "magenta", "orange", "white")


def _draw_row(axes, img, heatmap: Tensor, box: Tensor, gt_box: Tensor | None, label: str | None,
              crops: list[Tensor]) -> None:  # fmt: skip
    """One image's row: its box (and ground truth), its heatmap, then each crop ``(i, j, h, w)``."""
    height, width = img.shape[:2]
    axes[0].imshow(img)
    _rect(axes[0], box, width, height, "yellow")
    if gt_box is not None:  # one box per image, or several ([K, 4], NaN where an image has fewer)
        for one in gt_box.reshape(-1, 4):
            if not one.isnan().any():
                _rect(axes[0], one, width, height, "cyan", "--")
    if label is not None:  # sample ids, or labels such as file names
        axes[0].set_ylabel(label, fontsize=7)
    axes[1].imshow(img)
    axes[1].imshow(heatmap.float().cpu().numpy(), cmap="jet", alpha=0.5, extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    for ax, params in zip(axes[2:], crops, strict=False):
        i, j, h, w = (int(v) for v in params)
        ax.imshow(img[i:i + h, j:j + w])


def _mark_centre(ax, centre: Sequence[float] | None, width: int, height: int) -> None:
    """The image centre (white +) and the mean box centre (yellow x) on a box picture: boxes placed whatever
    the image shows (a positional prior) show as a gap between the two marks."""
    if centre is None:
        return
    ax.plot([width / 2 - 0.5], [height / 2 - 0.5], "w+", markersize=8)
    ax.plot([centre[0] * width - 0.5], [centre[1] * height - 0.5], "yx", markersize=6)


def _draw_group_crops(ax, img, crops_by_colour: list[tuple[str, Tensor]]) -> None:
    """One image with every view group's crop rectangles ``(i, j, h, w)`` in the group's colour."""
    height, width = img.shape[:2]
    ax.imshow(img)
    for color, crops in crops_by_colour:
        for i, j, h, w in crops.tolist():
            _rect(ax, (j / width, i / height, (j + w) / width, (i + h) / height), width, height, color)


def _group_crops(groups: Sequence[ViewGroup], boxes: Tensor, full: Tensor, sizes: Tensor, alpha: float,
                 generator: torch.Generator) -> list[tuple[str, Tensor]]:  # fmt: skip
    """Each group's crops ``[count, N, 4]`` as the sampler draws them once boxes are in use, with a colour."""
    out = []
    for k, group in enumerate(groups):
        ccrop = group.crop == "ccrop"
        crops = sample_crop_params((boxes if ccrop else full).repeat(group.count, 1), sizes.repeat(group.count, 1),
                                   scale=group.scale, ratio=group.ratio, alpha=alpha if ccrop else 1.0,
                                   generator=generator)
        out.append((GROUP_COLORS[k % len(GROUP_COLORS)], crops.view(group.count, len(boxes), 4)))
    return out


def _centre_legend(centre: Sequence[float] | None) -> str:
    return "" if centre is None else f"; mean box centre x ({centre[0]:.2f}, {centre[1]:.2f}) vs image centre +"

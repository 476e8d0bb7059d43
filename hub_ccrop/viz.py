"""Pictures: images with their heatmaps and boxes, and ContrastiveCrop vs RandomResizedCrop view pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from hub_ccrop.crop import sample_crop_params

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
) -> Path:
    """Save a PNG grid: one row per image with its box, its heatmap, two ContrastiveCrop views and two
    RandomResizedCrop views (crop rectangles drawn on the image, same seed for every call).

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
    # a bare Figure (no pyplot): no backend switch, no global figure registry, safe in notebooks and threads
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * n + 0.4))
    axes = fig.subplots(n, len(columns), squeeze=False)
    for r in range(n):
        img = images[r].permute(1, 2, 0).cpu().numpy()
        ax = axes[r, 0]
        ax.imshow(img)
        _rect(ax, boxes[r], width, height, "yellow")
        if gt_boxes is not None:  # one box per image, or several ([n, K, 4], NaN where an image has fewer)
            for box in gt_boxes[r].reshape(-1, 4):
                if not box.isnan().any():
                    _rect(ax, box, width, height, "cyan", "--")
        if ids is not None:  # sample ids, or labels such as file names
            ax.set_ylabel(ids[r] if isinstance(ids[r], str) else f"id {int(ids[r])}", fontsize=7)
        ax = axes[r, 1]
        ax.imshow(img)
        ax.imshow(heatmaps[r].float().cpu().numpy(), cmap="jet", alpha=0.5, extent=(-0.5, width - 0.5, height - 0.5, -0.5))
        for c, params in enumerate(ccrop + rcrop, start=2):
            i, j, h, w = (int(v) for v in params[r])
            axes[r, c].imshow(img[i:i + h, j:j + w])
    for c, name in enumerate(columns):
        axes[0, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = "yellow: learned box" + (", cyan dashed: ground truth" if gt_boxes is not None else "")
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

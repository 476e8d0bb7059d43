"""``hub-ccrop show``: what a backbone localizes on your own images, as a picture.

    hub-ccrop show runs/quickstart --images 8                      # the run's own training images
    hub-ccrop show hf-hub:ORG/NAME --input photos/ --images 12     # any backbone, your folder of images

One row per image (labelled with its file name or sample id): the box (yellow) the backbone's heatmap
gives at threshold k, the heatmap, two ContrastiveCrop views from that box and two RandomResizedCrop
views for comparison. Images get the localization passes' preprocessing (the whole image at the model's
input size). The picture goes to RUN/pictures/show_NNNN.png (or ./show_NNNN.png), never over an earlier one.
A line states the boxes (beside the baselines when the images have ground-truth boxes) and whether they
follow the content (:mod:`hub_ccrop.box_follow`): the one sign, on your own photos, that they know anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hub_ccrop.box_follow import FollowCheck
from hub_ccrop.box_quality import box_quality, box_verdict, heatmap_choice_line, quality_line
from hub_ccrop.data import decode_to_tensor
from hub_ccrop.errors import UserError
from hub_ccrop.evaluate import backbone_data_config, load_backbone
from hub_ccrop.localize import input_heatmaps, localize_boxes
from hub_ccrop.run_info import RUN_FILE, RunInfo, Schedule
from hub_ccrop.views import eval_image, max_side_for
from hub_ccrop.viz import draw_localization_grid, to_uint8

DEFAULT_SCHEDULE = Schedule(crop="ccrop", k=0.1, alpha=0.6)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _input_images(inputs: list[str], limit: int) -> tuple[list[torch.Tensor], list[str]]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"--input {' '.join(inputs)}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = files[:limit]
    return [decode_to_tensor({"bytes": f.read_bytes(), "path": str(f)}, f.name) for f in files], [f.name for f in files]


def _run_images(run: RunInfo, run_dir: Path, limit: int) -> tuple[list[torch.Tensor], list[str], torch.Tensor | None]:
    """Evenly spaced training images of a run (decoded as the passes decode them), ``id N`` labels, and
    ground-truth boxes when the data has them."""
    from hub_ccrop.data import load_images

    spec = run.dataset
    if spec is None:
        raise UserError(f"{run_dir / RUN_FILE} records no dataset: give --input FILES_OR_FOLDER")
    rows = load_images(spec, spec.pretrain_splits)
    ids = torch.linspace(0, len(rows) - 1, min(limit, len(rows))).long().tolist()
    picked = [rows[i] for i in ids]
    gt = torch.tensor([r["gt_box"] for r in picked]) if "gt_box" in rows.column_names else None
    images = [decode_to_tensor(r["image"], r["id"], max_side=max_side_for(spec)) for r in picked]
    return images, [f"id {r['id']}" for r in picked], gt


def localization_batch(images: Sequence[torch.Tensor], data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` images -> the normalized batch a localization pass sees: the whole image at the
    model's input size (:func:`hub_ccrop.views.eval_image`, as :class:`~hub_ccrop.views.EvalCollate` does)."""
    size = tuple(data_config["input_size"][-2:])
    x = torch.stack([eval_image(img, size) for img in images]).to(torch.float32).div_(255.0)
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def next_picture_path(folder: Path, stem: str = "show") -> Path:
    """``folder/stem_0001.png``, or the next number after the pictures already there (never overwrites)."""
    taken = [int(p.stem.rpartition("_")[2]) for p in folder.glob(f"{stem}_*.png") if p.stem.rpartition("_")[2].isdigit()]
    return folder / f"{stem}_{max(taken, default=0) + 1:04d}.png"


@torch.no_grad()
def show(source: str, *, inputs: list[str] | None = None, num_images: int = 8, k: float | None = None,
         alpha: float | None = None, out: str | Path | None = None, seed: int = 0) -> Path:
    """Draw the localization picture for ``source`` (run folder, export folder or ``hf-hub:`` id).

    Images get the localization passes' preprocessing and the run's ``k``, heatmap alignment, box rule and
    flip averaging, so on a run's own images the boxes are the ones a pass with this backbone would write.
    """
    run_dir = Path(source)
    run = RunInfo.load(run_dir) if (run_dir / RUN_FILE).is_file() else None
    # a backbone without a run (export folder, hf-hub:) gets the paper's k and a wide alpha for the picture
    schedule = run.schedule if run is not None and run.schedule is not None else DEFAULT_SCHEDULE
    k = schedule.k if k is None else k
    alpha = schedule.alpha if alpha is None else alpha
    alignment = schedule.heatmap_alignment
    model = load_backbone(source).eval()
    cfg = backbone_data_config(model)
    gt = None
    if inputs:
        images, names = _input_images(inputs, num_images)
    elif run is not None:
        images, names, gt = _run_images(run, run_dir, num_images)
    else:
        raise ValueError("give --input FILES_OR_FOLDER (this source is not a run folder with its own data)")
    batch = localization_batch(images, cfg)
    # as a pass with crop.heatmap auto: the feature map of a CNN; of a ViT's two maps (class-token attention,
    # token norm), the attention unless its boxes fail the follow check on these images
    follow = FollowCheck(len(batch))
    _, boxes = localize_boxes(model, [(batch, torch.arange(len(batch)))], k=k, alignment=alignment,
                              rule=schedule.box_rule, flip=schedule.heatmap_flip, heatmap="auto", progress=False,
                              follow=follow)
    maps, _ = input_heatmaps(model, batch, alignment, schedule.heatmap_flip, follow.source)
    pixels = to_uint8(batch, cfg["mean"], cfg["std"])
    out = Path(out) if out else next_picture_path(run_dir / "pictures" if run is not None else Path.cwd())
    path = draw_localization_grid(pixels, maps, boxes, out, alpha=alpha, gt_boxes=gt, seed=seed, ids=names,
                                  title=f"{source}: {follow.source} heatmaps at k={k} ({alignment} alignment), "
                                        f"crops at alpha={alpha}")
    print(f"wrote {path} ({len(images)} images: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    if len(follow.sources) > 1:  # a ViT: say which of its two maps drew the boxes, and why
        print(heatmap_choice_line(follow.source, follow.source_scores()))
    metrics = box_quality(boxes, gt, follow=follow.score()).metrics()
    verdict = box_verdict(metrics)
    print(f"boxes of these {len(images)} images: {quality_line(metrics)}" + (f"\n  so {verdict}" if verdict else ""))
    return path

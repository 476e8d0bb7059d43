"""``hub-ccrop show``: what a backbone localizes on your own images, as a picture.

    hub-ccrop show runs/quickstart --images 8                      # the run's own training images
    hub-ccrop show hf-hub:ORG/NAME --input photos/ --images 12     # any backbone, your folder of images

One row per image: the box (yellow) the backbone's heatmap gives at threshold k, the heatmap, two
ContrastiveCrop views from that box and two RandomResizedCrop views for comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hub_ccrop.data import decode_image
from hub_ccrop.evaluate import backbone_data_config, classification_transform, load_backbone
from hub_ccrop.localize import heatmaps, model_boxes, picture_heatmaps
from hub_ccrop.viz import draw_localization_grid, to_uint8

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _input_images(inputs: list[str], limit: int) -> tuple[list[Image.Image], list[str]]:
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
    return [decode_image({"bytes": f.read_bytes(), "path": str(f)}, f.name) for f in files], [f.name for f in files]


def _run_images(run_dir: Path, limit: int) -> tuple[list[Image.Image], list[int], torch.Tensor | None]:
    """Evenly spaced training images of a run, their ids, and ground-truth boxes when the data has them."""
    from hub_ccrop.data import get_spec, load_images

    run = json.loads((run_dir / "run.json").read_text())
    spec = get_spec(run["dataset"]["name"])
    rows = load_images(spec, spec.pretrain_splits)
    ids = torch.linspace(0, len(rows) - 1, min(limit, len(rows))).long().tolist()
    picked = [rows[i] for i in ids]
    gt = torch.tensor([r["gt_box"] for r in picked]) if "gt_box" in rows.column_names else None
    return [decode_image(r["image"], r["id"]) for r in picked], [r["id"] for r in picked], gt


@torch.no_grad()
def show(source: str, *, inputs: list[str] | None = None, num_images: int = 8, k: float | None = None,
         alpha: float | None = None, out: str | Path | None = None, seed: int = 0) -> Path:
    """Draw the localization picture for ``source`` (run folder, export folder or ``hf-hub:`` id)."""
    run_dir = Path(source)
    run: dict[str, Any] = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    schedule = run.get("schedule", {})
    k = schedule.get("k", 0.1) if k is None else k
    alpha = schedule.get("alpha", 0.6) if alpha is None else alpha
    model = load_backbone(source).eval()
    cfg = backbone_data_config(model)
    gt = None
    if inputs:
        images, names = _input_images(inputs, num_images)
    elif run:
        images, names, gt = _run_images(run_dir, num_images)
    else:
        raise ValueError("give --input FILES_OR_FOLDER (this source is not a run folder with its own data)")
    transform = classification_transform(cfg, train=False)
    batch = torch.stack([transform(img) for img in images])
    raw = heatmaps(model, batch)
    size = tuple(batch.shape[-2:])
    alignment = schedule.get("heatmap_alignment", "receptive_field")
    boxes = model_boxes(model, raw, size, k, alignment)
    maps = picture_heatmaps(model, raw, size, alignment)
    pixels = to_uint8(batch, cfg["mean"], cfg["std"])
    out = Path(out) if out else (run_dir / "pictures" / "show.png" if run else Path("show.png"))
    path = draw_localization_grid(pixels, maps, boxes, out, alpha=alpha, gt_boxes=gt, seed=seed,
                                  title=f"{source}: heatmaps at k={k}, crops at alpha={alpha}")
    print(f"wrote {path} ({len(images)} images: {', '.join(map(str, names[:4]))}{', ...' if len(names) > 4 else ''})")
    return path


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("show", help="draw heatmaps, boxes and crop pairs for a backbone on images",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run folder, export folder, local-dir:DIR or hf-hub:ORG/NAME")
    parser.add_argument("--input", nargs="+", default=None, help="image files or folders (default: the run's data)")
    parser.add_argument("--images", type=int, default=8, help="how many images (default 8)")
    parser.add_argument("--k", type=float, default=None, help="heatmap threshold (default: the run's, else 0.1)")
    parser.add_argument("--alpha", type=float, default=None, help="Beta(alpha, alpha) of the crops (default: the run's)")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/pictures/show.png or ./show.png)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    show(args.source, inputs=args.input, num_images=args.images, k=args.k, alpha=args.alpha, out=args.out)
    return 0

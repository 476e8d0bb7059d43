"""Boxes on real photos (issue 25): do training-free saliency maps find the objects where the CPU-trained
backbones do not?

Classic bottom-up saliency needs no training, so it is the cheapest "stronger localizer" there is. Each map
below is turned into boxes by the library's rules (``hub_ccrop.localize.boxes_from_maps``) and judged by
``box_quality`` against the objects, beside the whole image and the centred box of the same size:

- ``frequency_tuned``: Achanta et al. 2009, the Lab distance of each (blurred) pixel from the image's mean colour;
- ``spectral_residual``: Hou & Zhang 2007, the log-amplitude spectrum minus its local mean, back with the phase;
- ``border_contrast``: the Lab distance to the nearest of the four border strips' mean colours (the
  boundary prior of salient-object detection: the background touches the frame, the object does not);
- ``border_gaussian``: the Mahalanobis distance from a Gaussian fitted to the border pixels' colours.

    .venv/bin/python benchmarks/saliency_boxes.py --rows 8000
    .venv/bin/python benchmarks/saliency_boxes.py --study room --rows 8000

``room``: how much a localizer can gain over the centred box at all: the objects' own boxes centred, and
boxes of fixed sides on the objects' true centres against the same boxes centred.

Reads ``$HUB_CCROP_SHARED/data/tiny_imagenet_boxes`` (the pretraining rows of ``tiny_imagenet_boxes.py``);
writes ``benchmarks/evidence/saliency_boxes[_TAG].json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kornia
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from evidence_small_objects import EVIDENCE, machine  # noqa: E402
from tiny_imagenet_boxes import default_data_dir  # noqa: E402

from hub_ccrop.box_quality import box_quality  # noqa: E402
from hub_ccrop.boxes import box_centres  # noqa: E402
from hub_ccrop.localize import boxes_from_maps, normalize_heatmaps  # noqa: E402

BORDER = 4  # pixels of the border strips (1/16 of a 64 px photo)
RULES = [("threshold", k) for k in (0.2, 0.3, 0.4, 0.5, 0.6)] + [("largest_component", k) for k in (0.3, 0.5)] \
    + [("quantile", q) for q in (0.5, 0.7)]


def load_photos(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` photos ``[N, 3, H, W]`` in [0, 1] and their object boxes ``[N, 4]``."""
    files = sorted((default_data_dir() / "data").glob("*.parquet"))
    table = pq.read_table(files[0], columns=["image", "gt_box"]).slice(0, rows).to_pydict()
    pixels = [np.array(Image.open(io.BytesIO(row["bytes"])).convert("RGB")) for row in table["image"]]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return images, torch.tensor(table["gt_box"], dtype=torch.float64)


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    size = int(4 * sigma) | 1
    return kornia.filters.gaussian_blur2d(maps, (size, size), (sigma, sigma), border_type="reflect")


def frequency_tuned(images: torch.Tensor) -> torch.Tensor:
    lab = kornia.color.rgb_to_lab(images)
    return (blur(lab, 1.0) - lab.mean(dim=(2, 3), keepdim=True)).norm(dim=1)


def spectral_residual(images: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.fft2(images.mean(dim=1))
    log_amplitude, phase = torch.log(spectrum.abs() + 1e-8), torch.angle(spectrum)
    local_mean = F.avg_pool2d(F.pad(log_amplitude[:, None], (1, 1, 1, 1), mode="circular"), 3, 1)[:, 0]
    saliency = torch.fft.ifft2(torch.exp(log_amplitude - local_mean + 1j * phase)).abs() ** 2
    return blur(saliency[:, None], 2.5)[:, 0]


def border_contrast(images: torch.Tensor) -> torch.Tensor:
    lab = blur(kornia.color.rgb_to_lab(images), 1.0)
    strips = [lab[:, :, :BORDER], lab[:, :, -BORDER:], lab[:, :, :, :BORDER], lab[:, :, :, -BORDER:]]
    means = [strip.mean(dim=(2, 3))[:, :, None, None] for strip in strips]
    return torch.stack([(lab - mean).norm(dim=1) for mean in means]).min(dim=0).values


def border_gaussian(images: torch.Tensor) -> torch.Tensor:
    lab = blur(kornia.color.rgb_to_lab(images), 1.0)
    n, _, h, w = lab.shape
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border = lab[:, :, frame]
    mean = border.mean(dim=2, keepdim=True)
    cov = (border - mean) @ (border - mean).transpose(1, 2) / border.shape[2] + torch.eye(3)  # + 1: flat borders
    diff = lab.flatten(2) - mean
    return (diff * torch.linalg.solve(cov, diff)).sum(dim=1).sqrt().view(n, h, w)


SALIENCY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "frequency_tuned": frequency_tuned, "spectral_residual": spectral_residual,
    "border_contrast": border_contrast, "border_gaussian": border_gaussian,
}


def room(gt: torch.Tensor) -> dict[str, Any]:
    """The centred-box baseline of the objects' own boxes, and what knowing the objects' centres is worth."""
    centres = box_centres(gt)
    out: dict[str, Any] = {"objects_centre_mean": centres.mean(dim=0).tolist(), "objects_centre_std": centres.std(dim=0).tolist(),
                           "objects_centred": box_quality(gt, gt).metrics(), "fixed_side": {}}
    for side in (0.5, 0.6, 0.7, 0.8):
        boxes = torch.cat([centres - side / 2, centres + side / 2], dim=1).clamp(0, 1)
        q = box_quality(boxes, gt).metrics()
        out["fixed_side"][side] = q
        print(f"side {side}: on the objects' centres {q['box_iou']:.3f} vs centred {q['box_iou_centred']:.3f}; small "
              f"{q['box_iou_small']:.3f} vs {q['box_iou_centred_small']:.3f}")
    q = out["objects_centred"]
    print(f"the objects' own boxes, centred: IoU {q['box_iou_centred']:.3f} (small {q['box_iou_centred_small']:.3f}); "
          f"objects' centre {out['objects_centre_mean']} +- {out['objects_centre_std']}")
    return out


def saliency_study(images: torch.Tensor, gt: torch.Tensor) -> dict[str, Any]:
    results = []
    for name, saliency in SALIENCY.items():
        maps, constant = normalize_heatmaps(torch.cat([saliency(batch) for batch in images.split(1000)]))
        for rule, k in RULES:
            q = box_quality(boxes_from_maps(maps, constant, k, rule), gt).metrics()
            row = {"saliency": name, "rule": rule, "k": k, **q, "gain": q["box_iou"] - q["box_iou_centred"],
                   "gain_small": q["box_iou_small"] - q["box_iou_centred_small"]}
            results.append(row)
            print(f"{name:18s} {rule:17s} k {k:.1f}: IoU {q['box_iou']:.3f} (centred {q['box_iou_centred']:.3f}, "
                  f"gain {row['gain']:+.3f}); small {q['box_iou_small']:.3f} (centred "
                  f"{q['box_iou_centred_small']:.3f}, gain {row['gain_small']:+.3f}); area {q['box_area']:.2f}",
                  flush=True)
    best = max(results, key=lambda r: r["gain"])
    best_small = max(results, key=lambda r: r["gain_small"])
    print(f"best overall: {best['saliency']} {best['rule']} k {best['k']} {best['gain']:+.3f}; best on small objects: "
          f"{best_small['saliency']} {best_small['rule']} k {best_small['k']} {best_small['gain_small']:+.3f}")
    return {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=("saliency", "room"), default="saliency")
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    tic = time.perf_counter()
    images, gt = load_photos(args.rows)
    out = {"images": len(images), **(saliency_study(images, gt) if args.study == "saliency" else room(gt))}
    out["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "seconds": time.perf_counter() - tic,
                   "command": " ".join([".venv/bin/python", "benchmarks/saliency_boxes.py", *sys.argv[1:]])}
    name = "saliency_boxes" if args.study == "saliency" else "box_room"
    path = EVIDENCE / f"{name}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

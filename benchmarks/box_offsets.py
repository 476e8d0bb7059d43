"""Signed offsets of a run's learned boxes from the ground-truth boxes of the small-objects sets.

For each box table of each run folder (``boxes/epoch_*.parquet`` and the final ``boxes.parquet``): the
mean offset of the box centre (x right, y down) and of each edge, as fractions of the image. A geometric
misplacement of the heatmap (cell centres in the wrong place) shifts x and y alike, in every run and
pass; a learned asymmetry of the backbone's response changes from run to run.

    .venv/bin/python benchmarks/box_offsets.py /tmp/evidence_runs/small_objects_hard24_ccrop_s*
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub_ccrop.boxes import BoxTable  # noqa: E402
from hub_ccrop.data import get_spec, load_images  # noqa: E402


@cache
def ground_truth(dataset: str) -> torch.Tensor:
    """The ground-truth boxes of a registered small-objects dataset's training images, in row order."""
    return torch.tensor(load_images(get_spec(dataset))["gt_box"], dtype=torch.float32)


def offsets(boxes: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 - (gt[:, :2] + gt[:, 2:]) / 2
    edges = (boxes - gt).mean(dim=0)
    return {"centre_dx": float(centre[:, 0].mean()), "centre_dy": float(centre[:, 1].mean()),
            **{f"edge_{name}": float(v) for name, v in zip(("x0", "y0", "x1", "y1"), edges, strict=True)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders trained on small_objects(_hard)")
    args = parser.parse_args()
    for run in args.runs:
        dataset = json.loads((run / "run.json").read_text())["dataset"]["name"]
        gt = ground_truth(dataset)
        for path in [*sorted((run / "boxes").glob("epoch_*.parquet")), run / "boxes.parquet"]:
            if not path.is_file():
                continue
            table = BoxTable.load(path)
            o = offsets(table.boxes, gt)
            print(f"{run.name:32s} {path.name:20s} centre dx {o['centre_dx']:+.3f} dy {o['centre_dy']:+.3f} | edges "
                  + " ".join(f"{k[5:]} {v:+.3f}" for k, v in o.items() if k.startswith("edge_")))


if __name__ == "__main__":
    main()

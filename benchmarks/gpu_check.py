"""The GPU checks of issue 14, run by ``benchmarks/gpu_check.sh`` (one short script for a lent GPU).

``views``: views/s of the batched augmentation on the device at 32 px (random CIFAR-sized JPEGs) and at
224 px (ImageNet-like JPEGs, as in ``bench_views.py``), from CPU-decoded uint8 batches, from JPEG bytes
decoded on the device (nvJPEG, ``ViewCollate(device_decode=True)``) and, at 32 px, from device-resident
images; plus the host syncs one augmented batch makes (``torch.cuda.set_sync_debug_mode``).
``data``: writes a CIFAR-10-shaped parquet folder (random smooth 32 px JPEGs) for the training check.
``--device cpu --small`` dry-runs everything on a CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_views import imagenet_like_rows  # noqa: E402

from hub_ccrop.boxes import BoxTable  # noqa: E402
from hub_ccrop.data import get_spec  # noqa: E402
from hub_ccrop.views import CropSampler, DeviceResidentImages, ViewCollate  # noqa: E402


def cifar_like_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)
        buf = io.BytesIO()
        coarse.save(buf, "JPEG", quality=90)
        rows.append({"id": k, "image": {"bytes": buf.getvalue(), "path": None}, "label": k % 10})
    return rows


def timed(fn, repeats: int, device: torch.device) -> float:
    """Best seconds of ``fn()`` over ``repeats`` (after a warm-up), synchronized."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def views_check(device: torch.device, small: bool, repeats: int) -> dict:
    results = {}
    sets = {"32px": (cifar_like_rows(256 if small else 4096), get_spec("cifar10"), 512),
            "224px": (imagenet_like_rows(16 if small else 256)[0], get_spec("imagenet1k"), 128)}
    for name, (rows, spec, batch) in sets.items():
        batch = min(batch, len(rows))
        table = BoxTable(len(rows))
        raw = ViewCollate.from_spec(spec, table, raw=True)
        encoded = ViewCollate.from_spec(spec, table, device_decode=True)
        augment = raw.augment.to(device)
        encoded.augment.to(device)
        batches = [rows[k : k + batch] for k in range(0, len(rows), batch)]
        raw_batches = [raw(b) for b in batches]  # CPU decode (DataLoader workers' job), not timed
        encoded_batches = [encoded(b) for b in batches]
        views = 2 * len(rows)

        def from_uint8(raw_batches=raw_batches, augment=augment) -> None:
            for b in raw_batches:
                augment(b.to(device, non_blocking=True))

        def from_jpeg(encoded_batches=encoded_batches, encoded=encoded) -> None:
            for b in encoded_batches:
                encoded.augment(encoded.decode_on(b, device))

        row = {"views_per_s_augment_only": views / timed(from_uint8, repeats, device),
               "views_per_s_device_decode_and_augment": views / timed(from_jpeg, repeats, device)}
        if name == "32px":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resident = DeviceResidentImages(rows, device)
            crops = CropSampler(table)

            def from_resident(resident=resident, crops=crops, augment=augment, batch=batch) -> None:
                for b in resident.iter_batches(batch, crops):
                    augment(b)

            row["views_per_s_device_resident"] = views / timed(from_resident, repeats, device)
        if device.type == "cuda":  # host syncs made by augmenting one batch (0 is the goal)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                augment(raw_batches[0].to(device, non_blocking=True))
                torch.cuda.set_sync_debug_mode(0)
            row["host_syncs_per_augmented_batch"] = sum("synchroniz" in str(w.message) for w in caught)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    return results


def write_cifar_like(folder: Path, rows: int) -> None:
    """``folder/plain_text/train-00000-of-00001.parquet`` like the Hub's CIFAR-10 (columns img, label)."""
    data = cifar_like_rows(rows, seed=1)
    table = pa.table({"img": [r["image"] for r in data], "label": [r["label"] for r in data]})
    (folder / "plain_text").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "plain_text" / "train-00000-of-00001.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["views", "data"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a few images only (a dry run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the CIFAR-shaped training set")
    parser.add_argument("--out", type=Path, required=True, help="a JSON file (views) or a folder (data)")
    args = parser.parse_args()
    if args.check == "data":
        write_cifar_like(args.out, args.rows)
        return
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "views": views_check(device, args.small, args.repeats)}
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

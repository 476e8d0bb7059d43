"""Milliseconds of the view pipeline's single ops, each against what it replaced (issue 21), one thread:

1. ``blur_224``: a 224 px Gaussian blur (23 taps) per sigma, ``ops.gaussian_blur`` against the same banded
   GEMMs with the denormal taps kept (``NEGLIGIBLE_TAP`` patched to 0);
2. ``per_image_blur``: a 224 px PIL view, ``GaussianBlurPIL`` against torchvision's ``GaussianBlur``;
3. ``resize_224``: one crop of a 500x375 image resized to 224 px with antialiasing, uint8 channels-last
   (what CPU batches do) against float;
4. ``decode``: 32 ImageNet-like JPEGs, ``decode_to_tensor`` with ``max_side=640`` through torchvision's
   decoder (today) against the PIL path (``decode_image`` + tensor, what it took before).

Each number is the best of ``--repeats`` timings (the noise of a shared machine only adds time), but
the per-image blur's: it draws a sigma per call, so it is the median over the draws.

    python benchmarks/bench_view_ops.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_views import imagenet_like_rows  # noqa: E402

from hub_ccrop.data.decode import decode_image, decode_to_tensor  # noqa: E402
from hub_ccrop.views import ops  # noqa: E402
from hub_ccrop.views.collate import GaussianBlurPIL  # noqa: E402


def best_ms(fn: Callable[[], object], repeats: int, stat: Callable[[list[float]], float] = min) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * stat(times)


def blur_224(repeats: int) -> dict:
    x = torch.rand(1, 3, 224, 224)
    out = {}
    for sigma in (0.1, 0.3, 0.5, 0.8, 1.0, 2.0):
        s = torch.tensor([sigma])
        today = best_ms(lambda s=s: ops.gaussian_blur(x, s, 23), repeats)
        with mock.patch.object(ops, "NEGLIGIBLE_TAP", 0.0):
            kept = best_ms(lambda s=s: ops.gaussian_blur(x, s, 23), repeats)
        out[str(sigma)] = {"today_ms": today, "denormal_taps_kept_ms": kept}
    return out


def per_image_blur(repeats: int) -> dict:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    ours, theirs = GaussianBlurPIL(23, (0.1, 2.0)), T.GaussianBlur(23, (0.1, 2.0))
    # each call draws its sigma (the same stream for both): the median over the draws, not the best
    torch.manual_seed(0)
    today = best_ms(lambda: ours(img), repeats, statistics.median)
    torch.manual_seed(0)
    return {"today_ms": today, "torchvision_ms": best_ms(lambda: theirs(img), repeats, statistics.median)}


def resize_224(repeats: int) -> dict:
    hwc = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8)
    crop = hwc.permute(2, 0, 1)[None, :, 20:320, 50:450]  # a channels-last view, as stack_padded's batches
    resize = {"size": (224, 224), "mode": "bilinear", "antialias": True}
    return {"uint8_channels_last_ms": best_ms(lambda: F.interpolate(crop, **resize), repeats),
            "float_ms": best_ms(lambda: F.interpolate(crop.contiguous().float(), **resize), repeats)}  # fmt: skip


def decode(repeats: int) -> dict:
    rows, _ = imagenet_like_rows(32)
    values = [r["image"] for r in rows]

    def pil() -> None:
        for v in values:
            torch.from_numpy(np.array(decode_image(v, max_side=640))).permute(2, 0, 1)

    return {"images": len(values),
            "today_ms": best_ms(lambda: [decode_to_tensor(v, max_side=640) for v in values], repeats),
            "pil_ms": best_ms(pil, repeats)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_view_ops.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"blur_224": blur_224(args.repeats), "per_image_blur": per_image_blur(args.repeats),
               "resize_224": resize_224(args.repeats), "decode": decode(max(3, args.repeats // 4))}  # fmt: skip
    print(json.dumps(results, indent=1))
    meta = {"command": "python benchmarks/bench_view_ops.py", "date": datetime.date.today().isoformat(),
            "threads": 1, "torch": torch.__version__, "repeats": args.repeats}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

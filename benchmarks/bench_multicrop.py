"""Views per second of multi-crop (DINO's 2 x 224 px global + 6 x 96 px local crops) and of the two-view
paths before/after issue 21 (views as groups), each set timed side by side in one process.

1. ``multicrop``: ImageNet-like JPEG rows (decode included), DINO's augmentation
   (``DataAugmentationDINO`` of the official code: global scale (0.4, 1), local scale (0.05, 0.4), flip,
   ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur p = 1.0 / 0.1 / 0.5, solarize p=0.2 on
   the second global crop) as three hub_ccrop view groups through ``ViewCollate`` (``per_image``:
   batched=False, ``batched``: batched=True; both RandomResizedCrop, ``batched_ccrop``: ContrastiveCrop on
   the global groups), against lightly's ``DINOTransform`` applied per decoded PIL image plus lightly's
   ``MultiViewCollate`` (``lightly_dino``).
2. ``two_view_*``: today's two-view ``ViewCollate`` (per image and batched, RandomResizedCrop) against
   ``TwoViewCollate`` of ``hub_ccrop/views.py`` at git revision ``--before`` (loaded from git, run with
   today's boxes/crop/data modules, which issue 21 left unchanged), at 32 px (CIFAR-10) and 224 px.

Every pipeline runs on every batch round-robin (order rotated), ``--repeats`` times, one torch thread:
``views_per_s`` adds up each batch's best time, ``views_per_s_median`` uses the median full pass.

    python benchmarks/bench_multicrop.py --rows 96 --rows-32 2048 --rows-224 128 --repeats 3 --before 503d51e
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_views import cifar_rows, imagenet_like_rows, round_robin, shared_cifar, views_at  # noqa: E402

from hub_ccrop.boxes import BoxTable  # noqa: E402
from hub_ccrop.data import get_spec  # noqa: E402
from hub_ccrop.recipe import Recipe, ViewGroup  # noqa: E402
from hub_ccrop.views import ViewCollate, max_side_for  # noqa: E402

Pipeline = Callable[[list[dict]], object]
DINO_JITTER = [0.4, 0.4, 0.2, 0.1]


def dino_groups(global_size: int = 224, local_size: int = 96, local_count: int = 6) -> list[ViewGroup]:
    """DataAugmentationDINO's three pipelines as view groups, resolved as a recipe's ``views:`` are."""
    common = {"jitter": DINO_JITTER, "jitter_p": 0.8, "gray_p": 0.2, "flip_p": 0.5, "blur_sigma": [0.1, 2.0]}
    views = [
        ViewGroup(count=1, size=global_size, scale=[0.4, 1.0], crop="ccrop", blur_p=1.0, **common),
        ViewGroup(
            count=1, size=global_size, scale=[0.4, 1.0], crop="ccrop", blur_p=0.1, solarize_p=0.2, **common
        ),
        ViewGroup(count=local_count, size=local_size, scale=[0.05, 0.4], crop="rcrop", blur_p=0.5, **common),
    ]
    return Recipe(views=views).view_groups(global_size)


class LightlyDINO:
    """lightly's DINOTransform per image (PIL decode first) and lightly's MultiViewCollate."""

    def __init__(self) -> None:
        from lightly.data.multi_view_collate import MultiViewCollate
        from lightly.transforms import DINOTransform

        self.transform = DINOTransform()  # its defaults are DINO's (cj_strength 0.5 x (0.8, 0.8, 0.4, 0.2))
        self.collate = MultiViewCollate()

    def __call__(self, rows: list[dict]):
        batch = []
        for r in rows:
            img = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
            batch.append((self.transform(img), r["label"], str(r["id"])))
        return self.collate(batch)


def random_boxes(num_ids: int) -> BoxTable:
    """A box per id covering ~5-60% of its image (as after a localization pass)."""
    table = BoxTable(num_ids)
    g = torch.Generator().manual_seed(0)
    wh = 0.22 + 0.55 * torch.rand(num_ids, 2, generator=g)
    xy = (1 - wh) * torch.rand(num_ids, 2, generator=g)
    table.update(torch.arange(num_ids), torch.cat([xy, xy + wh], dim=1))
    return table


def multicrop_pipelines(num_ids: int) -> dict[str, Pipeline]:
    spec = get_spec("imagenet1k")
    groups, table = dino_groups(), random_boxes(num_ids)
    common = {
        "mean": spec.mean,
        "std": spec.std,
        "groups": groups,
        "max_side": max_side_for(spec),
        "alpha": 0.6,
    }
    try:
        lightly = LightlyDINO()
    except ImportError:
        raise SystemExit("lightly is not installed: pip install -e '.[bench]'") from None
    return {
        "lightly_dino": lightly,
        "per_image": ViewCollate(table, batched=False, mode="rcrop", **common),
        "batched": ViewCollate(table, batched=True, mode="rcrop", **common),
        "batched_ccrop": ViewCollate(table, batched=True, mode="ccrop", **common),
    }


def two_view_pipelines(spec, num_ids: int, before) -> dict[str, Pipeline]:
    out: dict[str, Pipeline] = {}
    for batched in (False, True):
        path = "batched" if batched else "per_image"
        out[f"after_{path}"] = ViewCollate.from_spec(spec, None, mode="rcrop", batched=batched)
        out[f"before_{path}"] = before.TwoViewCollate.from_spec(spec, None, mode="rcrop", batched=batched)
    return out


def views_of(out) -> list[tuple[int, ...]]:
    """The view shapes a pipeline returned (to check that all of them make the same views)."""
    if isinstance(out, tuple) and isinstance(out[0], list):  # lightly: (views, labels, names)
        return [tuple(v.shape) for v in out[0]]
    if isinstance(out, tuple):  # the old TwoViewCollate: (view1, view2, ids, labels)
        return [tuple(out[0].shape), tuple(out[1].shape)]
    return [tuple(c.shape) for c in out.crops]


def run(rows: list[dict], fns: dict[str, Pipeline], batch_size: int, repeats: int) -> dict:
    """Every pipeline on every batch, round-robin (rotating the order), ``repeats`` times."""
    batches = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    names = list(fns)
    shapes = {name: views_of(fn(batches[0])) for name, fn in fns.items()}  # warm-up
    if len({tuple(s) for s in shapes.values()}) != 1:
        raise SystemExit(f"pipelines make different views: {shapes}")
    best, totals = round_robin(batches, fns, repeats)
    views = len(shapes[names[0]]) * len(rows)
    return {
        name: {
            "views_per_s": views / sum(best[name]),
            "views_per_s_median": views / statistics.median(totals[name]),
        }
        for name in names
    }


def multicrop(rows: list[dict], batch_size: int, repeats: int) -> dict:
    res = run(rows, multicrop_pipelines(len(rows)), batch_size, repeats)
    ref = res["lightly_dino"]
    for r in res.values():
        r["x_lightly"] = r["views_per_s"] / ref["views_per_s"]
        r["x_lightly_median"] = r["views_per_s_median"] / ref["views_per_s_median"]
    ours = max(("per_image", "batched"), key=lambda k: res[k]["views_per_s"])
    return {"rows": len(rows), "batch_size": batch_size, "views_per_image": 8, "fastest": ours,
            "fastest_x_lightly": res[ours]["x_lightly"], "pipelines": res}  # fmt: skip


def two_view(rows: list[dict], spec, batch_size: int, repeats: int, before) -> dict:
    res = run(rows, two_view_pipelines(spec, max(r["id"] for r in rows) + 1, before), batch_size, repeats)
    ratios = {}
    for path in ("per_image", "batched"):
        after, prior = res[f"after_{path}"], res[f"before_{path}"]
        # after / before in time = before / after in views per second (<= 1: no slower than before)
        ratios[path] = {"time_after_over_before": prior["views_per_s"] / after["views_per_s"],
                        "time_after_over_before_median": prior["views_per_s_median"] / after["views_per_s_median"]}  # fmt: skip
    return {"rows": len(rows), "image_size": spec.image_size, "batch_size": batch_size, "pipelines": res,
            "ratios": ratios}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=96, help="ImageNet-like images of the multi-crop set")
    parser.add_argument("--batch-size", type=int, default=32, help="images per multi-crop batch")
    parser.add_argument("--rows-32", type=int, default=2048, help="CIFAR-10 images of the 32 px two-view set")
    parser.add_argument("--batch-size-32", type=int, default=256)
    parser.add_argument(
        "--rows-224", type=int, default=128, help="ImageNet-like images of the 224 px two-view set"
    )
    parser.add_argument("--batch-size-224", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--before", default="503d51e", help="git revision of the two-view code to compare with"
    )
    parser.add_argument("--parts", default="multicrop,two_view_32,two_view_224")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_multicrop.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    results: dict[str, dict] = {}
    start = time.perf_counter()

    if "multicrop" in parts:
        rows, _ = imagenet_like_rows(args.rows)
        res = results["multicrop"] = multicrop(rows, args.batch_size, args.repeats)
        print(f"\nmulti-crop 2 x 224 + 6 x 96, {len(rows)} ImageNet-like JPEGs, batch {args.batch_size}, "
              f"{args.threads} thread(s)")  # fmt: skip
        print(f"{'pipeline':<16}{'views/s':>10}{'median':>10}{'x lightly':>11}{'(median)':>10}")
        for name, r in res["pipelines"].items():
            print(f"{name:<16}{r['views_per_s']:>10.1f}{r['views_per_s_median']:>10.1f}{r['x_lightly']:>11.2f}"
                  f"{r['x_lightly_median']:>10.2f}")  # fmt: skip

    before = views_at(args.before) if any(p.startswith("two_view") for p in parts) else None
    for part in ("two_view_32", "two_view_224"):
        if part not in parts:
            continue
        if part == "two_view_32":
            if not shared_cifar().exists():
                print(f"\nskipping {part}: {shared_cifar()} not found")
                continue
            rows, info = cifar_rows(args.rows_32)
            batch_size = args.batch_size_32
        else:
            rows, info = imagenet_like_rows(args.rows_224)
            batch_size = args.batch_size_224
        res = results[part] = two_view(rows, info["spec"], batch_size, args.repeats, before)
        print(f"\ntwo views, {info['spec'].image_size} px, {len(rows)} images, batch {batch_size}: "
              f"after = now, before = {args.before}")  # fmt: skip
        print(f"{'pipeline':<18}{'views/s':>10}{'median':>10}")
        for name, r in res["pipelines"].items():
            print(f"{name:<18}{r['views_per_s']:>10.1f}{r['views_per_s_median']:>10.1f}")
        for path, r in res["ratios"].items():
            print(f"time after/before, {path}: {r['time_after_over_before']:.3f} "
                  f"(median {r['time_after_over_before_median']:.3f})")  # fmt: skip

    elapsed = time.perf_counter() - start
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "seconds": round(elapsed, 1),
        "before": args.before,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import lightly
        import torchvision

        meta.update(lightly=lightly.__version__, torchvision=torchvision.__version__)
    except ImportError:
        pass
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\n{elapsed:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

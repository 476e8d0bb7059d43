"""Views per second of the collate stage (decode + two augmented views per image).

Pipelines, each over the same in-memory rows (image bytes), batch by batch like a DataLoader's
``collate_fn``, timed round-robin so machine noise hits all of them alike (best of ``--repeats``):

* ``torchvision_rrc``: the reference, torchvision's per-image pipeline (PIL decode,
  ``RandomResizedCrop``, flip, ColorJitter p=0.8, grayscale p=0.2, [blur], ``ToTensor``, ``Normalize``);
* ``per_image_rcrop`` / ``per_image_ccrop``: ``ViewCollate(batched=False)`` in each mode;
* ``batched_rcrop`` / ``batched_ccrop``: ``ViewCollate(batched=True)`` (roi_align + batched ops, CPU);
* ``kornia_batched``: torchvision's libjpeg-turbo decode, then kornia's batched augmentation
  (``kornia.augmentation``, same-size images batched together), when kornia is installed;
* ``before_batched_rcrop``: with ``--before REV``, the batched path of ``hub_ccrop/views.py`` at git
  revision REV (side by side with today's, in the same process).

ContrastiveCrop runs with random boxes (5-60% of the image) in the box table.
Datasets: the CIFAR-10 parquet in ``../shared/data/cifar10`` (32 px JPEG) and ImageNet-like JPEGs made
here (375x500 and 500x375, quality 90, smooth random content with blur; ImageNet pipeline with blur).

    python benchmarks/bench_views.py --rows 4096 --threads 1 --before f2f22bb
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hub_ccrop.boxes import BoxTable  # noqa: E402
from hub_ccrop.data import decode_to_tensor, get_spec, load_images  # noqa: E402
from hub_ccrop.views import ViewCollate, blur_kernel_size  # noqa: E402


def shared_cifar() -> Path:
    root = Path(os.environ["HUB_CCROP_SHARED"]) if os.environ.get("HUB_CCROP_SHARED") else REPO.parent / "shared"
    return root / "data" / "cifar10"


def cifar_rows(n: int) -> tuple[list[dict], dict]:
    spec = get_spec("cifar10", data_dir=str(shared_cifar()))
    ds = load_images(spec, f"train[:{n}]")
    return [dict(r) for r in ds], {"spec": spec, "alpha": 0.1}


def imagenet_like_rows(n: int) -> tuple[list[dict], dict]:
    """ImageNet-sized JPEGs (half 500x375, half 375x500, quality 90): smooth random colour fields with
    detail, blurred like photos, so they compress and decode like real ones."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        width, height = (500, 375) if k % 2 == 0 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        img = img + rng.integers(-24, 25, (height, width, 3), dtype=np.int16)  # texture
        img = Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        rows.append({"id": k, "image": {"bytes": buf.getvalue(), "path": None}, "label": k % 10})
    return rows, {"spec": get_spec("imagenet1k"), "alpha": 0.6}


class TorchvisionReference:
    """The classic per-image pipeline, the same two views per image, default-collated."""

    def __init__(self, size: int, mean, std, blur: bool) -> None:
        steps = [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        if blur:
            steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5))
        self.transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, rows: list[dict]):
        v1, v2 = [], []
        for r in rows:
            img = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
            v1.append(self.transform(img))
            v2.append(self.transform(img))
        ids = torch.tensor([r["id"] for r in rows])
        labels = torch.tensor([r["label"] for r in rows])
        return torch.stack(v1), torch.stack(v2), ids, labels


class KorniaBatched:
    """torchvision's JPEG decode, then kornia's batched augmentation over each group of same-size images."""

    def __init__(self, size: int, mean, std, blur: bool) -> None:
        import kornia.augmentation as K

        steps = [
            K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
        ]
        if blur:
            steps.append(K.RandomGaussianBlur((blur_kernel_size(size),) * 2, (0.1, 2.0), p=0.5))
        steps.append(K.Normalize(torch.tensor(mean), torch.tensor(std)))
        self.augment = K.AugmentationSequential(*steps)

    @torch.no_grad()
    def __call__(self, rows: list[dict]):
        images = [decode_to_tensor(r["image"], r["id"]) for r in rows]
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(k)
        views = []
        for members in groups.values():
            x = torch.stack([images[k] for k in members]).float().div_(255)
            views.append((self.augment(x), self.augment(x)))
        ids = torch.tensor([r["id"] for r in rows])
        return torch.cat([v for v, _ in views]), torch.cat([v for _, v in views]), ids


def views_at(rev: str):
    """``hub_ccrop.views`` as it was at git revision ``rev`` (imported under another name)."""
    source = subprocess.run(["git", "show", f"{rev}:hub_ccrop/views.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "views_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("views_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pipelines(info: dict, num_ids: int, before=None) -> dict:
    spec, alpha = info["spec"], info["alpha"]
    table = BoxTable(num_ids)
    g = torch.Generator().manual_seed(0)
    wh = 0.22 + 0.55 * torch.rand(num_ids, 2, generator=g)  # boxes covering ~5-60% of the image
    xy = (1 - wh) * torch.rand(num_ids, 2, generator=g)
    table.update(torch.arange(num_ids), torch.cat([xy, xy + wh], dim=1))
    out = {"torchvision_rrc": TorchvisionReference(spec.image_size, spec.mean, spec.std, spec.blur)}
    for batched in (False, True):
        for mode in ("rcrop", "ccrop"):
            name = f"{'batched' if batched else 'per_image'}_{mode}"
            out[name] = ViewCollate.from_spec(spec, table, alpha=alpha, mode=mode, batched=batched)
    if before is not None:
        out["before_batched_rcrop"] = before.TwoViewCollate.from_spec(spec, table, alpha=alpha, mode="rcrop", batched=True)
    try:
        out["kornia_batched"] = KorniaBatched(spec.image_size, spec.mean, spec.std, spec.blur)
    except ImportError:
        print("kornia is not installed: no kornia_batched row (pip install kornia)")
    return out


def round_robin(batches: list, fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every pipeline on every batch, the order rotating, ``repeats`` times: each batch's best seconds
    per pipeline, and each pass's total seconds."""
    names = list(fns)
    best = {name: [float("inf")] * len(batches) for name in names}
    totals = {name: [0.0] * repeats for name in names}
    for r in range(repeats):
        torch.manual_seed(r)
        for b, batch in enumerate(batches):
            shift = (r + b) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                fns[name](batch)
                elapsed = time.perf_counter() - start
                best[name][b] = min(best[name][b], elapsed)
                totals[name][r] += elapsed
    return best, totals


def run(rows: list[dict], fns: dict, batch_size: int, repeats: int) -> dict:
    """Time every pipeline on every batch, round-robin (rotating the order), ``repeats`` times.

    ``views_per_s`` uses each batch's best time over the repeats (the machine's noise-free speed);
    ``views_per_s_median`` the median over repeats of the whole pass.
    """
    batches = [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn(batches[0])
    best, totals = round_robin(batches, fns, repeats)
    views = 2 * len(rows)
    return {
        name: {"views_per_s": views / sum(best[name]), "views_per_s_median": views / statistics.median(totals[name])}
        for name in names
    }


def crop_sampling_cost(fns: dict, rows: list[dict], batch_size: int, reps: int = 200) -> dict:
    """Seconds per batch that each mode spends drawing crop rectangles (the only work that differs)."""
    ids = torch.tensor([r["id"] for r in rows[:batch_size]])
    sizes = torch.tensor([[fns["per_image_rcrop"].size] * 2]).repeat(len(ids), 1)
    out = {}
    for mode in ("rcrop", "ccrop"):
        crops = fns[f"per_image_{mode}"].crops
        crops(ids, sizes)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                crops(ids, sizes)
            best = min(best, (time.perf_counter() - start) / reps)
        out[mode] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="images per dataset (32 px set)")
    parser.add_argument("--rows-224", type=int, default=256, help="images of the 224 px ImageNet-like set")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (32 px set)")
    parser.add_argument("--batch-size-224", type=int, default=64, help="images per batch (224 px set)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--datasets", default="cifar10,imagenet_like")
    parser.add_argument("--before", default=None, help="also time the batched path of this git revision")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bench_views.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    if args.before:
        print(f"before = the batched path of hub_ccrop/views.py at {args.before}")
    for name in args.datasets.split(","):
        if name == "cifar10":
            if not shared_cifar().exists():
                print(f"skipping cifar10: {shared_cifar()} not found")
                continue
            rows, info = cifar_rows(args.rows)
        elif name == "imagenet_like":
            rows, info = imagenet_like_rows(args.rows_224)
        else:
            raise SystemExit(f"unknown dataset {name}")
        num_ids = max(r["id"] for r in rows) + 1
        batch_size = args.batch_size if info["spec"].image_size < 224 else args.batch_size_224
        fns = pipelines(info, num_ids, views_at(args.before) if args.before else None)
        res = run(rows, fns, batch_size, args.repeats)
        sampling = crop_sampling_cost(fns, rows, batch_size)
        ref = res["torchvision_rrc"]["views_per_s"]
        for r in res.values():
            r["vs_torchvision_rrc"] = r["views_per_s"] / ref
        extra = sampling["ccrop"] - sampling["rcrop"]  # seconds per batch that only ContrastiveCrop pays
        for path in ("per_image", "batched"):
            ccrop, rcrop = res[f"{path}_ccrop"], res[f"{path}_rcrop"]
            ccrop["ccrop_over_rcrop"] = ccrop["views_per_s"] / rcrop["views_per_s"]
            batch_time = 2 * batch_size / rcrop["views_per_s"]
            ccrop["ccrop_over_rcrop_from_sampling_cost"] = batch_time / (batch_time + extra)
        results[name] = {"rows": len(rows), "image_size": info["spec"].image_size, "batch_size": batch_size,
                         "crop_sampling_s_per_batch": sampling, "pipelines": res}  # fmt: skip

        print(f"\n{name}: {len(rows)} images, {info['spec'].image_size} px views, batch {batch_size}, {args.threads} thread(s)")
        print(f"{'pipeline':<22}{'views/s':>10}{'median':>10}{'x torchvision':>15}{'ccrop/rcrop':>13}{'(sampling)':>12}")
        for key, r in res.items():
            ratio = f"{r['ccrop_over_rcrop']:.3f}" if "ccrop_over_rcrop" in r else ""
            derived = f"{r['ccrop_over_rcrop_from_sampling_cost']:.3f}" if "ccrop_over_rcrop" in r else ""
            print(f"{key:<22}{r['views_per_s']:>10.0f}{r['views_per_s_median']:>10.0f}{r['vs_torchvision_rrc']:>15.2f}"
                  f"{ratio:>13}{derived:>12}")  # fmt: skip
        print(f"crop rectangles per batch: rcrop {sampling['rcrop'] * 1e3:.2f} ms, ccrop {sampling['ccrop'] * 1e3:.2f} ms")

    meta = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Evidence (issue 8, part 2): the CIFAR-10 SimCLR recipe, R-Crop vs C-Crop, on a CPU-sized schedule.

Trains ``recipes/simclr_cifar10_{rcrop,ccrop}.yaml`` through the real loop (``hub_ccrop.train.train``)
on the CIFAR-10 train split in ``../shared/data/cifar10``: the last 5,000 rows are held out as the
labeled kNN test set, the first 45,000 are the kNN bank, and pretraining uses ``train[:ROWS]`` of those
45,000 (``data.splits``). kNN top-1 (k=200, T=0.1, cosine) on the held-out rows is measured by this
script from the checkpoint of every epoch (the loop's own monitor is off, see ``knn_per_epoch``).

**This is not the paper's setting** (500 epochs over 50k images, ResNet-18 with the CIFAR stem, 100
warm-up epochs, 4 localization passes). The CPU schedule: ``resnet_tiny_cifar`` (0.3M parameters)
instead of ``resnet18_cifar`` (measured: about 4-5x slower per image here), pretraining on
``train[:12000]`` (``--rows``; all 45,000 took ~6 s/step of 512 while other jobs shared the CPU), 2 epochs: 1 RandomResizedCrop warm-up epoch, one localization pass
after it, 1 ContrastiveCrop epoch; batch 512, lr 0.5 cosine over the 2 epochs, k 0.1, alpha 0.1 as in
the recipe; fp32; one seed. It shows that the pipeline runs end to end on CIFAR-10 and what a few minutes give,
nothing about the paper's accuracy.

    .venv/bin/python benchmarks/evidence_cifar10.py                  # the CPU schedule
    .venv/bin/python benchmarks/evidence_cifar10.py --probe-steps 5  # time a few steps of each backbone

Writes ``benchmarks/evidence/cifar10[_TAG].json`` and PNG plots next to it; the GPU commands and the
wall-time estimate for the paper's schedule are in ``gpu_plan()`` (also written to the JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from evidence_small_objects import COLORS, EVIDENCE, LABELS, MODES, checkpoint_backbones, features, machine  # noqa: E402

from hub_ccrop.data import get_spec, load_images  # noqa: E402
from hub_ccrop.evaluate import knn_accuracy  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402
from hub_ccrop.train import train  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def make_recipe(mode: str, args: argparse.Namespace, **extra: Any) -> Recipe:
    overrides = {
        "data.data_dir": str(CIFAR), "data.splits": f"['train[:{args.rows}]']", "data.test_split": "'train[-5000:]'",
        "model.name": args.model, "data.batch_size": args.batch, "data.num_workers": args.workers,
        "train.epochs": args.epochs, "crop.warmup_epochs": args.warmup, "crop.loc_interval": 1,
        "train.knn_every": 0, "train.mixed_precision": "'no'", "train.checkpoint_every": 1,
        "train.keep_checkpoints": 1000, "crop.loc_batch_size": 1024, "train.seed": args.seed, "train.show_images": 8, "train.log_every": 1000,
        "name": f"evidence_cifar10_{mode}",
    } | extra
    return load_recipe(REPO / "recipes" / f"simclr_cifar10_{mode}.yaml", [f"{k}={v}" for k, v in overrides.items()])


def knn_per_epoch(recipe: Recipe, run: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """kNN of every epoch's checkpoint on the 5,000 held-out rows train[-5000:].

    Bank: the pretraining rows train[:ROWS] after every epoch (cheap) and, after the last epoch, also the
    full 45,000 rows train[:-5000]. (The loop's own monitor is off: with data.splits its labeled bank
    would be the whole train split, which contains the 5,000 test rows.)
    """
    spec = get_spec("cifar10", data_dir=str(CIFAR), holdout=5000)
    test = load_images(spec, spec.test_split)
    small_bank = load_images(spec, f"train[:{args.rows}]")
    full_bank = load_images(spec, spec.train_split)
    steps = args.rows // args.batch
    backbones = sorted(checkpoint_backbones(recipe, run, steps).items())
    out = []
    for epoch, backbone in backbones:
        tic = time.perf_counter()
        test_feats, test_labels = features(backbone, test, RunDataLike(spec), 2, normalize=True)
        record: dict[str, Any] = {"epoch": epoch}
        full = args.rows >= len(full_bank)  # then the pretraining rows are the whole 45k bank
        banks = {"": small_bank} | ({"_bank45k": full_bank} if epoch == backbones[-1][0] and not full else {})
        for suffix, bank in banks.items():
            bank_feats, bank_labels = features(backbone, bank, RunDataLike(spec), 2, normalize=True)
            knn = knn_accuracy(bank_feats, bank_labels, test_feats, test_labels, num_classes=10,
                               k=recipe.train.knn_k, temperature=recipe.train.knn_temperature)
            record |= {f"knn_top1{suffix}": knn["top1"], f"knn_top5{suffix}": knn["top5"], f"bank{suffix}": len(bank)}
        if full:
            record |= {"knn_top1_bank45k": record["knn_top1"], "knn_top5_bank45k": record["knn_top5"]}
        record["knn_seconds"] = time.perf_counter() - tic
        out.append(record)
        print(record, flush=True)
    return out


class RunDataLike:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


def probe_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per training step of each backbone (a few steps, first step excluded), to size the schedule."""
    out = {}
    for model in ("resnet18_cifar", "resnet_tiny_cifar"):
        for workers in sorted({0, args.workers}):
            a = argparse.Namespace(**(vars(args) | {"model": model, "workers": workers}))
            recipe = make_recipe("rcrop", a, **{"train.max_steps": args.probe_steps, "train.knn_every": 0,
                                                "train.show_images": 0, "train.checkpoint_every": 1000})
            run = Path(args.runs_dir) / f"probe_{model}_{workers}"
            shutil.rmtree(run, ignore_errors=True)
            tic = time.perf_counter()
            train(recipe, run)
            wall = time.perf_counter() - tic
            out[f"{model}_workers{workers}"] = {"steps": args.probe_steps, "batch": args.batch, "wall_seconds": wall}
            shutil.rmtree(run, ignore_errors=True)
            print(model, workers, wall, flush=True)
    return out


def gpu_plan() -> dict[str, Any]:
    """Commands for the paper's schedule on a GPU machine and a FLOP-based wall-time estimate."""
    fwd = 0.56e9  # resnet18_cifar, 32 px, FLOPs per image forward
    per_image = 3 * fwd * 2  # forward + backward ~ 3x forward, two views
    images = 500 * 45_000  # 500 epochs over the 45k pretraining rows (50k without the holdout)
    extra = 4 * 45_000 * fwd + 50 * 50_000 * fwd  # 4 localization passes + kNN monitor every 10 epochs
    total = images * per_image + extra
    est = {}
    for tflops in (30, 100):
        hours = total / (tflops * 1e12) / 3600
        est[f"{tflops}_tflops_sustained"] = {"one_gpu_hours": hours, "eight_gpus_hours_ideal": hours / 8}
    data = "--set data.data_dir=../shared/data/cifar10 --set data.holdout=5000"
    return {
        "single_gpu": f"hub-ccrop train recipes/simclr_cifar10_ccrop.yaml {data} --output-dir runs/simclr_cifar10_ccrop",
        "single_gpu_rcrop": f"hub-ccrop train recipes/simclr_cifar10_rcrop.yaml {data} --output-dir runs/simclr_cifar10_rcrop",
        "eight_gpus": ("accelerate launch --multi_gpu --num_processes 8 -m hub_ccrop.train "
                       f"recipes/simclr_cifar10_ccrop.yaml {data} "
                       "--output-dir runs/simclr_cifar10_ccrop_8gpu"),
        "faster_views_on_gpu": "--set data.batched_views=true --set data.device_resident=true",
        "flops": {"forward_per_image": fwd, "train_per_image": per_image, "train_images": images,
                  "total": total},
        "estimate": est,
        "note": ("ESTIMATE, not measured: total FLOPs / an assumed sustained bf16 throughput. ResNet-18 at 32 px "
                 "uses an H100 poorly (small convolutions, batch 512): 30 TFLOP/s is the conservative, 100 the "
                 "optimistic case. Eight GPUs split the recipe's global data.batch_size "
                 "512 into 8 x 64; 64 images per GPU is small, so the 8-GPU time is the ideal-scaling bound, not a prediction. "
                 "The collate stage must keep up: on CPU workers the per-image path makes ~3k views/s per core "
                 "(benchmarks/README.md), so use batched_views/device_resident on the GPU."),
    }


def plots(runs: dict[str, dict[str, Any]], tag: str, rows: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, r in runs.items():
        h = r["history"]
        knn = [x for x in h if x.get("knn_top1") is not None]
        axes[0].plot([x["epoch"] for x in knn], [x["knn_top1"] for x in knn], "o-", color=COLORS[mode], label=LABELS[mode])
        axes[1].plot([x["epoch"] for x in h], [x["pos_cosine"] for x in h], "o-", color=COLORS[mode], label=LABELS[mode])
    axes[0].set(title="kNN top-1, 5,000 held-out rows (bank: pretraining rows)", xlabel="epoch", ylabel="%")
    axes[1].set(title="positive-pair cosine (last step of each epoch)", xlabel="epoch", ylabel="cosine")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"CIFAR-10: pretraining on train[:{rows}], kNN test = train[-5000:]; SimCLR resnet_tiny_cifar, "
                 "CPU schedule (NOT the paper's setting), one seed",
                 fontsize=9)
    fig.tight_layout()
    path = EVIDENCE / f"cifar10{tag}_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path.relative_to(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet_tiny_cifar")
    parser.add_argument("--rows", type=int, default=12000, help="pretrain on train[:ROWS] (<= 45000)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-steps", type=int, default=0, help="only time this many steps per backbone")
    parser.add_argument("--runs-dir", default="/tmp/evidence_runs")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    tag = f"_{args.tag}" if args.tag else ""
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "command": " ".join([".venv/bin/python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "settings": vars(args), "gpu": "none lent to this session"}
    if args.probe_steps:
        result = {"meta": meta, "probe": probe_steps(args)}
        (EVIDENCE / f"cifar10_probe{tag}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    runs: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for mode in MODES:
        recipe = make_recipe(mode, args)
        run = Path(args.runs_dir) / f"cifar10{tag}_{mode}"
        shutil.rmtree(run, ignore_errors=True)
        print(f"== {recipe.name}", flush=True)
        train(recipe, run)
        metrics = json.loads((run / "metrics.json").read_text())
        knn = knn_per_epoch(recipe, run, args)
        for h in metrics["history"]:
            h |= next((k for k in knn if k["epoch"] == h["epoch"]), {})
        metrics |= {k: knn[-1][k] for k in ("knn_top1", "knn_top1_bank45k", "knn_top5_bank45k")}
        runs[mode] = {k: v for k, v in metrics.items() if k != "history"} | {
            "history": [{k: h.get(k) for k in ("epoch", "loss", "pos_cosine", "crop", "epoch_seconds", "images_per_s",
                                               "knn_top1", "knn_top5", "knn_top1_bank45k", "knn_seconds", "box_area", "loc_seconds", "loc_images")}
                        for h in metrics["history"]], "recipe": recipe.to_dict()}
        pictures = sorted((run / "pictures").glob("localization_epoch_*.png"))
        if pictures:
            shutil.copy(pictures[-1], EVIDENCE / f"cifar10{tag}_train_loop_{mode}_{pictures[-1].name}")
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        print(json.dumps(runs[mode], indent=1)[:3000], flush=True)
    meta["total_seconds"] = time.perf_counter() - started
    result = {"meta": meta, "not_the_paper": (
        f"CPU schedule: {args.model}, pretraining on train[:{args.rows}], {args.epochs} epochs ({args.warmup} "
        f"warm-up, localization after epochs {list(range(args.warmup, args.epochs))}), batch "
        f"{args.batch}, fp32, one seed; the paper trains resnet18_cifar for 500 epochs"),
        "runs": runs, "gpu_plan": gpu_plan()}
    result["plots"] = [plots(runs, tag, args.rows)]
    (EVIDENCE / f"cifar10{tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({m: {k: r.get(k) for k in ("knn_top1", "box_area", "wall_seconds", "train_images_per_s")}
                      for m, r in runs.items()} | {"bank45k": {m: r.get("knn_top1_bank45k") for m, r in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()

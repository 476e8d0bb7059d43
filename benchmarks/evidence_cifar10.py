"""Evidence (issue 13, part 2): R-Crop vs C-Crop on CIFAR-10, tiny backbone, several seeds, CPU schedule.

Trains ``recipes/simclr_cifar10_{rcrop,ccrop}.yaml`` through the real loop (``hub_ccrop.training.train``)
for every (mode, seed) on the CIFAR-10 train split in ``--data`` (default ``../shared/data/cifar10``):
the last 5,000 rows are held out as the labeled test set, the first 45,000 are the full kNN bank, and
pretraining uses ``train[:ROWS]`` of those 45,000 (``data.splits``). Only ``crop.mode`` and the seed
differ between runs. For every run the script measures:

- per epoch, from that epoch's checkpoint: kNN top-1 (k=200, T=0.1, cosine) on the 5,000 held-out rows
  with the pretraining rows as the bank (the loop's own monitor is off: with ``data.splits`` its
  labeled bank would be the whole train split, which contains the test rows), and the positive-pair
  cosine of the last training step of the epoch (the loop's metrics history);
- at each localization pass: the mean box area and the share of (nearly) whole-image boxes (area >
  0.9). C-Crop: the tables the loop trained with (``boxes/epoch_*.parquet``); R-Crop: the boxes
  ContrastiveCrop *would* use, re-localized from that epoch's checkpoint (never used in training).
  CIFAR-10 has no ground-truth boxes, so there is no box IoU;
- at the end: kNN with the full 45,000-row bank (``--final-bank``) and a linear probe on cached
  un-augmented raw features (``evaluate.linear_probe_on_features`` with the small-objects settings:
  SGD lr 10, ``--probe-epochs`` 100, x0.1 at 60%/80%, last epoch reported), trained on the
  pretraining rows and tested on the 5,000 held-out rows: a fast check, *not* the paper's protocol.

**This is not the paper's setting** (500 epochs over 50k images, ResNet-18 with the CIFAR stem, 100
warm-up epochs, 4 localization passes). The default CPU schedule: ``resnet_tiny_cifar`` (0.3M
parameters, ~4-5x faster per image here than ``resnet18_cifar``), pretraining on ``train[:15000]``
(``--rows``) for 6 epochs (``--epochs``): 2 RandomResizedCrop warm-up epochs (``--warmup``), localization
after epochs 2 and 4 (``--loc-interval 2``); batch 512, lr 0.5 cosine over the 6 epochs, k 0.1,
alpha 0.1 as in the recipe; fp32; seeds 0 and 1 (``--seeds``). About 30 min of wall on 2 quiet CPU cores.
It compares the two crops on a short schedule, nothing about the paper's accuracy.

    .venv/bin/python benchmarks/evidence_cifar10.py                  # the CPU schedule, 2 seeds x 2 modes
    .venv/bin/python benchmarks/evidence_cifar10.py --rows 1024 --epochs 2 --warmup 1 --batch 256 \
        --final-bank 2048 --probe-epochs 10 --tag smoke              # a smoke test
    .venv/bin/python benchmarks/evidence_cifar10.py --probe-steps 5  # time a few steps of each backbone

Writes ``benchmarks/evidence/cifar10[_TAG].json`` (every run, a mean +- std summary per mode, the per-seed
differences C - R) and ``cifar10[_TAG]_curves.png`` next to it; the GPU commands and the wall-time
estimate for the paper's schedule are in ``gpu_plan()`` (also written to the JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from evidence_small_objects import (  # noqa: E402
    EVIDENCE,
    MODES,
    backbone_from_state,
    checkpoint_backbones,
    features,
    knn_and_probe_on_features,
    loader,
    machine,
    mean_spread,
    paired_differences,
    plot_knn_and_cosine,
)
from safetensors.torch import load_file  # noqa: E402

from hub_ccrop.boxes import BoxTable  # noqa: E402
from hub_ccrop.data import get_spec, load_images  # noqa: E402
from hub_ccrop.localize import localize_boxes  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402
from hub_ccrop.training import train  # noqa: E402
from hub_ccrop.views import EvalCollate  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10"
HOLDOUT = 5000  # the last rows of the train split: the labeled test set
WHOLE_IMAGE = 0.9  # a box with a larger area counts as (nearly) the whole image


def make_recipe(mode: str, args: argparse.Namespace, seed: int, **extra: Any) -> Recipe:
    overrides = {
        "data.data_dir": str(args.data), "data.splits": f"['train[:{args.rows}]']",
        "data.test_split": f"'train[-{HOLDOUT}:]'",
        "model.name": args.model, "data.batch_size": args.batch, "data.num_workers": args.workers,
        "train.epochs": args.epochs, "crop.warmup_epochs": args.warmup, "crop.loc_interval": args.loc_interval,
        "train.knn_every": 0, "train.mixed_precision": "'no'", "train.checkpoint_every": 1,
        "train.keep_checkpoints": 1000, "crop.loc_batch_size": 1024, "train.seed": seed, "train.show_images": 8,
        "train.log_every": 1000, "name": f"evidence_cifar10_{mode}_s{seed}",
    } | extra
    return load_recipe(REPO / "recipes" / f"simclr_cifar10_{mode}.yaml", [f"{k}={v}" for k, v in overrides.items()])


def loc_epochs(args: argparse.Namespace) -> list[int]:
    """The epochs after which C-Crop localizes (the recipe's schedule)."""
    return make_recipe("ccrop", args, args.seeds[0]).localization_epochs()


def eval_data(args: argparse.Namespace) -> SimpleNamespace:
    """The held-out test rows, the pretraining rows (per-epoch bank, probe train set, boxes) and the rest
    of the final bank (``train[ROWS:FINAL_BANK]``, none when the pretraining rows already fill it)."""
    spec = get_spec("cifar10", data_dir=str(args.data), holdout=HOLDOUT)
    rest = load_images(spec, f"train[{args.rows}:{args.final_bank}]") if args.final_bank > args.rows else None
    return SimpleNamespace(spec=spec, test=load_images(spec, spec.test_split),
                           pretrain=load_images(spec, f"train[:{args.rows}]"), rest=rest)


def box_stats(boxes: torch.Tensor) -> dict[str, float]:
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {"box_area": float(area.mean()), "whole_image_share": float((area > WHOLE_IMAGE).float().mean()),
            "boxes": len(boxes)}


def box_passes(recipe: Recipe, run: Path, backbones: dict[int, torch.nn.Module], data: SimpleNamespace,
               args: argparse.Namespace) -> list[dict[str, Any]]:
    """Box area and whole-image share at each localization epoch: the loop's table for C-Crop, boxes
    re-localized from that epoch's checkpoint for R-Crop (what C-Crop would use; never trained with)."""
    passes = []
    for epoch in loc_epochs(args):
        table = run / "boxes" / f"epoch_{epoch:04d}.parquet"
        tic = time.perf_counter()
        if table.is_file():
            boxes, source = BoxTable.load(table).boxes, "training loop (boxes/epoch_*.parquet)"
        else:
            collate = EvalCollate(data.spec, purpose="localize")
            _, boxes = localize_boxes(backbones[epoch], loader(data.pretrain, collate, 512, args.workers),
                                      k=recipe.crop.k, alignment=recipe.crop.heatmap_alignment, progress=False)
            source = "re-localized from the checkpoint (not used in training)"
        passes.append({"epoch": epoch, **box_stats(boxes.float()), "source": source,
                       "seconds": time.perf_counter() - tic})
    return passes


def evaluate_epochs(recipe: Recipe, run: Path, data: SimpleNamespace,
                    args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], dict[int, Any]]:
    """kNN of every epoch's checkpoint (bank: the pretraining rows); after the last epoch also the
    linear probe on the same raw features and kNN with the full bank."""
    backbones = checkpoint_backbones(recipe, run, args.rows // args.batch)
    if sorted(backbones) != list(range(1, args.epochs + 1)):
        raise RuntimeError(f"expected a checkpoint after every epoch, found epochs {sorted(backbones)}")
    final_state = load_file(str(run / "backbone.safetensors"))  # the run's published backbone is the final one
    last = backbones[args.epochs].state_dict()
    same = all(torch.equal(last[k], v) for k, v in final_state.items())
    backbones[args.epochs] = backbone_from_state(recipe, final_state)
    per_epoch, final = [], {}
    for epoch, backbone in sorted(backbones.items()):
        tic = time.perf_counter()
        test_raw, test_labels = features(backbone, data.test, data, args.workers, normalize=False)
        bank_raw, bank_labels = features(backbone, data.pretrain, data, args.workers, normalize=False)
        probe_epochs = args.probe_epochs if epoch == args.epochs else 0
        r = knn_and_probe_on_features(bank_raw, bank_labels, test_raw, test_labels, recipe, 10, probe_epochs)
        per_epoch.append({"epoch": epoch, "knn_top1": r["knn_top1"], "knn_top5": r["knn_top5"],
                          "knn_seconds": time.perf_counter() - tic})
        if epoch == args.epochs:
            final = r | {"bank_rows": len(data.pretrain), "probe_train_rows": len(data.pretrain),
                         "test_rows": len(data.test), "last_checkpoint_equals_backbone": same}
            if data.rest is not None:
                rest_raw, rest_labels = features(backbone, data.rest, data, args.workers, normalize=False)
                bank_raw, bank_labels = torch.cat([bank_raw, rest_raw]), torch.cat([bank_labels, rest_labels])
            full = knn_and_probe_on_features(bank_raw, bank_labels, test_raw, test_labels, recipe, 10, 0)
            final |= {"knn_top1_full_bank": full["knn_top1"], "knn_top5_full_bank": full["knn_top5"],
                      "full_bank_rows": len(bank_raw), "eval_seconds": time.perf_counter() - tic}
        print({"epoch": epoch, **per_epoch[-1]}, flush=True)
    return per_epoch, final, backbones


def analyse_run(recipe: Recipe, run: Path, data: SimpleNamespace, args: argparse.Namespace) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    per_epoch, final, backbones = evaluate_epochs(recipe, run, data, args)
    passes = box_passes(recipe, run, backbones, data, args)
    history = []
    for h in metrics["history"]:
        record = {k: h.get(k) for k in ("epoch", "loss", "pos_cosine", "crop", "epoch_seconds", "images_per_s",
                                        "box_area", "loc_seconds")}
        history.append(record | next((e for e in per_epoch if e["epoch"] == h["epoch"]), {}))
    final["pos_cosine"] = history[-1]["pos_cosine"]
    return {"mode": recipe.crop.mode, "seed": recipe.train.seed, "run": str(run), "final": final,
            "passes": passes, "history": history, "wall_seconds": metrics["wall_seconds"],
            "train_images_per_s": metrics["train_images_per_s"], "recipe": recipe.to_dict()}


FINAL_KEYS = ("knn_top1", "knn_top1_full_bank", "linear_top1", "pos_cosine")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean +- std (min, max, n) over seeds per mode, and the per-seed differences C - R."""
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        s: dict[str, Any] = {key: mean_spread([r["final"].get(key) for r in mine]) for key in FINAL_KEYS}
        for i, p in enumerate(mine[0]["passes"]):
            for key in ("box_area", "whole_image_share"):
                s[f"pass_epoch{p['epoch']}_{key}"] = mean_spread([r["passes"][i][key] for r in mine])
        s["wall_seconds"] = mean_spread([r["wall_seconds"] for r in mine])
        s["train_images_per_s"] = mean_spread([r["train_images_per_s"] for r in mine])
        out[mode] = s
    out["ccrop_minus_rcrop"] = paired_differences(runs, ("knn_top1", "knn_top1_full_bank", "linear_top1"))
    return out


def _pm(stats: dict[str, float], fmt: str = ".1f") -> str:
    return f"{stats['mean']:{fmt}} +- {stats['std']:{fmt}}" if stats else "n/a"


def plots(runs: list[dict[str, Any]], summary: dict[str, Any], tag: str, args: argparse.Namespace) -> str:
    """kNN per epoch and positive-pair cosine per epoch, both modes, mean line with a min-max seed band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5))
    axes = fig.subplots(1, 2)
    plot_knn_and_cosine(axes[0], axes[1], runs)
    passes = loc_epochs(args)
    for ax in axes:
        ax.axvline(args.warmup + 0.5, color="gray", linestyle="--", linewidth=1,
                   label=f"end of warm-up: C-Crop views from epoch {args.warmup + 1}")
        for i, e in enumerate(passes):
            ax.axvline(e + 0.5, color="tab:red", linestyle=":", linewidth=1.2, alpha=0.7,
                       label=f"C-Crop localization passes (after epochs {passes})" if i == 0 else None)
        ax.set_xticks(range(1, args.epochs + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set(title=f"kNN top-1 on the {HOLDOUT:,} held-out rows (bank: the {args.rows:,} pretraining rows)",
                xlabel="epoch", ylabel="%")
    axes[1].set(title="positive-pair cosine (last training step of each epoch)", xlabel="epoch", ylabel="cosine")
    for ax in axes:
        ax.title.set_fontsize(9)
    r, c, d = summary.get("rcrop", {}), summary.get("ccrop", {}), summary["ccrop_minus_rcrop"]
    bank = runs[0]["final"]["full_bank_rows"]
    fig.suptitle(
        f"CIFAR-10, SimCLR {args.model}: R-Crop vs C-Crop, mean line and min-max band over seeds {args.seeds}\n"
        f"short CPU schedule, NOT the paper's setting (resnet18_cifar, 500 epochs on 50k images): "
        f"pretraining on train[:{args.rows}], {args.epochs} epochs ({args.warmup} warm-up), batch {args.batch}, fp32\n"
        f"final kNN ({bank:,}-row bank): R {_pm(r.get('knn_top1_full_bank', {}))}, "
        f"C {_pm(c.get('knn_top1_full_bank', {}))} (C - R {_pm(d['knn_top1_full_bank'], '+.1f')});  "
        f"linear probe (cached features): R {_pm(r.get('linear_top1', {}))}, C {_pm(c.get('linear_top1', {}))} "
        f"(C - R {_pm(d['linear_top1'], '+.1f')})",
        fontsize=8.5)
    fig.tight_layout()
    path = EVIDENCE / f"cifar10{tag}_curves.png"
    fig.savefig(path, dpi=100)
    return str(path.relative_to(REPO))


def probe_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per training step of each backbone (a few steps, first step excluded), to size the schedule."""
    out = {}
    for model in ("resnet18_cifar", "resnet_tiny_cifar"):
        for workers in sorted({0, args.workers}):
            a = argparse.Namespace(**(vars(args) | {"model": model, "workers": workers}))
            recipe = make_recipe("rcrop", a, args.seeds[0], **{"train.max_steps": args.probe_steps, "train.knn_every": 0,
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
        "eight_gpus": ("accelerate launch --multi_gpu --num_processes 8 -m hub_ccrop train "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=CIFAR, help="the local CIFAR-10 copy (default: %(default)s)")
    parser.add_argument("--model", default="resnet_tiny_cifar")
    parser.add_argument("--rows", type=int, default=15000, help="pretrain on train[:ROWS] (<= 45000)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="RandomResizedCrop warm-up epochs")
    parser.add_argument("--loc-interval", type=int, default=2, help="epochs between C-Crop localization passes")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs (0: no probe)")
    parser.add_argument("--final-bank", type=int, default=45000,
                        help="rows train[:N] of the final kNN bank (45000: all but the held-out rows)")
    parser.add_argument("--probe-steps", type=int, default=0, help="only time this many steps per backbone")
    parser.add_argument("--runs-dir", default="/tmp/evidence_runs")
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. smoke)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the checkpoints in the run folders")
    args = parser.parse_args()
    if not 0 < args.rows <= 50000 - HOLDOUT or not 0 < args.final_bank <= 50000 - HOLDOUT:
        parser.error(f"--rows and --final-bank must be in 1..{50000 - HOLDOUT}")
    tag = f"_{args.tag}" if args.tag else ""
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "command": " ".join([".venv/bin/python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "gpu": "none used"}
    if args.probe_steps:
        result = {"meta": meta, "probe": probe_steps(args)}
        (EVIDENCE / f"cifar10_probe{tag}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    data = eval_data(args)
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        for mode in MODES:
            recipe = make_recipe(mode, args, seed)
            run = Path(args.runs_dir) / f"cifar10{tag}_{mode}_s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            print(f"== {recipe.name}", flush=True)
            train(recipe, run)
            result = analyse_run(recipe, run, data, args)
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("mode", "seed", "final", "passes", "wall_seconds")}, indent=1),
                  flush=True)
            pictures = sorted((run / "pictures").glob("localization_epoch_*.png"))
            if pictures and seed == args.seeds[0]:  # the loop's own picture after its last localization pass
                shutil.copy(pictures[-1], EVIDENCE / f"cifar10{tag}_train_loop_{mode}_{pictures[-1].name}")
            if not args.keep_runs:
                shutil.rmtree(run / "checkpoints", ignore_errors=True)
    meta["total_seconds"] = time.perf_counter() - started
    summary = summarize(runs)
    result = {
        "meta": meta | {"loc_epochs": loc_epochs(args), "notes": [
            f"test: the {HOLDOUT:,} held-out rows train[-{HOLDOUT}:]; pretraining rows train[:{args.rows}].",
            "knn_top1 (per epoch and final): k=200, T=0.1, cosine, bank = the pretraining rows; "
            f"knn_top1_full_bank: bank = train[:{max(args.rows, args.final_bank)}], final backbone only.",
            "linear_top1: linear-probe-cached-features (fast check, not the paper's protocol): raw un-augmented "
            "features of the pretraining rows, SGD lr 10, momentum 0.9, wd 0, batch 512, x0.1 at 60%/80% of "
            f"{args.probe_epochs} epochs, last epoch reported; tested on the held-out rows.",
            f"passes: box area (fraction of the image) and share of boxes with area > {WHOLE_IMAGE}; C-Crop: the "
            "loop's tables; R-Crop: re-localized from that epoch's checkpoint, never used in training.",
            "pos_cosine: the last training step of each epoch (one batch).",
            "ccrop_minus_rcrop: per-seed differences in percentage points."]},
        "not_the_paper": (
            f"CPU schedule: {args.model}, pretraining on train[:{args.rows}], {args.epochs} epochs ({args.warmup} "
            f"warm-up, localization after epochs {loc_epochs(args)}), batch {args.batch}, fp32, seeds {args.seeds}; "
            "the paper trains resnet18_cifar for 500 epochs over 50k images"),
        "summary": summary, "runs": runs, "gpu_plan": gpu_plan()}
    result["plots"] = [plots(runs, summary, tag, args)]
    path = EVIDENCE / f"cifar10{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path} in {meta['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()

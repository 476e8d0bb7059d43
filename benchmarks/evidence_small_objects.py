"""Evidence (issue 8, part 1): RandomResizedCrop vs ContrastiveCrop on the built-in small-objects set.

Both modes train the same recipe (``--recipe``, by default ``recipes/quickstart.yaml``: SimCLR,
``resnet_tiny_cifar``, batch 128) for the same epochs and seeds through the real loop
(``hub_ccrop.training.train``). Only ``crop.mode`` differs. For every run this script then measures, from the run folder:

- kNN top-1 (k=200, T=0.1, cosine) on the 1,000 test images after every ``--knn-every`` epochs (the
  training loop's monitor) and at the end;
- a linear probe on **cached, un-augmented features** (``evaluate.linear_probe_on_features``: SGD lr
  10, 100 epochs, x0.1 at 60/80, last epoch reported): a fast check, *not* the paper's protocol;
- at each localization epoch, the boxes localized from that epoch's backbone (re-localized from the
  checkpoint saved after that epoch, for both modes; for C-Crop they are the boxes training used,
  which the script checks): mean IoU with the ground-truth boxes, mean box area, and the share of
  view pairs in which at least one view covers < 20% of the object (``crop.object_miss_rate``, the
  paper's false positives) for RandomResizedCrop (whole image, alpha 1) and for ContrastiveCrop with
  those boxes and the recipe's alpha. For an R-Crop run these boxes are what ContrastiveCrop *would*
  use with its backbone; its training views were RandomResizedCrop throughout;
- the positive-pair cosine similarity of the last training step of every epoch (paper Fig. 5).

    .venv/bin/python benchmarks/evidence_small_objects.py                       # the full run
    .venv/bin/python benchmarks/evidence_small_objects.py --seeds 0 --epochs 3 --warmup 1 \
        --loc-interval 1 --tag smoke                                             # a smoke test
    .venv/bin/python benchmarks/evidence_small_objects.py --recipe recipes/dino_vit_tiny_cifar10_ccrop.yaml \
        --set data.image_size=32 ...                                             # DINO on a ViT (issue 22)

Writes ``benchmarks/evidence/small_objects[_TAG].json`` and PNG plots/pictures next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EVIDENCE = HERE / "evidence"
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from hub_ccrop.box_follow import FollowCheck  # noqa: E402
from hub_ccrop.box_quality import box_quality  # noqa: E402
from hub_ccrop.crop import object_miss_rate  # noqa: E402
from hub_ccrop.evaluate import extract_features, knn_accuracy, linear_probe_on_features  # noqa: E402
from hub_ccrop.localize import boxes_from_maps, input_heatmaps, localize_boxes  # noqa: E402
from hub_ccrop.methods import build_method  # noqa: E402
from hub_ccrop.models import create_backbone  # noqa: E402
from hub_ccrop.recipe import Recipe, load_recipe  # noqa: E402
from hub_ccrop.training import RunData, build_data, train  # noqa: E402
from hub_ccrop.views import EvalCollate  # noqa: E402
from hub_ccrop.viz import draw_localization_grid, to_uint8  # noqa: E402

MODES = ("rcrop", "ccrop")
COLORS = {"rcrop": "tab:blue", "ccrop": "tab:red"}
LABELS = {"rcrop": "R-Crop (RandomResizedCrop)", "ccrop": "C-Crop (ContrastiveCrop)"}


# -- shared helpers (also used by evidence_cifar10.py) ----------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cpu}, {torch.get_num_threads()} torch threads, {gpu}; torch {torch.__version__}"


def backbone_from_state(recipe: Recipe, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A backbone with the weights of a run's ``backbone.safetensors``, or the localization encoder (the
    backbone whose heatmaps make the boxes: DINO's teacher, the online backbone otherwise) of a checkpoint's
    method state."""
    model = create_backbone(recipe.model.name, **recipe.model.args)
    wanted = set(model.state_dict())
    if not wanted <= set(state):  # a checkpoint of the whole method: the localization encoder's prefix
        method = build_method(recipe.method.name, create_backbone(recipe.model.name, **recipe.model.args),
                              **recipe.method.options)
        prefix = next(name for name, module in method.named_modules()
                      if module is method.localization_encoder) + "."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model.eval()


def checkpoint_backbones(recipe: Recipe, run: Path, steps_per_epoch: int) -> dict[int, torch.nn.Module]:
    """Epoch -> backbone for every checkpoint left in the run folder (named by global step)."""
    found = {}
    for ckpt in sorted((run / "checkpoints").glob("checkpoint_*")):
        step = int(ckpt.name.split("_")[1])
        if step % steps_per_epoch == 0:
            found[step // steps_per_epoch] = backbone_from_state(recipe, load_file(str(ckpt / "model.safetensors")))
    return found


def loader(dataset: Any, collate: Any, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      persistent_workers=False)


def features(backbone: torch.nn.Module, dataset: Any, run_data: RunData, workers: int, normalize: bool):
    collate = EvalCollate(run_data.spec, purpose="classify")
    _, feats, labels = extract_features(backbone, loader(dataset, collate, 512, workers), normalize=normalize,
                                        progress=False)
    return feats, labels


def knn_and_probe(backbone: torch.nn.Module, run_data: RunData, recipe: Recipe, workers: int,
                  probe_epochs: int) -> dict[str, Any]:
    """kNN (the monitor's k, T) and the cached-features linear probe (raw features, paper's optimizer)."""
    train_raw, train_labels = features(backbone, run_data.knn_train, run_data, workers, normalize=False)
    test_raw, test_labels = features(backbone, run_data.knn_test, run_data, workers, normalize=False)
    return knn_and_probe_on_features(train_raw, train_labels, test_raw, test_labels, recipe,
                                     run_data.spec.num_classes, probe_epochs)


def knn_and_probe_on_features(train_raw: torch.Tensor, train_labels: torch.Tensor, test_raw: torch.Tensor,
                              test_labels: torch.Tensor, recipe: Recipe, num_classes: int,
                              probe_epochs: int) -> dict[str, Any]:
    """``knn_and_probe`` on raw (un-normalized) features already extracted."""
    norm = torch.nn.functional.normalize
    knn = knn_accuracy(norm(train_raw, dim=1), train_labels, norm(test_raw, dim=1), test_labels,
                       num_classes=num_classes, k=recipe.train.knn_k, temperature=recipe.train.knn_temperature)
    out: dict[str, Any] = {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}
    if probe_epochs:
        m1, m2 = int(0.6 * probe_epochs), int(0.8 * probe_epochs)
        probe = linear_probe_on_features(train_raw, train_labels, test_raw, test_labels,
                                         num_classes=num_classes, epochs=probe_epochs,
                                         milestones=(m1, m2), progress=False)
        out |= {"linear_top1": probe["top1"], "linear_best_top1": probe["best_top1"],
                "linear_protocol": probe["protocol"], "linear_epochs": probe_epochs}
    return out


def mean_spread(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def plot_band(ax, xs_by_seed: list[list[float]], ys_by_seed: list[list[float]], mode: str, marker: str = "o") -> None:
    """Mean over seeds with a min-max band (x values must agree across seeds)."""
    xs = xs_by_seed[0]
    ys = [list(col) for col in zip(*ys_by_seed, strict=True)]
    mean = [statistics.fmean(c) for c in ys]
    ax.plot(xs, mean, marker=marker, color=COLORS[mode], label=f"{LABELS[mode]} (mean of {len(ys_by_seed)})")
    if len(ys_by_seed) > 1:
        ax.fill_between(xs, [min(c) for c in ys], [max(c) for c in ys], color=COLORS[mode], alpha=0.2)


def plot_knn_and_cosine(ax_knn, ax_cosine, runs: list[dict[str, Any]], cosine_marker: str = "o") -> None:
    """Per mode: kNN top-1 per monitored epoch and the positive-pair cosine per epoch, with seed bands."""
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        knn = [[h for h in r["history"] if h.get("knn_top1") is not None] for r in mine]
        plot_band(ax_knn, [[h["epoch"] for h in k] for k in knn], [[h["knn_top1"] for h in k] for k in knn], mode)
        plot_band(ax_cosine, [[h["epoch"] for h in r["history"]] for r in mine],
                  [[h["pos_cosine"] for h in r["history"]] for r in mine], mode, marker=cosine_marker)


# -- this benchmark ---------------------------------------------------------------------------------


def make_recipe(args: argparse.Namespace, mode: str, seed: int) -> Recipe:
    raw = yaml.safe_load(Path(args.recipe).read_text())
    raw["name"] = f"evidence_small_objects_{mode}_s{seed}"
    overrides = [
        f"data.dataset={args.dataset}", f"crop.mode={mode}", f"train.seed={seed}", f"train.epochs={args.epochs}",
        f"crop.warmup_epochs={args.warmup}", f"crop.loc_interval={args.loc_interval}",
        f"train.knn_every={args.knn_every}", f"data.num_workers={args.workers}",
        "train.checkpoint_every=1", "train.keep_checkpoints=1000", f"train.show_images={args.show}",
        "train.log_every=1000", *args.overrides,
    ]
    return load_recipe(raw, overrides)


def loc_epochs(args: argparse.Namespace) -> list[int]:
    """The C-Crop localization epochs (the recipe's schedule) plus the final epoch."""
    eps = list(range(args.warmup, args.epochs, args.loc_interval))
    return eps + [args.epochs]


def analyse_run(recipe: Recipe, run: Path, run_data: RunData, args: argparse.Namespace) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["history"]
    steps = len(run_data.pretrain) // recipe.data.batch_size
    backbones = checkpoint_backbones(recipe, run, steps)
    final = backbone_from_state(recipe, load_file(str(run / "backbone.safetensors")))
    backbones[args.epochs] = final
    sizes = torch.tensor([[run_data.spec.image_size] * 2]).expand(run_data.num_rows, 2)
    c = recipe.crop
    collate = EvalCollate(run_data.spec, purpose="localize")
    passes = []
    for epoch in loc_epochs(args):
        model = backbones[epoch]
        tic = time.perf_counter()
        check = FollowCheck(c.follow_images) if c.follow_images else None  # as the loop's pass: it may choose the map
        ids, boxes = localize_boxes(model, loader(run_data.pretrain, collate, 512, args.workers), k=c.k,
                                    alignment=c.heatmap_alignment, heatmap=c.heatmap, rule=c.box_rule,
                                    flip=c.heatmap_flip, progress=False, follow=check)
        seconds = time.perf_counter() - tic
        table = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(run_data.num_rows, 1)
        table[ids] = boxes.float()
        miss = object_miss_rate(run_data.gt_boxes, table, sizes, scale=c.scale, ratio=c.ratio, alpha=c.alpha)
        # box_iou beside the whole-image and centred same-size baselines, overall and on small objects
        record = {"epoch": epoch, "heatmap_source": check.source if check else c.heatmap,
                  **box_quality(boxes, run_data.gt_boxes[ids], follow=check.score() if check else None).metrics(),
                  "miss_rate_rcrop": miss["rcrop"], "miss_rate_ccrop_with_these_boxes": miss["ccrop"],
                  "loc_seconds": seconds}
        trained = next((h for h in history if h["epoch"] == epoch and "box_iou" in h), None)
        if trained is not None:  # C-Crop: the training loop's own pass on the same weights
            record["train_loop_box_iou"] = trained["box_iou"]
        passes.append(record)
    # Oracle: ContrastiveCrop with the ground-truth boxes (the best boxes localization could give).
    oracle = object_miss_rate(run_data.gt_boxes, run_data.gt_boxes, sizes, scale=c.scale, ratio=c.ratio,
                              alpha=c.alpha)["ccrop"]
    evals = knn_and_probe(final, run_data, recipe, args.workers, args.probe_epochs)
    return {
        "mode": recipe.crop.mode, "seed": recipe.train.seed, "run": str(run),
        "final": evals | {"train_loop_knn_top1": metrics.get("knn_top1"),
                          "train_loop_miss_rate_rcrop": metrics.get("miss_rate_rcrop"),
                          "train_loop_miss_rate_ccrop": metrics.get("miss_rate_ccrop"),
                          "miss_rate_ccrop_gt_boxes": oracle},
        "passes": passes,
        "history": [{k: h.get(k) for k in ("epoch", "loss", "pos_cosine", "crop", "epoch_seconds", "knn_top1",
                                           "box_iou", "box_area", "loc_seconds")} for h in history],
        "wall_seconds": metrics["wall_seconds"], "train_images_per_s": metrics["train_images_per_s"],
    }


def picture(recipe: Recipe, run: Path, run_data: RunData, boxes_backbone: torch.nn.Module, path: Path,
            n: int, heatmap: str) -> None:
    """Heatmaps (of ``heatmap``, the final pass's source), localized boxes (yellow), ground truth (cyan) and crop
    pairs of the final backbone."""
    positions = torch.linspace(0, len(run_data.pretrain) - 1, n).long()
    rows = [run_data.pretrain[int(i)] for i in positions]
    images, ids, _ = EvalCollate(run_data.spec, purpose="localize")(rows)
    c = recipe.crop
    with torch.no_grad():
        maps, constant = input_heatmaps(boxes_backbone, images, c.heatmap_alignment, c.heatmap_flip, heatmap)
    boxes = boxes_from_maps(maps, constant, c.k, c.box_rule, c.heatmap_alignment)
    draw_localization_grid(to_uint8(images, run_data.spec.mean, run_data.spec.std), maps, boxes, path,
                           alpha=recipe.crop.alpha, scale=recipe.crop.scale, ratio=recipe.crop.ratio,
                           gt_boxes=run_data.gt_boxes[ids], ids=ids.tolist(),
                           title=f"{LABELS[recipe.crop.mode]}, seed {recipe.train.seed}: final backbone "
                                 f"(epoch {recipe.train.epochs}) heatmaps and boxes")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        s: dict[str, Any] = {}
        for key in ("knn_top1", "linear_top1", "miss_rate_ccrop_gt_boxes"):
            s[key] = mean_spread([r["final"].get(key) for r in mine])
        for i, p in enumerate(mine[0]["passes"]):
            for key in ("box_iou", "box_area", "miss_rate_rcrop", "miss_rate_ccrop_with_these_boxes"):
                s[f"pass_epoch{p['epoch']}_{key}"] = mean_spread([r["passes"][i][key] for r in mine])
        s["final_pos_cosine"] = mean_spread([r["history"][-1]["pos_cosine"] for r in mine])
        s["wall_seconds"] = mean_spread([r["wall_seconds"] for r in mine])
        out[mode] = s
    out["ccrop_minus_rcrop_per_seed"] = paired_differences(runs)
    return out


def paired_differences(runs: list[dict[str, Any]], keys: Sequence[str] = ("knn_top1", "linear_top1")) -> dict[str, Any]:
    """C-Crop minus R-Crop of the same seed (both share the seed's warm-up exactly), and how many are > 0."""
    by = {(r["mode"], r["seed"]): r["final"] for r in runs}
    seeds = sorted(seed for mode, seed in by if mode == "ccrop" and ("rcrop", seed) in by)
    out: dict[str, Any] = {"seeds": seeds}
    for key in keys:
        diffs = [by["ccrop", seed][key] - by["rcrop", seed][key] for seed in seeds]
        out[key] = mean_spread(diffs) | {"per_seed": diffs, "positive": sum(d > 0 for d in diffs)}
    return out


SAME_STUDY = ("dataset", "overrides", "epochs", "warmup", "loc_interval", "knn_every", "probe_epochs")


def previous_runs(path: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs of an earlier result file of the same study (same settings, other seeds), to add seeds to."""
    earlier = json.loads(path.read_text())
    settings = earlier["meta"]["settings"]
    differ = [key for key in SAME_STUDY if settings[key] != getattr(args, key)]
    if differ:
        raise SystemExit(f"--add-to {path}: not the same study ({', '.join(differ)} differ); use its settings")
    if set(settings["seeds"]) & set(args.seeds):
        raise SystemExit(f"--add-to {path}: seeds {sorted(set(settings['seeds']) & set(args.seeds))} are in it already")
    return earlier["runs"], earlier["meta"]


def plots(runs: list[dict[str, Any]], tag: str, settings: dict[str, Any]) -> list[str]:
    from matplotlib.figure import Figure

    written, warmup = [], settings["warmup"]
    fig = Figure(figsize=(19, 4))
    axes = fig.subplots(1, 4)
    plot_knn_and_cosine(axes[0], axes[3], runs, cosine_marker=".")
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        plot_band(axes[1], [[p["epoch"] for p in r["passes"]] for r in mine],
                  [[p["box_iou"] for p in r["passes"]] for r in mine], mode)
        plot_band(axes[2], [[p["epoch"] for p in r["passes"]] for r in mine],
                  [[p["miss_rate_ccrop_with_these_boxes"] for p in r["passes"]] for r in mine], mode)
    rr = [r for r in runs if r["mode"] == "rcrop"] or runs
    plot_band(axes[2], [[p["epoch"] for p in r["passes"]] for r in rr],
              [[p["miss_rate_rcrop"] for p in r["passes"]] for r in rr], "rcrop", marker="x")
    axes[2].lines[-1].set_label("RandomResizedCrop views (whole image)")
    axes[2].lines[-1].set_linestyle("--")
    for ax in (axes[0], axes[3]):
        ax.axvline(warmup + 0.5, color="gray", linestyle=":", label="C-Crop starts (end of warm-up)")
    axes[0].set(title="kNN top-1 on the 1,000 test images", xlabel="epoch", ylabel="%")
    axes[1].set(title="IoU(localized box, ground truth) per pass", xlabel="epoch of the pass (backbone)",
                ylabel="mean IoU")
    axes[2].set(title="view pairs where a view covers < 20% of the object", xlabel="epoch of the boxes",
                ylabel="share of pairs")
    axes[3].set(title="positive-pair cosine (last step of each epoch)", xlabel="epoch", ylabel="cosine")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    schedule = ", ".join([f"{settings['dataset']}, {settings['epochs']} epochs, warm-up {warmup}",
                          *settings["overrides"]])
    fig.suptitle(f"{schedule}: SimCLR resnet_tiny_cifar, R-Crop vs C-Crop (mean, min-max band over seeds). "
                 "C-Crop curves on the right 3 panels use its own boxes; R-Crop's are what C-Crop would use "
                 "with the R-Crop backbone", fontsize=9)
    fig.tight_layout()
    path = EVIDENCE / f"small_objects{tag}_curves.png"
    fig.savefig(path, dpi=100)
    written.append(str(path.relative_to(REPO)))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="small_objects_hard", help="small_objects_hard (objects 5-30%%) or small_objects")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"),
                        help="the recipe both modes train (default: the quickstart's SimCLR)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more recipe overrides for both modes, e.g. --set crop.k=0.3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loc-interval", type=int, default=1)
    parser.add_argument("--knn-every", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--show", type=int, default=8, help="images in each picture")
    parser.add_argument("--runs-dir", default="/tmp/evidence_runs")
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. smoke)")
    parser.add_argument("--keep-runs", action="store_true")
    parser.add_argument("--add-to", type=Path, metavar="JSON",
                        help="an earlier result file of the same settings: run more seeds and summarize all of them")
    args = parser.parse_args()
    tag = f"_{args.tag}" if args.tag else ""
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    earlier_runs, earlier_meta = previous_runs(args.add_to, args) if args.add_to else ([], None)
    started, runs = time.perf_counter(), list(earlier_runs)
    run_data = None
    for seed in args.seeds:
        for mode in MODES:
            recipe = make_recipe(args, mode, seed)
            run = Path(args.runs_dir) / f"small_objects{tag}_{mode}_s{seed}"
            shutil.rmtree(run, ignore_errors=True)
            print(f"== {recipe.name}", flush=True)
            train(recipe, run)
            if run_data is None:
                run_data = build_data(recipe)
            result = analyse_run(recipe, run, run_data, args)
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("mode", "seed", "final", "passes")}, indent=1), flush=True)
            if seed == args.seeds[0] and not args.add_to:  # the pictures of the first study's first seed stay
                picture(recipe, run, run_data, backbone_from_state(recipe, load_file(str(run / "backbone.safetensors"))),
                        EVIDENCE / f"small_objects{tag}_boxes_{mode}.png", args.show, result["passes"][-1]["heatmap_source"])
                trained = sorted((run / "pictures").glob("localization_epoch_*.png"))
                if trained:  # the training loop's own picture after its last localization pass
                    shutil.copy(trained[-1], EVIDENCE / f"small_objects{tag}_train_loop_{trained[-1].name}")
            if not args.keep_runs:
                shutil.rmtree(run / "checkpoints", ignore_errors=True)
    results = {
        "meta": {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                 "command": " ".join([".venv/bin/python", *[Path(sys.argv[0]).as_posix(), *sys.argv[1:]]]),
                 "recipe": f"{args.recipe} + dataset/crop.mode/seed/epochs/warm-up/interval (+ --set) overrides",
                 "settings": vars(args) | {"seeds": sorted({r["seed"] for r in runs}),
                                           "add_to": str(args.add_to) if args.add_to else None},
                 "earlier_commands": [earlier_meta["command"], *earlier_meta.get("earlier_commands", [])]
                 if earlier_meta else [],
                 "loc_epochs_evaluated": loc_epochs(args),
                 "total_seconds": time.perf_counter() - started + (earlier_meta["total_seconds"] if earlier_meta else 0),
                 "notes": ["kNN: k=200, T=0.1, cosine, 4,000 train / 1,000 test images.",
                           "linear_top1: linear-probe-cached-features (fast check, not the paper's protocol): "
                           "raw un-augmented features, SGD lr 10, momentum 0.9, wd 0, batch 512, x0.1 at 60%/80% "
                           "of the epochs, last epoch reported.",
                           "passes: boxes re-localized (k from the recipe) from the checkpoint of that epoch, for "
                           "both modes; R-Crop boxes are what ContrastiveCrop would use, never used in training.",
                           "miss rates: share of view pairs (4 x 4,000 pairs, seed 0) where at least one view covers "
                           "< 20% of the ground-truth box; rcrop = whole image alpha 1, ccrop = these boxes with "
                           "the recipe's alpha.",
                           "pos_cosine: the last training step of each epoch (one batch)."]},
        "summary": summarize(runs),
        "runs": runs,
    }
    results["plots"] = plots(runs, tag, results["meta"]["settings"])
    path = EVIDENCE / f"small_objects{tag}.json"
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {path} in {results['meta']['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()

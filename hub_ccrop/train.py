"""The training loop: any method, any dataset, under ``accelerate`` (DESIGN.md 2.3 for the schedule).

    hub-ccrop train recipes/quickstart.yaml [--set train.epochs=20] [--output-dir DIR] [--resume]
    accelerate launch -m hub_ccrop.train recipes/simclr_cifar10_ccrop.yaml

One epoch: set the crop mode (RandomResizedCrop warm-up, then ContrastiveCrop) and the learning rate,
train on two views per image, then (on the configured epochs) run a localization pass that writes new
boxes into the shared BoxTable the running DataLoader workers read, a kNN monitor, and a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hub_ccrop import data as data_lib
from hub_ccrop.boxes import BoxTable, pairwise_box_iou
from hub_ccrop.crop import object_miss_rate
from hub_ccrop.evaluate import extract_features, knn_accuracy
from hub_ccrop.localize import heatmaps, localize_boxes, normalize_heatmaps
from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone, prepare_model
from hub_ccrop.optim import build_optimizer, set_epoch_lr
from hub_ccrop.recipe import Recipe, RecipeError, load_recipe
from hub_ccrop.views import EvalCollate, SeededCollate, TwoViewCollate
from hub_ccrop.viz import draw_localization_grid

__all__ = ["NonFiniteLossError", "RunData", "build_data", "main", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is still usable."""


@dataclass
class RunData:
    """Everything a run reads: the spec, the pretraining rows and the kNN monitor's labeled splits."""

    spec: Any
    pretrain: Any
    num_rows: int
    fingerprint: str
    knn_train: Any = None
    knn_test: Any = None
    gt_boxes: torch.Tensor | None = None


@dataclass
class TrainState:
    """Loop position and box table, saved with accelerate's state so ``--resume`` continues exactly."""

    boxes: BoxTable
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "boxes": self.boxes.boxes.clone(), "box_metadata": json.dumps(self.boxes.metadata, default=str),
                "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.boxes.load_state(state["boxes"], json.loads(state["box_metadata"]))
        self.history = json.loads(state["history"])


def build_data(recipe: Recipe) -> RunData:
    """Resolve the dataset spec and load the pretraining and kNN splits (offline for local sources)."""
    d = recipe.data
    spec = data_lib.resolve_spec(d.dataset, data_dir=d.data_dir, image_column=d.image_column,
                                 label_column=d.label_column)
    pretrain = data_lib.load_images(spec, spec.pretrain_splits, streaming=d.streaming)
    num_rows = data_lib.num_rows(pretrain, spec)
    knn_train = knn_test = None
    if d.holdout:
        if d.holdout >= num_rows:
            raise RecipeError(f"data.holdout ({d.holdout}) must be smaller than the dataset ({num_rows} rows)")
        pretrain, knn_test = data_lib.split_holdout(pretrain, d.holdout)
        knn_train = pretrain
    elif spec.test_split is not None and recipe.train.knn_every:
        knn_train = data_lib.load_images(spec, [spec.train_split])
        knn_test = data_lib.load_images(spec, [spec.test_split])
    if d.max_rows:
        pretrain = data_lib.first_rows(pretrain, d.max_rows)
    gt = data_lib.ground_truth_boxes(pretrain, num_rows)
    return RunData(spec, pretrain, num_rows, data_lib.dataset_fingerprint(spec, num_rows), knn_train, knn_test, gt)


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("checkpoint_*"))
    return found[-1] if found else None


def _save_checkpoint(accelerator: Accelerator, out: Path, state: TrainState, keep: int) -> Path:
    """accelerate's save_state into a temporary folder, renamed into place: a kill never leaves half a checkpoint."""
    final = out / "checkpoints" / f"checkpoint_{state.global_step:09d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted((out / "checkpoints").glob("checkpoint_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _loader(dataset, collate, *, batch_size: int, num_workers: int, shuffle: bool, drop_last: bool,
            seed: int) -> DataLoader:
    map_style = not data_lib.is_streaming(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and map_style, drop_last=drop_last,
        num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
    )


def _autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    if accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _knn(accelerator, backbone, run_data: RunData, eval_collate, recipe: Recipe) -> dict[str, float]:
    t = recipe.train
    loaders = [accelerator.prepare(_loader(ds, eval_collate, batch_size=recipe.crop.loc_batch_size
                                           or 2 * recipe.data.batch_size, num_workers=recipe.data.num_workers,
                                           shuffle=False, drop_last=False, seed=0))
               for ds in (run_data.knn_train, run_data.knn_test)]
    dtype = _autocast_dtype(accelerator)
    _, train_feats, train_labels = extract_features(backbone, loaders[0], accelerator=accelerator, autocast_dtype=dtype)
    _, test_feats, test_labels = extract_features(backbone, loaders[1], accelerator=accelerator, autocast_dtype=dtype)
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                        num_classes=run_data.spec.num_classes, k=t.knn_k, temperature=t.knn_temperature)


def _localization_pass(accelerator, encoder, run_data: RunData, eval_collate, state: TrainState, recipe: Recipe,
                       out: Path, picture_ids: torch.Tensor) -> dict[str, float]:
    """Localize every pretraining image, gather by id, write the shared table, save it and a picture."""
    loader = accelerator.prepare(_loader(run_data.pretrain, eval_collate,
                                         batch_size=recipe.crop.loc_batch_size or 2 * recipe.data.batch_size,
                                         num_workers=recipe.data.num_workers, shuffle=False, drop_last=False, seed=0))
    start = time.perf_counter()
    ids, boxes = localize_boxes(encoder, loader, k=recipe.crop.k, autocast_dtype=_autocast_dtype(accelerator),
                                channels_last=recipe.model.channels_last, accelerator=accelerator)
    seconds = time.perf_counter() - start
    state.boxes.update(ids, boxes)
    state.boxes.metadata.update(epoch=state.epoch, k=recipe.crop.k)
    stats = {"loc_seconds": seconds, "loc_images": len(ids),
             "box_area": float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean())}
    if run_data.gt_boxes is not None:
        stats["box_iou"] = float(pairwise_box_iou(boxes, run_data.gt_boxes[ids]).mean())
    if accelerator.is_main_process:
        for suffix in (".parquet", ".safetensors"):
            state.boxes.save(out / "boxes" / f"epoch_{state.epoch:04d}{suffix}")
            state.boxes.save(out / f"boxes{suffix}")
        _draw_picture(encoder, run_data, eval_collate, state, recipe, picture_ids,
                      out / "pictures" / f"localization_epoch_{state.epoch:04d}.png")
    accelerator.wait_for_everyone()
    return stats


@torch.no_grad()
def _draw_picture(encoder, run_data: RunData, eval_collate, state: TrainState, recipe: Recipe,
                  ids: torch.Tensor, path: Path) -> None:
    images, batch_ids, _ = eval_collate([run_data.pretrain[int(i)] for i in ids])
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    maps, _ = normalize_heatmaps(heatmaps(encoder, images.to(device)))
    encoder.train(was_training)
    maps = torch.nn.functional.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]
    gt = run_data.gt_boxes[batch_ids] if run_data.gt_boxes is not None else None
    draw_localization_grid(eval_collate.to_uint8(images), maps.cpu(), state.boxes.lookup(batch_ids), path,
                           alpha=recipe.crop.alpha, scale=recipe.crop.scale, ratio=recipe.crop.ratio, gt_boxes=gt,
                           ids=batch_ids.tolist(), title=f"{recipe.name}: boxes after epoch {state.epoch}")


def _run_info(recipe: Recipe, run_data: RunData, backbone) -> dict[str, Any]:
    cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    spec = run_data.spec
    size = spec.image_size
    return {
        "model": recipe.model.name, "model_args": recipe.model.args,
        "input_size": [3, size, size], "mean": list(spec.mean), "std": list(spec.std),
        "interpolation": cfg.get("interpolation", "bilinear"), "crop_pct": 1.0 if spec.eval_resize is None else 0.875,
        "method": recipe.method.name, "method_options": recipe.method.options,
        "dataset": {"name": spec.name, "hub_id": spec.hub_id, "splits": list(spec.pretrain_splits),
                    "num_rows": run_data.num_rows, "image_column": spec.image_column,
                    "label_column": spec.label_column, "fingerprint": run_data.fingerprint},
        "epochs": recipe.train.epochs, "batch_size": recipe.data.batch_size,
        "schedule": {"crop": recipe.crop.mode, "warmup_epochs": recipe.crop.warmup_epochs,
                     "loc_epochs": recipe.localization_epochs(), "k": recipe.crop.k, "alpha": recipe.crop.alpha},
        "license": "apache-2.0", "target": recipe.target,
    }


def train(recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``recipe``; return the final metrics (also written to ``OUTPUT/metrics.json``)."""
    t = recipe.train
    out = Path(output_dir or t.output_dir or Path("runs") / recipe.name)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(t.seed)
    is_main = accelerator.is_main_process
    if not resume and is_main and _latest_checkpoint(out) is not None:
        raise RuntimeError(f"{out} already holds a run: pass --resume to continue it, or choose another --output-dir")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())

    # -- data -----------------------------------------------------------------------------------
    run_data = build_data(recipe)
    spec = run_data.spec
    table = BoxTable(run_data.num_rows, {"dataset": spec.hub_id or spec.name, "split": "+".join(spec.pretrain_splits),
                                         "fingerprint": run_data.fingerprint, "backbone": recipe.model.name,
                                         "k": recipe.crop.k})
    if recipe.crop.init_boxes:
        from hub_ccrop.hub import load_boxes

        init = load_boxes(recipe.crop.init_boxes, dataset_num_rows=run_data.num_rows, fingerprint=run_data.fingerprint)
        table.load_state(init.boxes, {"init_boxes": recipe.crop.init_boxes})
    state = TrainState(table)
    c = recipe.crop
    collate = SeededCollate(
        TwoViewCollate(table, size=spec.image_size, mean=spec.mean, std=spec.std, scale=c.scale, ratio=c.ratio,
                       alpha=c.alpha, blur=c.blur, mode=recipe.crop_mode(0), batched=recipe.data.batched_views),
        seed=t.seed,
    )
    eval_collate = EvalCollate(spec)
    world_batch = recipe.data.batch_size * accelerator.num_processes * t.grad_accum
    per_process_batch = recipe.data.batch_size
    loader = _loader(run_data.pretrain, collate, batch_size=per_process_batch, num_workers=recipe.data.num_workers,
                     shuffle=True, drop_last=True, seed=t.seed)

    # -- model, method, optimizer ---------------------------------------------------------------
    backbone = prepare_model(create_backbone(recipe.model.name, **recipe.model.args),
                             sync_bn=recipe.model.sync_bn and accelerator.num_processes > 1,
                             channels_last=recipe.model.channels_last)
    method = build_method(recipe.method.name, backbone, **recipe.method.options)
    if hasattr(method, "check_dataset_size"):
        method.check_dataset_size(run_data.num_rows)
    base_lr = recipe.optim.lr * (world_batch / 256 if recipe.optim.lr_scaling == "linear" else 1.0)
    optimizer = build_optimizer(method.param_groups(base_lr, recipe.optim.weight_decay), recipe.optim, base_lr)
    method, optimizer, loader = accelerator.prepare(method, optimizer, loader)
    online = accelerator.unwrap_model(method)
    accelerator.register_for_checkpointing(state)

    if resume:
        ckpt = _latest_checkpoint(out)
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint under {out / 'checkpoints'}, starting from scratch")
        else:
            accelerator.load_state(str(ckpt))
            accelerator.print(f"resumed from {ckpt} (epoch {state.epoch}, step {state.step_in_epoch} of it)")
    accelerator.init_trackers(recipe.name, config=_flat(recipe.to_dict()))

    loc_epochs = set(recipe.localization_epochs())
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * t.epochs
    picture_ids = torch.linspace(0, run_data.num_rows - 1, min(t.show_images, run_data.num_rows)).long()
    metrics: dict[str, Any] = {}
    run_start = time.perf_counter()
    train_seconds, images_seen = 0.0, 0
    accelerator.print(f"{recipe.name}: {recipe.method.name} on {spec.name} ({run_data.num_rows} images), "
                      f"{recipe.model.name}, {t.epochs} epochs x {steps_per_epoch} steps, global batch {world_batch}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}; output {out}")

    # -- epochs ---------------------------------------------------------------------------------
    while state.epoch < t.epochs:
        epoch = state.epoch
        mode = recipe.crop_mode(epoch)
        collate.set_epoch(epoch, mode)
        lr = set_epoch_lr(optimizer, recipe.optim, epoch, t.epochs, base_lr)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, state.step_in_epoch) if state.step_in_epoch else loader
        method.train()
        bar = tqdm(batches, total=steps_per_epoch, initial=state.step_in_epoch, disable=not is_main,
                   desc=f"epoch {epoch + 1}/{t.epochs} [{mode}]", leave=False)
        tic = time.perf_counter()
        for batch in bar:
            view1, view2 = collate.views(batch, accelerator.device)
            with accelerator.accumulate(method):
                loss, logs = method(view1, view2)
                if not torch.isfinite(loss.detach()).all():
                    last = _latest_checkpoint(out)
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {state.step_in_epoch + 1}: training "
                        f"stopped. Last good checkpoint: {last or 'none yet'} (resume with --resume after lowering "
                        f"optim.lr or using train.mixed_precision=no)")
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    online.after_optimizer_step((state.global_step + 1) / total_steps)
            state.step_in_epoch += 1
            state.global_step += 1
            images_seen += view1.shape[0] * accelerator.num_processes
            elapsed = time.perf_counter() - tic
            if state.global_step % t.log_every == 0 or state.step_in_epoch == steps_per_epoch:
                rate = images_seen / max(train_seconds + elapsed, 1e-9)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
                accelerator.log({f"train/{k}": v for k, v in logs.items()} | {"train/lr": lr, "train/images_per_s": rate},
                                step=state.global_step)
            if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0:
                _save_checkpoint(accelerator, out, state, t.keep_checkpoints)
            if t.max_steps is not None and state.global_step >= t.max_steps:
                accelerator.print(f"stopping at train.max_steps={t.max_steps} (the run is not finished)")
                accelerator.end_training()
                return {"stopped_at_step": state.global_step}
        train_seconds += time.perf_counter() - tic
        state.epoch += 1
        state.step_in_epoch = 0
        record: dict[str, Any] = {"epoch": state.epoch, "loss": logs["loss"], "lr": lr, "crop": mode}
        if state.epoch in loc_epochs:
            record |= _localization_pass(accelerator, online.localization_encoder, run_data, eval_collate, state,
                                         recipe, out, picture_ids)
            accelerator.print(f"epoch {state.epoch}: localized {record['loc_images']} images in "
                              f"{record['loc_seconds']:.1f}s, mean box area {record['box_area']:.2f}"
                              + (f", IoU with ground truth {record['box_iou']:.3f}" if "box_iou" in record else ""))
        if run_data.knn_test is not None and t.knn_every and (state.epoch % t.knn_every == 0 or state.epoch == t.epochs):
            record |= {f"knn_{k}": v for k, v in _knn(accelerator, online.localization_encoder, run_data,
                                                       eval_collate, recipe).items()}
            accelerator.print(f"epoch {state.epoch}: kNN top-1 {record['knn_top1']:.2f}%")
        state.history.append(record)
        accelerator.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, int | float)}, step=state.global_step)
        if state.epoch % t.checkpoint_every == 0 or state.epoch == t.epochs:
            _save_checkpoint(accelerator, out, state, t.keep_checkpoints)

    # -- the end --------------------------------------------------------------------------------
    backbone = online.localization_encoder
    metrics = {"epochs": t.epochs, "train_images_per_s": images_seen / max(train_seconds, 1e-9),
               "wall_seconds": time.perf_counter() - run_start, "final_loss": state.history[-1]["loss"]}
    for record in reversed(state.history):
        for key in ("knn_top1", "knn_top5", "box_iou", "box_area"):
            if key in record:
                metrics.setdefault(key, record[key])
    if run_data.gt_boxes is not None:
        miss = object_miss_rate(run_data.gt_boxes, state.boxes.boxes, image_size=spec.image_size,
                                scale=c.scale, ratio=c.ratio, alpha=c.alpha)
        metrics |= {"miss_rate_ccrop": miss["ccrop"], "miss_rate_rcrop": miss["rcrop"]}
    if is_main:
        weights = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
        save_file(weights, str(out / "backbone.safetensors"), metadata={"format": "pt"})
        (out / "run.json").write_text(json.dumps(_run_info(recipe, run_data, backbone), indent=2))
        (out / "metrics.json").write_text(json.dumps(metrics | {"history": state.history}, indent=2))
        state.boxes.save(out / "boxes.parquet")
        state.boxes.save(out / "boxes.safetensors")
    accelerator.end_training()
    accelerator.print(_summary(recipe, metrics, out))
    return metrics


def _summary(recipe: Recipe, metrics: dict[str, Any], out: Path) -> str:
    lines = [f"\n{recipe.name} finished in {metrics['wall_seconds'] / 60:.1f} min "
             f"({metrics['train_images_per_s']:.0f} images/s in training)"]
    if "knn_top1" in metrics:
        lines.append(f"  kNN top-1 (k={recipe.train.knn_k}, T={recipe.train.knn_temperature}): {metrics['knn_top1']:.2f}%")
    if "box_iou" in metrics:
        lines.append(f"  learned boxes vs ground truth: mean IoU {metrics['box_iou']:.3f}, "
                     f"mean box area {metrics['box_area']:.2f}")
    if "miss_rate_ccrop" in metrics:
        lines.append(f"  view pairs where a view misses the object (< 20% of it): "
                     f"RandomResizedCrop {metrics['miss_rate_rcrop']:.3f}, ContrastiveCrop {metrics['miss_rate_ccrop']:.3f}")
    if recipe.target:
        lines.append(f"  paper reference: {recipe.target}")
    lines.append(f"  run folder: {out} (backbone.safetensors, boxes.parquet, pictures/, metrics.json); "
                 f"share it with: hub-ccrop export {out} --out {out}/export")
    return "\n".join(lines)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML file (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.epochs=20 (repeatable)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        train(recipe, args.output_dir, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_ccrop.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

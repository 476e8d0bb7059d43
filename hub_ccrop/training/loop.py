"""The training loop (docs/METHOD.md, section 4: the schedule): any method, any view groups, under accelerate.

One epoch: set the crop mode (RandomResizedCrop warm-up, then ContrastiveCrop) and the schedules, train
on the views of each batch, then (on the configured epochs) run a localization pass that writes new boxes
into the shared BoxTable the running DataLoader workers read, a kNN monitor, and a checkpoint."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hub_ccrop.box_quality import pass_line
from hub_ccrop.boxes import BoxTable
from hub_ccrop.distributed import release_accelerate_state
from hub_ccrop.errors import TrainingInterrupted, UserError
from hub_ccrop.hub import load_boxes
from hub_ccrop.localizer import external_localizer
from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone, prepare_model
from hub_ccrop.optim import build_optimizer, set_epoch_lr, set_step_schedule
from hub_ccrop.progress import RunProgress
from hub_ccrop.recipe import Recipe, batch_split
from hub_ccrop.training.data_source import RunData, SeededCollate, ViewSource, build_data, view_source
from hub_ccrop.training.monitors import knn_monitor, localization_pass, sync_buffers
from hub_ccrop.training.peers import peer_failures_end_the_run
from hub_ccrop.training.report import final_metrics, flat_config, run_info, summary, write_skipped
from hub_ccrop.training.state import (
    NonFiniteWatch,
    StopRequest,
    TrainState,
    floats,
    interrupted_at,
    latest_checkpoint,
    save_checkpoint,
)
from hub_ccrop.views import SkipCounter, ViewCollate


def train(recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``recipe``; return the final metrics (also written to ``OUTPUT/metrics.json``).

    SIGINT/SIGTERM save a checkpoint at the current step and raise :class:`TrainingInterrupted`.
    """
    stop = StopRequest()
    release_accelerate_state()  # e.g. an eval before this run left its own mixed precision behind
    try:
        return _train(recipe, output_dir, resume, stop)
    finally:
        stop.restore()
        release_accelerate_state()


@dataclass
class Run:
    """What the loop's pieces share: one run's accelerator, data, model, optimizer and running totals."""

    recipe: Recipe
    accelerator: Accelerator
    out: Path
    run_data: RunData
    state: TrainState
    collate: SeededCollate
    batches: ViewSource
    method: Any  # the prepared (possibly DDP-wrapped) method
    optimizer: Any
    base_lr: float
    stop: StopRequest
    watch: NonFiniteWatch
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # the latest step's, on the device until logged
    train_seconds: float = 0.0
    images_seen: int = 0

    @property
    def online(self) -> Any:
        return self.accelerator.unwrap_model(self.method)

    @property
    def total_steps(self) -> int:
        return len(self.batches) * self.recipe.train.epochs

    def check_finite(self) -> None:
        """Before anything that would keep or use weights trained on a bad loss."""
        self.watch.check(latest_checkpoint(self.out))

    def checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.out, self.state, self.recipe.train.keep_checkpoints)

    def interrupted(self, signum: int) -> TrainingInterrupted:
        return interrupted_at(self.accelerator, self.out, self.state, self.recipe.train.keep_checkpoints, signum)


def _train(recipe: Recipe, output_dir: str | Path | None, resume: bool, stop: StopRequest) -> dict[str, Any]:
    t = recipe.train
    out = recipe.run_dir(output_dir)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, log_with=recipe.trackers(),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(t.seed)
    with peer_failures_end_the_run():  # several processes: a failure in one ends all within seconds
        return _run(recipe, accelerator, out, resume, stop)


def _run(recipe: Recipe, accelerator: Accelerator, out: Path, resume: bool, stop: StopRequest) -> dict[str, Any]:
    t = recipe.train
    if not resume and latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --output-dir")
    run = _prepare_run(recipe, accelerator, out, stop)
    if resume:
        _resume(run)
    accelerator.init_trackers(recipe.name, config=flat_config(recipe.to_dict()))
    run_start = time.perf_counter()
    accelerator.print(f"{recipe.name}: {recipe.method.name} on {run.run_data.spec.name} ({run.run_data.num_rows} "
                      f"images), {recipe.model.name}, {t.epochs} epochs x {len(run.batches)} steps, "
                      f"{batch_split(recipe.data.batch_size, accelerator.num_processes, t.grad_accum)}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device.type}; run folder {out}")

    stop.install()  # from here on, Ctrl-C/SIGTERM stop after the current step with a checkpoint
    progress = RunProgress(t.epochs, len(run.batches), recipe.localization_epochs(), start_step=run.state.global_step)
    if run.state.global_step == 0 and 0 in recipe.localization_epochs():  # an external localizer, no warm-up
        run.state.history.append({"epoch": 0} | localization_pass(accelerator, run.online.localization_encoder,
                                                                   run.run_data, run.state, recipe, out))
        accelerator.print(f"before epoch 1: {pass_line(run.state.history[-1])}")
    while run.state.epoch < t.epochs:
        if signum := stop.agreed(accelerator):
            raise run.interrupted(signum)
        record = train_one_epoch(run)
        if record is None:  # train.max_steps reached
            return {"stopped_at_step": run.state.global_step}
        end_of_epoch(run, record)
        progress.report(accelerator, run.state.epoch, run.state.global_step, record["images_per_s"])
    return finish(run, time.perf_counter() - run_start)


def _prepare_run(recipe: Recipe, accelerator: Accelerator, out: Path, stop: StopRequest) -> Run:
    """Data, the shared box table, the seeded views, model, method and optimizer; then the run folder."""
    c = recipe.crop
    run_data = build_data(recipe, accelerator)
    spec = run_data.spec
    table = BoxTable(run_data.num_rows, {"dataset": spec.hub_id or spec.name, "split": "+".join(spec.pretrain_splits),
                                         "fingerprint": run_data.fingerprint, "backbone": recipe.model.name, "k": c.k})
    if c.init_boxes:
        init = load_boxes(c.init_boxes, dataset_num_rows=run_data.num_rows, fingerprint=run_data.fingerprint)
        table.load_state(init.boxes, {"init_boxes": c.init_boxes})
    state = TrainState(table, skipped=SkipCounter(run_data.num_rows))
    if c.localizer:  # load it now (cached for the passes): a bad one stops the run before training, not after warm-up
        external_localizer(c.localizer, spec.mean, spec.std, accelerator.device)
    on_gpu = recipe.data.batched_views and accelerator.device.type == "cuda"  # crop on the host, augment on the GPU
    collate = SeededCollate(
        ViewCollate.from_spec(spec, table, groups=recipe.view_groups(spec.image_size, spec.blur), alpha=c.alpha,
                              mode=recipe.crop_mode(0), batched=recipe.data.batched_views, raw=on_gpu,
                              device_decode=on_gpu),
        seed=recipe.train.seed,
    )
    collate.collate.skipped = state.skipped
    batches = view_source(recipe, run_data, collate, accelerator)

    method = build_method(recipe.method.name, create_backbone(recipe.model.name, **recipe.model.args),
                          **recipe.method.options)
    method.check_dataset_size(run_data.num_rows)  # MoCo warns when its queue outgrows the data
    method = prepare_model(method, sync_bn=recipe.model.sync_bn and accelerator.num_processes > 1,
                           channels_last=recipe.model.channels_last, device_type=accelerator.device.type)
    world_batch = recipe.data.batch_size  # global: per-process batch x processes x grad_accum
    base_lr = recipe.optim.lr * (world_batch / 256 if recipe.optim.lr_scaling == "linear" else 1.0)
    optimizer = build_optimizer(method.param_groups(base_lr, recipe.optim.weight_decay), recipe.optim, base_lr,
                                module=method)
    method, optimizer = accelerator.prepare(method, optimizer)
    if accelerator.is_main_process:  # only now: a run that fails before training leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    accelerator.register_for_checkpointing(state)
    return Run(recipe, accelerator, out, run_data, state, collate, batches, method, optimizer, base_lr, stop,
               NonFiniteWatch(accelerator.device))


def _resume(run: Run) -> None:
    """Load the latest checkpoint (weights, optimizer, RNGs, loop position, boxes), if there is one."""
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        run.accelerator.print(f"--resume: no checkpoint under {run.out / 'checkpoints'}, starting from scratch")
        return
    run.accelerator.load_state(str(ckpt))
    run.accelerator.print(f"resumed from {ckpt}: epoch {run.state.epoch + 1}, step {run.state.step_in_epoch} of it")


def train_one_epoch(run: Run) -> dict[str, Any] | None:
    """Train the rest of epoch ``state.epoch``; its history record, or None when train.max_steps stopped the run."""
    recipe, accelerator, state, online = run.recipe, run.accelerator, run.state, run.online
    epoch, t = state.epoch, recipe.train
    mode = recipe.crop_mode(epoch)
    run.collate.set_epoch(epoch, mode)
    online.start_epoch(epoch, t.epochs)
    lr = set_epoch_lr(run.optimizer, recipe.optim, epoch, t.epochs, run.base_lr)
    run.method.train()
    bar = tqdm(run.batches.epoch(epoch, state.step_in_epoch), total=len(run.batches), initial=state.step_in_epoch,
               disable=not accelerator.is_main_process, desc=f"epoch {epoch + 1}/{t.epochs} [{mode}]", leave=False)
    tic = time.perf_counter()
    for views in bar:
        if recipe.optim.per_step:
            lr = _step_schedule(run)
        with accelerator.accumulate(run.method):
            loss, run.logs = run.method(views)
            run.watch.update(loss, epoch + 1, state.step_in_epoch + 1)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                _before_optimizer_step(run)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                online.after_optimizer_step(state.global_step, run.total_steps)
        state.step_in_epoch += 1
        state.global_step += 1
        run.images_seen += views.batch_size * accelerator.num_processes
        if state.global_step % t.log_every == 0 or state.step_in_epoch == len(run.batches):
            _log_step(run, bar, lr, time.perf_counter() - tic)
        _step_checkpoint_or_stop(run)
        if _max_steps_reached(run):
            return None
    bar.close()
    run.check_finite()
    epoch_seconds = time.perf_counter() - tic
    run.train_seconds += epoch_seconds
    numbers = floats(run.logs)
    return {"epoch": epoch + 1, "loss": numbers.get("loss"), "pos_cosine": numbers.get("pos_cosine"), "lr": lr,
            "crop": mode, "epoch_seconds": epoch_seconds,
            "images_per_s": (state.step_in_epoch * recipe.data.batch_size / t.grad_accum) / epoch_seconds}


def _step_schedule(run: Run) -> float:
    """``optim.per_step``: lr and weight decay at this step's fractional epoch."""
    position = run.state.epoch + run.state.step_in_epoch / len(run.batches)
    return set_step_schedule(run.optimizer, run.recipe.optim, position, run.recipe.train.epochs, run.base_lr)


def _before_optimizer_step(run: Run) -> None:
    """The method's hook between backward and step (clipping, frozen layers), on unscaled gradients."""
    if run.accelerator.scaler is not None:
        run.accelerator.unscale_gradients()
    run.online.before_optimizer_step()


def _log_step(run: Run, bar: tqdm, lr: float, epoch_seconds: float) -> None:
    """The latest step's numbers and the training rate, to the progress bar and the trackers (one host sync)."""
    run.check_finite()
    numbers = floats(run.logs)
    rate = run.images_seen / max(run.train_seconds + epoch_seconds, 1e-9)
    bar.set_postfix(loss=f"{numbers['loss']:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.3g}")
    run.accelerator.log({f"train/{k}": v for k, v in numbers.items()} | {"train/lr": lr, "train/images_per_s": rate},
                        step=run.state.global_step)


def _step_checkpoint_or_stop(run: Run) -> None:
    """train.checkpoint_every_steps; a stop request (Ctrl-C/SIGTERM) saves a checkpoint here and raises."""
    t, state, accelerator = run.recipe.train, run.state, run.accelerator
    if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0:
        run.check_finite()
        run.checkpoint()
    # Mid-epoch only after a full accumulation cycle (exact resume); the last step's stop waits for
    # the epoch's end (localization, kNN) and is taken at the next epoch's start.
    if (accelerator.sync_gradients and state.step_in_epoch < len(run.batches)
            and (signum := run.stop.agreed(accelerator, state.global_step, t.log_every))):
        run.check_finite()  # never checkpoint weights trained on a bad loss
        raise run.interrupted(signum)


def _max_steps_reached(run: Run) -> bool:
    """train.max_steps: stop here (the run continues with --resume from its last checkpoint)."""
    max_steps = run.recipe.train.max_steps
    if max_steps is None or run.state.global_step < max_steps:
        return False
    run.check_finite()
    run.accelerator.print(f"stopped at train.max_steps={max_steps}; continue with --resume")
    run.accelerator.end_training()
    return True


def end_of_epoch(run: Run, record: dict[str, Any]) -> None:
    """Close the epoch: the localization pass and kNN monitor when due, the history record, a checkpoint."""
    recipe, accelerator, state, t = run.recipe, run.accelerator, run.state, run.recipe.train
    state.epoch += 1
    state.step_in_epoch = 0
    online = run.online
    sync_buffers(accelerator, online)
    if state.epoch in recipe.localization_epochs():
        record |= localization_pass(accelerator, online.localization_encoder, run.run_data, state, recipe, run.out)
        accelerator.print(f"epoch {state.epoch}: {pass_line(record)}")
    if run.run_data.knn_test is not None and (state.epoch % t.knn_every == 0 or state.epoch == t.epochs):
        knn = knn_monitor(accelerator, online.localization_encoder, run.run_data, recipe)
        record |= {f"knn_{k}": v for k, v in knn.items()}
        accelerator.print(f"epoch {state.epoch}: kNN top-1 {record['knn_top1']:.2f}%")
    state.history.append(record)
    accelerator.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, int | float)}, step=state.global_step)
    if state.epoch % t.checkpoint_every == 0 or state.epoch == t.epochs:
        run.checkpoint()


def finish(run: Run, wall_seconds: float) -> dict[str, Any]:
    """The final metrics; the main process writes the backbone, run.json, metrics.json and the boxes."""
    recipe, accelerator, state, out, run_data = run.recipe, run.accelerator, run.state, run.out, run.run_data
    metrics = final_metrics(recipe, run_data, state, run.images_seen / max(run.train_seconds, 1e-9),
                             wall_seconds, len(state.sync_skipped(accelerator)))
    if accelerator.is_main_process:
        backbone = run.online.localization_encoder
        weights = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
        save_file(weights, str(out / "backbone.safetensors"), metadata={"format": "pt"})
        run_info(recipe, run_data, backbone, accelerator.num_processes).save(out)
        (out / "metrics.json").write_text(json.dumps(metrics | {"history": state.history}, indent=2))
        state.boxes.save(out / "boxes.parquet")
        state.boxes.save(out / "boxes.safetensors")
        write_skipped(out, run_data, state.skipped_ids)
    accelerator.end_training()
    accelerator.print(summary(recipe, metrics, out))
    return metrics

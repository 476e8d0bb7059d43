"""The training loop: any method, any dataset, under ``accelerate`` (docs/METHOD.md, section 4: the schedule).

    hub-ccrop train recipes/quickstart.yaml [--set train.epochs=20] [--output-dir DIR] [--resume]
    accelerate launch -m hub_ccrop.train recipes/simclr_cifar10_ccrop.yaml

One epoch: set the crop mode (RandomResizedCrop warm-up, then ContrastiveCrop) and the learning rate,
train on two views per image, then (on the configured epochs) run a localization pass that writes new
boxes into the shared BoxTable the running DataLoader workers read, a kNN monitor, and a checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hub_ccrop import data as data_lib
from hub_ccrop.boxes import BoxTable
from hub_ccrop.crop import FULL_BOX, object_miss_rate
from hub_ccrop.data import DatasetSpec
from hub_ccrop.data.resolve import resolve_for_run
from hub_ccrop.data.workers import worker_init  # workers leave stop signals to the main process
from hub_ccrop.distributed import default_autocast_dtype, release_accelerate_state
from hub_ccrop.errors import TrainingInterrupted, UserError, run_command
from hub_ccrop.evaluate import extract_features, knn_accuracy
from hub_ccrop.hub import load_boxes
from hub_ccrop.localize import heatmaps, localize_boxes, picture_heatmaps
from hub_ccrop.methods import build_method
from hub_ccrop.models import create_backbone, prepare_model
from hub_ccrop.optim import build_optimizer, set_epoch_lr
from hub_ccrop.recipe import Recipe, RecipeError, batch_split, load_recipe
from hub_ccrop.run_info import RunInfo, Schedule
from hub_ccrop.views import (
    DeviceResidentImages,
    EncodedBatch,
    EvalCollate,
    RawBatch,
    SkipCounter,
    TwoViewCollate,
)
from hub_ccrop.viz import draw_localization_grid, to_uint8

__all__ = ["LoaderViews", "NonFiniteLossError", "NonFiniteWatch", "ResidentViews", "Run", "RunData", "SeededCollate",
           "StreamViews", "ViewSource", "build_data", "end_of_epoch", "main", "train", "train_one_epoch", "view_source"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is still usable."""


@dataclass
class RunData:
    """Everything a run reads: the spec, the pretraining rows and the kNN monitor's labeled splits."""

    spec: DatasetSpec
    pretrain: Any
    num_rows: int  # size of the box table: 1 + the largest pretraining id
    fingerprint: str
    knn_train: Any = None
    knn_test: Any = None
    gt_boxes: torch.Tensor | None = None  # [num_rows, 4] or [num_rows, K, 4] when the data has ground-truth boxes
    # data.device_resident: the splits' images decoded once onto the device ("pretrain", "knn_train", ...)
    resident: dict[str, DeviceResidentImages] = field(default_factory=dict)


@dataclass
class TrainState:
    """Loop position and box table, saved with accelerate's state so ``--resume`` continues exactly."""

    boxes: BoxTable
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: SkipCounter = field(default_factory=SkipCounter)  # undecodable pretraining images, by id
    skipped_ids: list[int] = field(default_factory=list)  # all processes' skipped ids, as of the last sync

    def sync_skipped(self, accelerator: Accelerator) -> list[int]:
        """Every process's skipped ids, merged (collective: call it on all processes)."""
        self.skipped_ids = sorted(set(self.skipped_ids) | set(gather_object(self.skipped.ids())))
        return self.skipped_ids

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "boxes": self.boxes.boxes.clone(), "box_metadata": json.dumps(self.boxes.metadata, default=str),
                "history": json.dumps(self.history), "skipped_ids": json.dumps(self.skipped_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.boxes.load_state(state["boxes"], json.loads(state["box_metadata"]))
        self.history = json.loads(state["history"])
        self.skipped_ids = json.loads(state.get("skipped_ids", "[]"))  # absent in older checkpoints
        for sample_id in self.skipped_ids:  # already reported: no second warning after --resume
            self.skipped.add(0, sample_id)


class StopRequest:
    """SIGINT/SIGTERM during training: remembered, acted on after the current step instead of killing the run.

    Checkpoints are collective, so every process must stop at the same step: :meth:`agreed` takes the
    maximum over processes (a rank that got no signal stops with the others).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # A second signal (a launcher forwards the terminal's Ctrl-C again) must not cut the checkpoint short.
        self.signum = self.signum or signum

    def agreed(self, accelerator: Accelerator, step: int = 0, every: int = 1) -> int:
        """The signal any process received (0 for none), the same number on every process.

        With several processes the flags are reduced only on steps divisible by ``every``: reading the
        reduced flag is a host sync, which a step should not pay each time.
        """
        if accelerator.num_processes == 1:
            return self.signum
        if step % every:
            return 0
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())


def _resume_command(out: Path, accelerator: Accelerator) -> str:
    """The exact command that continues this run (the run folder keeps the resolved recipe)."""
    args = f"{shlex.quote(str(out / 'recipe.yaml'))} --output-dir {shlex.quote(str(out))} --resume"
    if accelerator.num_processes == 1:
        return f"hub-ccrop train {args}"
    cpu = "ACCELERATE_USE_CPU=1 " if os.environ.get("ACCELERATE_USE_CPU") else ""
    return (f"{cpu}accelerate launch --multi_gpu --num_processes {accelerator.num_processes} "
            f"-m hub_ccrop.train {args}")


def _interrupted(accelerator: Accelerator, out: Path, state: TrainState, keep: int, signum: int) -> TrainingInterrupted:
    """Save a checkpoint at the current step on every process; the exception carries the resume command."""
    checkpoint = _save_checkpoint(accelerator, out, state, keep)
    accelerator.end_training()
    return TrainingInterrupted(signum, str(checkpoint), _resume_command(out, accelerator))


class SeededCollate:
    """The collate stage with each batch's augmentation drawn from a seed of (run seed, epoch, sample ids).

    The views of a batch are then the same after ``--resume`` and for any number of DataLoader workers;
    the epoch and the crop mode live in shared memory, so persistent workers follow them.
    """

    def __init__(self, collate: TwoViewCollate, seed: int) -> None:
        self.collate = collate
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, mode: str) -> None:
        self._epoch.fill_(epoch)
        self.collate.mode = mode

    def batch_seed(self, ids: Any) -> int:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(np.asarray([self.seed, int(self._epoch)], dtype=np.int64).tobytes())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        return int.from_bytes(digest.digest(), "little") >> 1

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.batch_seed([row["id"] for row in rows]))
            return self.collate(rows)

    def views(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of a batch on ``device`` (a :class:`RawBatch` is augmented there)."""
        if isinstance(batch, RawBatch | EncodedBatch):
            seed = self.batch_seed(batch.ids)  # host ids (both batch types keep them there): no device sync
            g = torch.Generator(device=device).manual_seed(seed)
            if isinstance(batch, EncodedBatch):
                batch = self.collate.decode_on(batch, device)
            return self.collate.augment(batch.to(device, non_blocking=True), g)
        view1, view2, _, _ = batch
        return view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)


def build_data(recipe: Recipe, accelerator: Accelerator | None = None) -> RunData:
    """Resolve the dataset spec and open the pretraining and kNN splits (offline for local sources).

    With several processes, the main one lists the dataset's files and hands the listing to the others.
    """
    d = recipe.data
    overrides: dict[str, Any] = {key: value for key, value in (
        ("data_dir", d.data_dir), ("image_column", d.image_column), ("label_column", d.label_column),
        ("image_size", d.image_size), ("train_split", d.train_split), ("test_split", d.test_split))
        if value is not None}
    if d.splits:
        overrides["pretrain_splits"] = tuple(d.splits)
    spec = data_lib.get_spec(d.dataset, holdout=d.holdout or None, **overrides)
    spec = resolve_for_run(spec, knn=bool(recipe.train.knn_every), box_column=d.box_column, accelerator=accelerator)
    knn = bool(recipe.train.knn_every and spec.test_split and spec.label_column)
    if accelerator is not None and accelerator.num_processes > 1:
        splits = [*spec.pretrain_splits, *((spec.train_split, spec.test_split) if knn else ())]
        data_lib.share_listings(spec, splits, is_main=accelerator.is_main_process, broadcast=broadcast_object_list)
    pretrain = data_lib.load_images(spec, streaming=d.streaming)
    knn_train = knn_test = None
    if knn:
        knn_train = data_lib.load_images(spec, spec.train_split)
        knn_test = data_lib.load_images(spec, spec.test_split)
    num_rows = data_lib.num_ids(spec)
    gt = None
    if "gt_box" in spec.extra_columns and not d.streaming:
        gt = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(num_rows, 1)
        gt[torch.tensor(pretrain["id"])] = torch.tensor(pretrain["gt_box"], dtype=torch.float32)
    elif d.box_column:  # the user's boxes: [num_rows, K, 4], NaN where an image has fewer
        gt = data_lib.ground_truth_boxes(pretrain, num_rows, d.box_column, d.box_format)
    return RunData(spec, pretrain, num_rows, data_lib.dataset_fingerprint(spec), knn_train, knn_test, gt)


class ViewSource:
    """The training views of one epoch, from one data path: ``len()`` steps of ``(view1, view2)`` on the device.

    :func:`view_source` picks the path: :class:`ResidentViews` (``data.device_resident``), :class:`StreamViews`
    (``data.streaming``) or :class:`LoaderViews` (a map-style DataLoader).
    """

    def __init__(self, recipe: Recipe, collate: SeededCollate, accelerator: Accelerator) -> None:
        self.accelerator, self.collate, self.seed = accelerator, collate, recipe.train.seed
        self.batch_size = recipe.per_process_batch_size(accelerator.num_processes)  # data.batch_size is global
        self.steps = 0

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(view1, view2)`` on the training device for batches ``start .. steps - 1`` of ``epoch``."""
        for batch in self.batches(epoch, start):
            view1, view2 = self.collate.views(batch, self.accelerator.device)
            if len(view1):  # a batch of only undecodable images (each skipped with a warning) is empty
                yield view1, view2

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """The collated batches ``start .. steps - 1`` of ``epoch``, before :meth:`SeededCollate.views`."""
        raise NotImplementedError


class ResidentViews(ViewSource):
    """The pretraining images decoded once onto the device; batches cropped there (no DataLoader)."""

    def __init__(self, recipe: Recipe, run_data: RunData, collate: SeededCollate, accelerator: Accelerator) -> None:
        super().__init__(recipe, collate, accelerator)
        self.images = run_data.resident["pretrain"] = DeviceResidentImages(
            run_data.pretrain, accelerator.device, skipped=collate.collate.skipped)
        self.steps = self.images.num_batches(self.batch_size, world_size=accelerator.num_processes)

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        return self.images.iter_batches(
            self.batch_size, self.collate.collate.crops, epoch=epoch, seed=self.seed, start_batch=start,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            generator=torch.Generator().manual_seed(self.collate.batch_seed([epoch, start])),
        )


class StreamViews(ViewSource):
    """This process's shard of a streamed dataset, shuffled in a buffer, through a DataLoader."""

    def __init__(self, recipe: Recipe, run_data: RunData, collate: SeededCollate, accelerator: Accelerator) -> None:
        super().__init__(recipe, collate, accelerator)
        d, world = recipe.data, accelerator.num_processes
        shard = split_dataset_by_node(run_data.pretrain, rank=accelerator.process_index, world_size=world)
        self.stream = shard.shuffle(seed=self.seed, buffer_size=10 * self.batch_size)
        self.loader = _loader(self.stream, collate, batch_size=self.batch_size, num_workers=d.num_workers,
                              drop_last=True, seed=self.seed, persistent=True)
        # Processes get different rows (whole row groups): all stop after the same, safe number of steps.
        # Each DataLoader worker also drops its own last partial batch.
        self.steps = data_lib.min_rows_per_process(run_data.spec, world) // self.batch_size - max(0, d.num_workers - 1)

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        self.stream.set_epoch(epoch)
        return itertools.islice(self.loader, start, self.steps)


class LoaderViews(ViewSource):
    """A map-style dataset through accelerate's prepared DataLoader (seedable sampler, exact skip on resume)."""

    def __init__(self, recipe: Recipe, run_data: RunData, collate: SeededCollate, accelerator: Accelerator) -> None:
        super().__init__(recipe, collate, accelerator)
        loader = _loader(run_data.pretrain, collate, batch_size=self.batch_size, num_workers=recipe.data.num_workers,
                         shuffle=True, drop_last=True, seed=self.seed, persistent=True)
        self.loader = accelerator.prepare_data_loader(loader)
        self.steps = len(self.loader)

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        self.loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, start) if start else self.loader


def view_source(recipe: Recipe, run_data: RunData, collate: SeededCollate, accelerator: Accelerator) -> ViewSource:
    """The recipe's data path; refuses a global batch larger than the data."""
    d = recipe.data
    kind = ResidentViews if d.device_resident else StreamViews if d.streaming else LoaderViews
    source = kind(recipe, run_data, collate, accelerator)
    if len(source) < 1:
        raise RecipeError(f"data.batch_size ({d.batch_size}, the global batch) is larger than the "
                          f"dataset ({run_data.num_rows} rows): lower data.batch_size")
    return source


class NonFiniteWatch:
    """Notices a NaN/inf loss without a host sync per step: the first bad step is recorded on the device
    and read back only by :meth:`check`, which the loop calls before logging, checkpointing or a pass."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(3, device=device, dtype=torch.float64)  # [seen, epoch, step]
        self.value = torch.zeros((), device=device)

    def update(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.first[0] == 0)
        where = torch.tensor([1.0, epoch, step], dtype=torch.float64).to(self.first.device, non_blocking=True)
        self.first = torch.where(new, where, self.first)
        self.value = torch.where(new, loss.detach().float(), self.value)

    def check(self, last_checkpoint: Path | None) -> None:
        seen, epoch, step = (int(v) for v in self.first.tolist())
        if seen:
            raise NonFiniteLossError(
                f"loss is {float(self.value)} at epoch {epoch}, step {step}: training stopped. Last good "
                f"checkpoint: {last_checkpoint or 'none yet'} (lower optim.lr or set train.mixed_precision=no, "
                f"then --resume)")


def _floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's logs as floats, with one device synchronization."""
    if not logs:
        return {}
    return dict(zip(logs, torch.stack([v.float() for v in logs.values()]).tolist(), strict=True))


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("checkpoint_*"))
    return found[-1] if found else None


def _save_checkpoint(accelerator: Accelerator, out: Path, state: TrainState, keep: int) -> Path:
    """accelerate's save_state into a temporary folder, renamed into place: a kill never leaves half a checkpoint."""
    final = out / "checkpoints" / f"checkpoint_{state.global_step:09d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    state.sync_skipped(accelerator)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        # Not ProjectConfiguration(total_limit=...): accelerate rotates only the folders it names itself
        # (automatic_checkpoint_naming), which leaves no place for the rename above.
        for old in sorted((out / "checkpoints").glob("checkpoint_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _is_streaming(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def _loader(dataset, collate, *, batch_size: int, num_workers: int, shuffle: bool = False, drop_last: bool = False,
            seed: int = 0, persistent: bool = False) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0, collate_fn=collate, worker_init_fn=worker_init,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
    )


def _eval_source(accelerator: Accelerator, run_data: RunData, name: str) -> Any:
    """``run_data.<name>`` for a pass or the kNN monitor; in device-resident mode its images decoded once
    onto the device (for the pretraining rows, the training images themselves): no JPEG decoding."""
    dataset = getattr(run_data, name)
    if not run_data.resident:
        return dataset
    if name == "knn_train" and (run_data.spec.train_split,) == tuple(run_data.spec.pretrain_splits):
        name = "pretrain"
    if name not in run_data.resident:
        run_data.resident[name] = DeviceResidentImages(dataset, accelerator.device)
    return run_data.resident[name]


def _eval_loader(accelerator: Accelerator, dataset, collate, recipe: Recipe):
    """Un-augmented batches of this process's share of ``dataset`` (results are gathered by id)."""
    batch_size = recipe.loc_per_process_batch_size(accelerator.num_processes)  # crop.loc_batch_size is global
    if isinstance(dataset, DeviceResidentImages):
        return dataset.iter_eval(batch_size, collate.prepare, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes)
    if _is_streaming(dataset):
        shard = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
        return _loader(shard, collate, batch_size=batch_size, num_workers=recipe.data.num_workers)
    return accelerator.prepare_data_loader(
        _loader(dataset, collate, batch_size=batch_size, num_workers=recipe.data.num_workers))


def _knn(accelerator: Accelerator, backbone, run_data: RunData, recipe: Recipe) -> dict[str, float]:
    """The kNN monitor: features of the labeled train split vs the test split (k, T from the recipe)."""
    collate = EvalCollate(run_data.spec, purpose="classify")
    dtype = default_autocast_dtype(accelerator.device)
    feats = [extract_features(backbone, _eval_loader(accelerator, _eval_source(accelerator, run_data, name), collate,
                                                     recipe), accelerator=accelerator,
                              autocast_dtype=dtype, channels_last=recipe.model.channels_last)
             for name in ("knn_train", "knn_test")]
    (_, train_feats, train_labels), (_, test_feats, test_labels) = feats
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes=run_data.spec.num_classes,
                        k=recipe.train.knn_k, temperature=recipe.train.knn_temperature)


def _localization_pass(accelerator: Accelerator, encoder, run_data: RunData, state: TrainState, recipe: Recipe,
                       out: Path) -> dict[str, float]:
    """Localize every pretraining image, gather by id, write the shared table, save it and a picture."""
    collate = EvalCollate(run_data.spec, purpose="localize")
    collate.skipped = state.skipped  # the training views' ids: each bad image is reported once per run
    start = time.perf_counter()
    source = _eval_source(accelerator, run_data, "pretrain")
    ids, boxes = localize_boxes(encoder, _eval_loader(accelerator, source, collate, recipe),
                                k=recipe.crop.k, alignment=recipe.crop.heatmap_alignment,
                                autocast_dtype=default_autocast_dtype(accelerator.device),
                                channels_last=recipe.model.channels_last, accelerator=accelerator)
    seconds = time.perf_counter() - start
    state.boxes.update(ids, boxes)
    state.boxes.metadata.update(epoch=state.epoch, k=recipe.crop.k, heatmap_alignment=recipe.crop.heatmap_alignment)
    _check_same_on_every_process(accelerator, state.boxes.boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    stats = {"loc_seconds": seconds, "loc_images": len(ids), "box_area": float(area.mean())}
    if run_data.gt_boxes is not None:
        stats["box_iou"] = data_lib.mean_matched_iou(boxes, run_data.gt_boxes[ids])
    if accelerator.is_main_process:
        for suffix in (".parquet", ".safetensors"):
            state.boxes.save(out / "boxes" / f"epoch_{state.epoch:04d}{suffix}")
            state.boxes.save(out / f"boxes{suffix}")
        _draw_picture(encoder, run_data, collate, state, recipe, out / "pictures" / f"localization_epoch_{state.epoch:04d}.png")
    accelerator.wait_for_everyone()
    return stats


def _sync_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BN statistics): DDP leaves each process's own running
    statistics from the last step until the next forward, so passes would differ between ranks."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def _check_same_on_every_process(accelerator: Accelerator, boxes: torch.Tensor) -> None:
    """Every process must train on the same box table: compare two checksums across processes."""
    if accelerator.num_processes == 1:
        return
    b = boxes.double()
    weights = torch.arange(1, len(b) + 1, dtype=torch.float64)[:, None]
    digest = torch.stack([b.sum(), (b * weights).sum()])[None].to(accelerator.device)
    every = accelerator.gather(digest)
    if not torch.equal(every.min(dim=0).values, every.max(dim=0).values):
        raise RuntimeError("the box tables differ between processes after the localization pass")


@torch.no_grad()
def _draw_picture(encoder, run_data: RunData, collate: EvalCollate, state: TrainState, recipe: Recipe,
                  path: Path) -> None:
    """Heatmaps, boxes and crop pairs of a few fixed training images (the same ones at every pass)."""
    n = recipe.train.show_images
    if not n:
        return
    if _is_streaming(run_data.pretrain):
        rows = list(itertools.islice(run_data.pretrain, n))
    else:
        positions = torch.linspace(0, len(run_data.pretrain) - 1, min(n, len(run_data.pretrain))).long()
        rows = [run_data.pretrain[int(i)] for i in positions]
    images, ids, _ = collate(rows)
    was_training = encoder.training
    encoder.eval()
    raw = heatmaps(encoder, images.to(next(encoder.parameters()).device)).cpu()
    encoder.train(was_training)
    maps = picture_heatmaps(encoder, raw, tuple(images.shape[-2:]), recipe.crop.heatmap_alignment)
    gt = run_data.gt_boxes[ids] if run_data.gt_boxes is not None else None
    draw_localization_grid(to_uint8(images, run_data.spec.mean, run_data.spec.std), maps, state.boxes.lookup(ids),
                           path, alpha=recipe.crop.alpha, scale=recipe.crop.scale, ratio=recipe.crop.ratio,
                           gt_boxes=gt, ids=ids.tolist(), title=f"{recipe.name}: boxes after epoch {state.epoch}")


def _run_info(recipe: Recipe, run_data: RunData, backbone, num_processes: int) -> RunInfo:
    cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    spec = run_data.spec
    if spec.data_dir is not None:  # absolute, so `show` and `eval` find the data from any working folder
        spec = spec.replace(data_dir=str(Path(spec.data_dir).expanduser().resolve()))
    size = spec.image_size
    return RunInfo(
        model=recipe.model.name, model_args=recipe.model.args,
        input_size=(3, size, size), mean=spec.mean, std=spec.std,
        interpolation=cfg.get("interpolation", "bilinear"), crop_pct=1.0 if spec.eval_resize is None else 0.875,
        method=recipe.method.name, method_options=recipe.method.options,
        dataset=spec, num_rows=run_data.num_rows, fingerprint=run_data.fingerprint,
        epochs=recipe.train.epochs, batch_size=recipe.data.batch_size, num_processes=num_processes,
        grad_accum=recipe.train.grad_accum, per_process_batch_size=recipe.per_process_batch_size(num_processes),
        schedule=Schedule(crop=recipe.crop.mode, warmup_epochs=recipe.crop.warmup_epochs,
                          loc_epochs=tuple(recipe.localization_epochs()), k=recipe.crop.k, alpha=recipe.crop.alpha,
                          heatmap_alignment=recipe.crop.heatmap_alignment),
        license="apache-2.0", target=recipe.target,
    )


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
        self.watch.check(_latest_checkpoint(self.out))

    def checkpoint(self) -> Path:
        return _save_checkpoint(self.accelerator, self.out, self.state, self.recipe.train.keep_checkpoints)

    def interrupted(self, signum: int) -> TrainingInterrupted:
        return _interrupted(self.accelerator, self.out, self.state, self.recipe.train.keep_checkpoints, signum)


def _train(recipe: Recipe, output_dir: str | Path | None, resume: bool, stop: StopRequest) -> dict[str, Any]:
    t = recipe.train
    out = Path(output_dir or t.output_dir or Path("runs") / recipe.name)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(t.seed)
    if not resume and _latest_checkpoint(out) is not None:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --output-dir")
    run = _prepare_run(recipe, accelerator, out, stop)
    if resume:
        _resume(run)
    accelerator.init_trackers(recipe.name, config=_flat(recipe.to_dict()))
    run_start = time.perf_counter()
    accelerator.print(f"{recipe.name}: {recipe.method.name} on {run.run_data.spec.name} ({run.run_data.num_rows} "
                      f"images), {recipe.model.name}, {t.epochs} epochs x {len(run.batches)} steps, "
                      f"{batch_split(recipe.data.batch_size, accelerator.num_processes, t.grad_accum)}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device.type}; run folder {out}")

    stop.install()  # from here on, Ctrl-C/SIGTERM stop after the current step with a checkpoint
    while run.state.epoch < t.epochs:
        if signum := stop.agreed(accelerator):
            raise run.interrupted(signum)
        record = train_one_epoch(run)
        if record is None:  # train.max_steps reached
            return {"stopped_at_step": run.state.global_step}
        end_of_epoch(run, record)
    return _finish(run, time.perf_counter() - run_start)


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
    on_gpu = recipe.data.batched_views and accelerator.device.type == "cuda"  # crop on the host, augment on the GPU
    collate = SeededCollate(
        TwoViewCollate.from_spec(spec, table, scale=c.scale, ratio=c.ratio, alpha=c.alpha, blur=c.blur or spec.blur,
                                 mode=recipe.crop_mode(0), batched=recipe.data.batched_views,
                                 raw=on_gpu, device_decode=on_gpu),
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
    optimizer = build_optimizer(method.param_groups(base_lr, recipe.optim.weight_decay), recipe.optim, base_lr)
    method, optimizer = accelerator.prepare(method, optimizer)
    if accelerator.is_main_process:  # only now: a run that fails before training leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    accelerator.register_for_checkpointing(state)
    return Run(recipe, accelerator, out, run_data, state, collate, batches, method, optimizer, base_lr, stop,
               NonFiniteWatch(accelerator.device))


def _resume(run: Run) -> None:
    """Load the latest checkpoint (weights, optimizer, RNGs, loop position, boxes), if there is one."""
    ckpt = _latest_checkpoint(run.out)
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
    lr = set_epoch_lr(run.optimizer, recipe.optim, epoch, t.epochs, run.base_lr)
    run.method.train()
    bar = tqdm(run.batches.epoch(epoch, state.step_in_epoch), total=len(run.batches), initial=state.step_in_epoch,
               disable=not accelerator.is_main_process, desc=f"epoch {epoch + 1}/{t.epochs} [{mode}]", leave=False)
    tic = time.perf_counter()
    for view1, view2 in bar:
        with accelerator.accumulate(run.method):
            loss, run.logs = run.method(view1, view2)
            run.watch.update(loss, epoch + 1, state.step_in_epoch + 1)
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                online.after_optimizer_step((state.global_step + 1) / run.total_steps)
        state.step_in_epoch += 1
        state.global_step += 1
        run.images_seen += view1.shape[0] * accelerator.num_processes
        if state.global_step % t.log_every == 0 or state.step_in_epoch == len(run.batches):
            _log_step(run, bar, lr, time.perf_counter() - tic)
        _step_checkpoint_or_stop(run)
        if _max_steps_reached(run):
            return None
    bar.close()
    run.check_finite()
    epoch_seconds = time.perf_counter() - tic
    run.train_seconds += epoch_seconds
    numbers = _floats(run.logs)
    return {"epoch": epoch + 1, "loss": numbers.get("loss"), "pos_cosine": numbers.get("pos_cosine"), "lr": lr,
            "crop": mode, "epoch_seconds": epoch_seconds,
            "images_per_s": (state.step_in_epoch * recipe.data.batch_size / t.grad_accum) / epoch_seconds}


def _log_step(run: Run, bar: tqdm, lr: float, epoch_seconds: float) -> None:
    """The latest step's numbers and the training rate, to the progress bar and the trackers (one host sync)."""
    run.check_finite()
    numbers = _floats(run.logs)
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
    _sync_buffers(accelerator, online)
    if state.epoch in recipe.localization_epochs():
        record |= _localization_pass(accelerator, online.localization_encoder, run.run_data, state, recipe, run.out)
        accelerator.print(f"epoch {state.epoch}: localized {record['loc_images']} images in "
                          f"{record['loc_seconds']:.1f}s, mean box area {record['box_area']:.2f}"
                          + (f", IoU with ground truth {record['box_iou']:.3f}" if "box_iou" in record else ""))
    if run.run_data.knn_test is not None and (state.epoch % t.knn_every == 0 or state.epoch == t.epochs):
        knn = _knn(accelerator, online.localization_encoder, run.run_data, recipe)
        record |= {f"knn_{k}": v for k, v in knn.items()}
        accelerator.print(f"epoch {state.epoch}: kNN top-1 {record['knn_top1']:.2f}%")
    state.history.append(record)
    accelerator.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, int | float)}, step=state.global_step)
    if state.epoch % t.checkpoint_every == 0 or state.epoch == t.epochs:
        run.checkpoint()


def _finish(run: Run, wall_seconds: float) -> dict[str, Any]:
    """The final metrics; the main process writes the backbone, run.json, metrics.json and the boxes."""
    recipe, accelerator, state, out, run_data = run.recipe, run.accelerator, run.state, run.out, run.run_data
    metrics = _final_metrics(recipe, run_data, state, run.images_seen / max(run.train_seconds, 1e-9),
                             wall_seconds, len(state.sync_skipped(accelerator)))
    if accelerator.is_main_process:
        backbone = run.online.localization_encoder
        weights = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
        save_file(weights, str(out / "backbone.safetensors"), metadata={"format": "pt"})
        _run_info(recipe, run_data, backbone, accelerator.num_processes).save(out)
        (out / "metrics.json").write_text(json.dumps(metrics | {"history": state.history}, indent=2))
        state.boxes.save(out / "boxes.parquet")
        state.boxes.save(out / "boxes.safetensors")
        _write_skipped(out, run_data, state.skipped_ids)
    accelerator.end_training()
    accelerator.print(_summary(recipe, metrics, out))
    return metrics


def _write_skipped(out: Path, run_data: RunData, ids: list[int]) -> None:
    """``skipped.json``: the undecodable pretraining images (by sample id), written only when there are some."""
    if ids:
        (out / "skipped.json").write_text(json.dumps({
            "count": len(ids), "ids": ids, "dataset": run_data.spec.hub_id or run_data.spec.name,
            "splits": list(run_data.spec.pretrain_splits),
            "note": "sample ids are row positions in the unshuffled pretraining data (row-index-v1); the "
                    "training log's warnings name each id's file; these images were left out of training",
        }, indent=2))


def _final_metrics(recipe: Recipe, run_data: RunData, state: TrainState, images_per_s: float, wall: float,
                   skipped: int) -> dict[str, Any]:
    c = recipe.crop
    metrics: dict[str, Any] = {"epochs": recipe.train.epochs, "train_images_per_s": images_per_s,
                               "wall_seconds": wall, "final_loss": state.history[-1]["loss"], "skipped_images": skipped}
    for record in reversed(state.history):  # the latest value of each monitored number
        for key in ("knn_top1", "knn_top5", "box_iou", "box_area"):
            if key in record:
                metrics.setdefault(key, record[key])
    if "knn_top1" in metrics:
        metrics |= {"knn_k": recipe.train.knn_k, "knn_temperature": recipe.train.knn_temperature,
                    "eval_split": run_data.spec.test_split, "knn_chance": 100 / run_data.spec.num_classes}
    if run_data.gt_boxes is not None:
        # IoU of whole-image boxes with the objects = the objects' mean area: the no-localization baseline.
        gt = run_data.gt_boxes
        metrics["box_iou_whole_image"] = data_lib.mean_matched_iou(torch.tensor([FULL_BOX]).expand(len(gt), 4), gt)
        rows, objects = data_lib.single_objects(gt)  # the miss rate needs one object per image
        sizes = torch.tensor([[run_data.spec.image_size] * 2]).expand(len(rows), 2)
        if len(rows):
            miss = object_miss_rate(objects, state.boxes.boxes[rows], sizes, scale=c.scale, ratio=c.ratio,
                                    alpha=c.alpha)
            metrics["miss_rate_rcrop"] = miss["rcrop"]
            if c.mode == "ccrop":  # an R-Crop run has no learned boxes to judge
                metrics["miss_rate_ccrop"] = miss["ccrop"]
    return metrics


def _summary(recipe: Recipe, metrics: dict[str, Any], out: Path) -> str:
    lines = [f"\n{recipe.name} finished in {metrics['wall_seconds'] / 60:.1f} min "
             f"({metrics['train_images_per_s']:.0f} images/s in training)"]
    if "knn_top1" in metrics:
        lines.append(f"  kNN top-1 (k={recipe.train.knn_k}, T={recipe.train.knn_temperature}): {metrics['knn_top1']:.2f}% "
                     f"(chance {metrics['knn_chance']:.3g}%): test images classified by their nearest training "
                     "images in the frozen backbone's features, no labels used in training")
    if "box_iou" in metrics:
        lines.append(f"  learned boxes vs ground truth: mean IoU {metrics['box_iou']:.3f} (whole-image boxes: "
                     f"{metrics['box_iou_whole_image']:.3f}), mean box area {metrics['box_area']:.2f}")
    if "miss_rate_ccrop" in metrics:
        lines.append(f"  view pairs where a view misses the object (< 20% of it), the false positives ContrastiveCrop "
                     f"avoids: RandomResizedCrop {metrics['miss_rate_rcrop']:.3f}, ContrastiveCrop {metrics['miss_rate_ccrop']:.3f}")
    if metrics["skipped_images"]:
        lines.append(f"  skipped {metrics['skipped_images']} undecodable images (distinct ids, listed in "
                     f"{out / 'skipped.json'})")
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
    """``hub-ccrop train``; user mistakes raise (the caller's :func:`~hub_ccrop.errors.run_command` reports them)."""
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        train(recipe, args.output_dir, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_ccrop.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_command(lambda: run_from_args(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

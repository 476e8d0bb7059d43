"""What a run reads: the dataset spec and splits (:func:`build_data`), the seeded collate stage, and the
view sources (device-resident, streamed, map-style DataLoader) that yield each step's :class:`Views`."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from hub_ccrop import data as data_lib
from hub_ccrop.data import DatasetSpec
from hub_ccrop.data.resolve import resolve_for_run
from hub_ccrop.data.workers import worker_init  # workers leave stop signals to the main process
from hub_ccrop.recipe import Recipe, RecipeError
from hub_ccrop.views import (
    DeviceResidentImages,
    EncodedBatch,
    RawBatch,
    ViewCollate,
    Views,
)


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


class SeededCollate:
    """The collate stage with each batch's augmentation drawn from a seed of (run seed, epoch, sample ids).

    The views of a batch are then the same after ``--resume`` and for any number of DataLoader workers;
    the epoch and the crop mode live in shared memory, so persistent workers follow them.
    """

    def __init__(self, collate: ViewCollate, seed: int) -> None:
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

    def views(self, batch: Any, device: torch.device) -> Views:
        """The :class:`Views` of a batch on ``device`` (a :class:`RawBatch` is augmented there)."""
        if isinstance(batch, RawBatch | EncodedBatch):
            seed = self.batch_seed(batch.ids)  # host ids (both batch types keep them there): no device sync
            g = torch.Generator(device=device).manual_seed(seed)
            if isinstance(batch, EncodedBatch):
                batch = self.collate.decode_on(batch, device)
            return Views(self.collate.augment(batch.to(device, non_blocking=True), g), batch.ids, batch.labels)
        return batch.to(device, non_blocking=True)


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
    """The training views of one epoch, from one data path: ``len()`` steps of :class:`Views` on the device.

    :func:`view_source` picks the path: :class:`ResidentViews` (``data.device_resident``), :class:`StreamViews`
    (``data.streaming``) or :class:`LoaderViews` (a map-style DataLoader).
    """

    def __init__(self, recipe: Recipe, collate: SeededCollate, accelerator: Accelerator) -> None:
        self.accelerator, self.collate, self.seed = accelerator, collate, recipe.train.seed
        self.batch_size = recipe.per_process_batch_size(accelerator.num_processes)  # data.batch_size is global
        self.steps = 0

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Views]:
        """:class:`Views` on the training device for batches ``start .. steps - 1`` of ``epoch``."""
        for batch in self.batches(epoch, start):
            views = self.collate.views(batch, self.accelerator.device)
            if views.batch_size:  # a batch of only undecodable images (each skipped with a warning) is empty
                yield views

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
        self.loader = make_loader(self.stream, collate, batch_size=self.batch_size, num_workers=d.num_workers,
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
        loader = make_loader(run_data.pretrain, collate, batch_size=self.batch_size, num_workers=recipe.data.num_workers,
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


def is_streaming(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset)


def make_loader(dataset, collate, *, batch_size: int, num_workers: int, shuffle: bool = False, drop_last: bool = False,
            seed: int = 0, persistent: bool = False) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0, collate_fn=collate, worker_init_fn=worker_init,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
    )


def eval_source(accelerator: Accelerator, run_data: RunData, name: str) -> Any:
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


def eval_loader(accelerator: Accelerator, dataset, collate, recipe: Recipe):
    """Un-augmented batches of this process's share of ``dataset`` (results are gathered by id)."""
    batch_size = recipe.loc_per_process_batch_size(accelerator.num_processes)  # crop.loc_batch_size is global
    if isinstance(dataset, DeviceResidentImages):
        return dataset.iter_eval(batch_size, collate.prepare, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes)
    if is_streaming(dataset):
        shard = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
        return make_loader(shard, collate, batch_size=batch_size, num_workers=recipe.data.num_workers)
    return accelerator.prepare_data_loader(
        make_loader(dataset, collate, batch_size=batch_size, num_workers=recipe.data.num_workers))

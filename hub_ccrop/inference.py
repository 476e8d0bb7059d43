"""The one inference loop: a model in eval mode, without gradients, over ``(images, ids[, labels])``
batches. The localization passes (:func:`hub_ccrop.localize.localize_boxes`) and the features of kNN and the
probes (:func:`hub_ccrop.evaluate.extract_features`) both run through :func:`run_batches`; detection's
evaluation (lists of images of different sizes in, boxes out) and the monitors' pictures use its
:func:`evaluating` and :func:`model_device`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hub_ccrop.distributed import is_main_process

__all__ = ["autocast", "evaluating", "model_device", "run_batches"]


def model_device(model: nn.Module, accelerator: Any = None) -> torch.device:
    """The accelerator's device, else the device of the model's first parameter (CPU without parameters)."""
    if accelerator is not None:
        return accelerator.device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision at ``dtype`` on ``device``; a no-op for ``None``."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients inside the block; its mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def run_batches(
    model: nn.Module,
    loader: Iterable,
    outputs: Callable[[Tensor], Sequence[Tensor]],
    *,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    prepare: Callable[[Tensor], Tensor] | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "inference",
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """``outputs(images)`` for every batch, with ``model`` in eval mode (its mode is restored afterwards).

    Images go to ``device`` (default: :func:`model_device`), through ``prepare`` (another network's input),
    then channels-last if asked. Returns this process's ``(ids, labels, columns)`` on the device, in loader
    order: ``labels`` is None for batches without them, ``columns`` is empty when the loader gave no batch
    (a process with an empty shard). Gathering over processes is the caller's
    (:func:`hub_ccrop.distributed.gather_by_id`), since every process must take part.
    """
    device = torch.device(device) if device is not None else model_device(model, accelerator)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ids_seen: list[Tensor] = []
    labels_seen: list[Tensor] = []
    rows: list[Sequence[Tensor]] = []
    with evaluating(model):
        for images, ids, *rest in tqdm(loader, desc=desc, disable=not (progress and is_main_process(accelerator)),
                                       leave=False):
            images = images.to(device, non_blocking=True)
            if prepare is not None:
                images = prepare(images)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            rows.append(outputs(images))
            ids_seen.append(torch.as_tensor(ids, dtype=torch.int64).to(device))
            if rest:
                labels_seen.append(torch.as_tensor(rest[0], dtype=torch.int64).to(device))
    ids = torch.cat(ids_seen) if ids_seen else torch.empty(0, dtype=torch.int64, device=device)
    labels = torch.cat(labels_seen) if labels_seen else None
    return ids, labels, [torch.cat(column) for column in zip(*rows, strict=True)]

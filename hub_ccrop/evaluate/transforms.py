"""Classification inputs: the train/test transforms of the evaluation commands and labeled rows of
``hub_ccrop.data.load_images`` as ``(image, id, label)`` items."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from hub_ccrop.data import decode_image, decode_to_tensor
from hub_ccrop.views import eval_image


def _uint8_tensor(image: Image.Image | Tensor) -> Tensor:
    from torchvision.transforms import functional as TF

    return image if isinstance(image, Tensor) else TF.pil_to_tensor(image)


def classification_transform(data_config: dict[str, Any], *, train: bool) -> Callable[[Image.Image], Tensor]:
    """Train: RandomResizedCrop + flip; test: :func:`hub_ccrop.views.eval_image` (the kNN monitor's and the
    localization passes' transform): the whole image at ``input_size`` when ``crop_pct`` is 1, else
    resize (``size / crop_pct``) + centre crop. Both normalize."""
    # Not timm.data.create_transform: its eval path works on PIL images (crop_pct=1 centre-crops a non-square
    # image instead of resizing the whole of it, and resamples up to 1 level apart), so the CLI would no
    # longer see the kNN monitor's pixels; its train path draws crops from Python's `random` and adds colour
    # jitter unless told not to.
    from torchvision import transforms as T

    size = tuple(data_config["input_size"][-2:])
    normalize = [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    crop_pct = data_config.get("crop_pct", 1.0)
    resize = int(math.floor(min(size) / crop_pct)) if crop_pct < 1 else None
    return T.Compose([_uint8_tensor, functools.partial(eval_image, size=size, resize=resize),
                      T.ConvertImageDtype(torch.float32), T.Normalize(data_config["mean"], data_config["std"])])


class _LabeledRows(Dataset):
    """``data.load_images`` rows as ``(transform(image), id, label)`` items (decoded with ``decode_image``)."""

    def __init__(self, rows: Any, transform: Callable[[Any], Tensor], *, max_side: int | None = None,
                 as_tensor: bool = False) -> None:
        self.rows, self.transform, self.max_side = rows, transform, max_side
        self.decode = decode_to_tensor if as_tensor else decode_image  # tensors: decoded as the kNN monitor decodes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        row = self.rows[index]
        image = self.decode(row["image"], row["id"], max_side=self.max_side)
        return self.transform(image), int(row["id"]), int(row["label"])


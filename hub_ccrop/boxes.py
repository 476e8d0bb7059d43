"""BoxTable: one ContrastiveCrop box per training sample, keyed by stable sample id.

The boxes live in a shared-memory tensor, so DataLoader worker processes (persistent ones too)
see a localization pass's update without being restarted. Tables are saved as safetensors and as
parquet (``id, x0, y0, x1, y1``) with metadata that ties them to a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["ID_SCHEME", "BoxTable", "BoxTableMismatch", "box_centres", "image_key", "imagefolder_order", "official_id_map",
           "pairwise_box_iou"]

ID_SCHEME = "row-index-v1"
METADATA_KEYS = ("dataset", "split", "num_rows", "id_scheme", "fingerprint", "k", "epoch", "backbone")
_PARQUET_META_KEY = b"hub_ccrop"


class BoxTableMismatch(ValueError):
    """A box table does not belong to the dataset it is used with."""


class BoxTable:
    """Sample id -> box ``(x0, y0, x1, y1)`` in [0, 1]; ids are ``0 .. num_rows - 1``.

    New tables hold the whole image for every id. ``metadata`` records what the table belongs to
    (``dataset, split, num_rows, id_scheme, fingerprint, k, epoch, backbone``).
    """

    def __init__(self, num_rows: int, metadata: Mapping[str, Any] | None = None) -> None:
        if num_rows <= 0:
            raise ValueError(f"a box table needs at least one row, got num_rows={num_rows}")
        self.boxes = torch.empty(num_rows, 4, dtype=torch.float32).share_memory_()
        self.metadata: dict[str, Any] = {"num_rows": num_rows, "id_scheme": ID_SCHEME}
        self.metadata.update(metadata or {})
        self.metadata["num_rows"] = num_rows
        self.reset()

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __repr__(self) -> str:
        meta = ", ".join(f"{k}={self.metadata[k]!r}" for k in METADATA_KEYS if k in self.metadata)
        return f"BoxTable({meta})"

    def reset(self) -> None:
        """Set every box to the whole image."""
        self.boxes.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]).expand_as(self.boxes))

    def _check_ids(self, ids: Tensor) -> Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0].item()
            raise KeyError(
                f"sample id {bad} is outside this box table (ids 0..{len(self) - 1}, "
                f"dataset={self.metadata.get('dataset')!r}): the table does not match the data"
            )
        return ids

    def lookup(self, ids: Tensor | Sequence[int]) -> Tensor:
        """Boxes ``[B, 4]`` (float32) for sample ids ``[B]``."""
        return self.boxes[self._check_ids(ids)]

    def update(self, ids: Tensor | Sequence[int], boxes: Tensor) -> None:
        """Write ``boxes [B, 4]`` for ``ids [B]`` (visible to every process sharing the table)."""
        ids = self._check_ids(ids)
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).cpu()
        if boxes.shape[0] != ids.shape[0]:
            raise ValueError(f"update got {ids.shape[0]} ids but {boxes.shape[0]} boxes")
        if not torch.isfinite(boxes).all():
            raise ValueError("update got non-finite boxes")
        if (boxes < 0).any() or (boxes > 1).any() or (boxes[:, 2:] < boxes[:, :2]).any():
            raise ValueError("boxes must be (x0, y0, x1, y1) in [0, 1] with x0 <= x1 and y0 <= y1")
        self.boxes[ids] = boxes

    def load_state(self, boxes: Tensor, metadata: Mapping[str, Any] | None = None) -> None:
        """Replace all boxes in place (workers keep seeing the same shared storage)."""
        self.update(torch.arange(len(self)), boxes)
        if metadata:
            self.metadata.update({k: v for k, v in metadata.items() if k != "num_rows"})

    # -- compatibility ---------------------------------------------------------------------------

    def check_compatible(
        self,
        num_rows: int | None = None,
        id_scheme: str | None = ID_SCHEME,
        fingerprint: str | None = None,
        source: str = "box table",
    ) -> None:
        """Raise :class:`BoxTableMismatch` unless the table fits a dataset with these properties."""
        problems = []
        if num_rows is not None and len(self) != num_rows:
            problems.append(f"it has {len(self)} rows but the dataset has {num_rows}")
        own_scheme = self.metadata.get("id_scheme")
        if id_scheme is not None and own_scheme is not None and own_scheme != id_scheme:
            problems.append(f"its id scheme is {own_scheme!r}, expected {id_scheme!r}")
        own_fp = self.metadata.get("fingerprint")
        if fingerprint is not None and own_fp is not None and own_fp != fingerprint:
            problems.append(f"its dataset fingerprint is {own_fp!r}, the dataset's is {fingerprint!r}")
        if problems:
            raise BoxTableMismatch(
                f"{source} (dataset={self.metadata.get('dataset')!r}, split={self.metadata.get('split')!r}) "
                f"does not match the dataset: " + "; ".join(problems)
            )

    # -- files -----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.safetensors`` or ``.parquet`` (chosen by suffix), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        meta = json.dumps(self.metadata, sort_keys=True, default=str)
        if path.suffix == ".safetensors":
            save_file({"boxes": self.boxes.clone()}, str(tmp), metadata={"hub_ccrop": meta})
        elif path.suffix == ".parquet":
            b = self.boxes.numpy()
            table = pa.table(
                {
                    "id": pa.array(range(len(self)), pa.int64()),
                    "x0": b[:, 0], "y0": b[:, 1], "x1": b[:, 2], "y1": b[:, 3],
                }
            ).replace_schema_metadata({_PARQUET_META_KEY: meta.encode()})
            pq.write_table(table, tmp)
        else:
            raise ValueError(f"unknown box table format {path.suffix!r} for {path}: use .safetensors or .parquet")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BoxTable:
        """Read a table written by :meth:`save` (format chosen by suffix)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no box table at {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("hub_ccrop", "{}"))
            boxes = load_file(str(path))["boxes"]
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {}).get(_PARQUET_META_KEY, b"{}"))
            missing = {"id", "x0", "y0", "x1", "y1"} - set(table.column_names)
            if missing:
                raise ValueError(f"{path} is not a box table: missing columns {sorted(missing)}")
            ids = torch.tensor(table.column("id").to_numpy(), dtype=torch.int64)
            if not torch.equal(ids, torch.arange(len(ids))):
                raise ValueError(f"{path}: ids must be 0..{len(ids) - 1} in order (scheme {ID_SCHEME})")
            cols = [torch.tensor(table.column(c).to_numpy(), dtype=torch.float32) for c in ("x0", "y0", "x1", "y1")]
            boxes = torch.stack(cols, dim=1)
        else:
            raise ValueError(f"unknown box table format {path.suffix!r} for {path}")
        if "num_rows" in meta and int(meta["num_rows"]) != boxes.shape[0]:
            raise ValueError(f"{path} is damaged: metadata says {meta['num_rows']} rows, found {boxes.shape[0]}")
        table_ = cls(boxes.shape[0], meta)
        table_.update(torch.arange(boxes.shape[0]), boxes)
        return table_

    @classmethod
    def from_official(
        cls, boxes: Tensor, image_size: tuple[int, int], metadata: Mapping[str, Any] | None = None, *,
        official_to_id: Tensor | Sequence[int] | None = None,
    ) -> BoxTable:
        """Convert the official ContrastiveCrop checkpoints' ``boxes`` tensor.

        The official code stores ``(y0, x0, y1, x1)`` with the *last* active pixel divided by the
        size (``x1 = last / W``); this project's boxes are continuous, so ``x1 = (last + 1) / W``.
        ``image_size`` is the ``(H, W)`` of the images the official pass ran on (e.g. 32x32).

        Official rows follow the official dataset's index order (torchvision's CIFAR files, ``ImageFolder``'s
        sorted classes and files); Hub copies order their rows differently. ``official_to_id[i]`` is the
        sample id of official row ``i`` (:func:`official_id_map`); without it row ``i`` is id ``i``.
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"official boxes must be [N, 4], got {tuple(boxes.shape)}")
        height, width = image_size
        y0, x0, y1, x1 = boxes.unbind(1)
        converted = torch.stack([x0, y0, x1 + 1 / width, y1 + 1 / height], dim=1).clamp(0, 1)
        ids = torch.arange(boxes.shape[0]) if official_to_id is None else torch.as_tensor(official_to_id)
        if ids.shape != (boxes.shape[0],) or len(torch.unique(ids)) != len(ids):
            raise ValueError(f"official_to_id must give one distinct sample id per official row ({boxes.shape[0]}), "
                             f"got {tuple(ids.shape)} ids: build it with official_id_map")
        table = cls(boxes.shape[0], metadata)
        table.update(ids, converted)
        return table


def image_key(image: Any) -> str:
    """A content key of an image (a PIL image or an array): SHA-1 of its RGB pixels and size. The same image
    gets the same key in any container, file order or encoding that decodes to the same pixels (PNG)."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    return hashlib.sha1(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def imagefolder_order(paths: Sequence[str | os.PathLike]) -> list[int]:
    """Positions of ``paths`` (``CLASS/.../FILE`` relative to the dataset root) in the index order of
    torchvision's ``ImageFolder``, the order of the official box tables on ImageNet and Tiny ImageNet:
    classes sorted by name, then each class's files by sorted folder walk and sorted file names.
    ``[paths[i] for i in imagefolder_order(paths)]`` lists them in official row order."""
    def key(i: int) -> tuple[str, str, str]:
        parts = PurePath(paths[i]).parts  # sorted(os.walk(...)) orders folders by their path string
        return parts[0], "/".join(parts[:-1]), parts[-1]

    return sorted(range(len(paths)), key=key)


def official_id_map(official_keys: Sequence[Hashable], project_keys: Sequence[Hashable]) -> Tensor:
    """``ids[i]``: the sample id (position in ``project_keys``) of the official row with ``official_keys[i]``.

    Keys are file names (``ImageFolder`` trees, in :func:`imagefolder_order`) or :func:`image_key` hashes
    (CIFAR: the same pixels in another row order). Duplicate keys (identical images) pair up in order of
    appearance; their boxes are the same. Raise ``KeyError`` naming the first official key with no match.
    """
    positions: dict[Hashable, list[int]] = {}
    for i, key in enumerate(project_keys):
        positions.setdefault(key, []).append(i)
    for matches in positions.values():
        matches.reverse()  # pop() then yields them in order of appearance
    ids = []
    for row, key in enumerate(official_keys):
        matches = positions.get(key)
        if not matches:
            raise KeyError(f"official row {row} ({key!r}) is not in the project's data: the official boxes belong "
                           "to another dataset or split")
        ids.append(matches.pop())
    return torch.tensor(ids, dtype=torch.int64)


def box_centres(boxes: Tensor) -> Tensor:
    """Centres ``[..., 2]`` (x, y) of ``[..., 4]`` boxes."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def pairwise_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of two ``[N, 4]`` box tensors ``(x0, y0, x1, y1)``."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp_min(1e-12)

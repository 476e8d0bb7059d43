"""Dataset specs, Hub/local/streaming loading with stable sample ids, and image decoding.

Every source goes through one mechanism: a split is a sorted list of files (Hub-style parquet files
or an ``imagefolder`` tree, local or on the Hub), and every loaded row is
``{"id": int64, "image": {"bytes", "path"} | PIL, "label": int64}`` (label ``-1`` when there is none).

Sample ids (scheme ``"row-index-v1"``, the key of the box table): a row's id is its position in the
canonical, unshuffled order of the *requested* splits: each requested split's rows (files sorted,
rows in file order; after the spec's class filter when it has one) concatenated in the order the
splits are named. Slices (``"train[:45000]"``, ``"train[-5000:]"``) keep the ids of the unsliced
split, so a hold-out keeps its rows' ids. Map-style datasets get ``id`` from the row index before
any shuffle; streaming datasets compute ``file offset + row in file`` from the parquet metadata, so
the id survives DataLoader workers, ``split_dataset_by_node`` and resumption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from hub_ccrop.boxes import ID_SCHEME

__all__ = [
    "ID_SCHEME",
    "IMAGENET200_CLASSES",
    "BadImageError",
    "BadImageWarning",
    "DatasetSpec",
    "clear_cache",
    "dataset_fingerprint",
    "decode_image",
    "decode_on_device",
    "decode_to_tensor",
    "image_size",
    "get_spec",
    "list_specs",
    "load_images",
    "min_rows_per_process",
    "num_ids",
    "num_rows",
    "register_spec",
    "share_listings",
]

# The normalization of the paper's official code for CIFAR-10 (also the CIFAR-stem models' pretrained_cfg).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's IN-200 subset: the official ContrastiveCrop class list (datasets/imagenet200.class,
# 200 WordNet ids) as indices into the standard ImageNet-1K label order (sorted WordNet ids).
IMAGENET200_CLASSES: tuple[int, ...] = (
    1, 2, 7, 9, 11, 12, 14, 17, 18, 20, 21, 28, 34, 37, 51, 53, 55, 67, 68, 82, 86, 91, 95, 97, 101,
    102, 103, 115, 117, 118, 122, 124, 128, 132, 133, 136, 137, 138, 162, 164, 169, 170, 171, 174, 177,
    183, 194, 196, 198, 210, 215, 230, 252, 253, 265, 268, 270, 272, 275, 293, 298, 300, 306, 307, 326,
    328, 338, 349, 350, 357, 358, 360, 362, 365, 367, 381, 394, 396, 397, 410, 415, 417, 428, 431, 440,
    443, 451, 452, 454, 455, 457, 466, 467, 469, 470, 475, 477, 480, 487, 488, 489, 494, 497, 500, 507,
    509, 516, 517, 518, 519, 520, 524, 526, 532, 533, 538, 553, 564, 566, 568, 584, 585, 588, 592, 599,
    600, 605, 607, 611, 622, 628, 629, 636, 638, 641, 642, 648, 650, 653, 662, 663, 677, 678, 681, 690,
    694, 716, 720, 727, 729, 740, 741, 742, 766, 772, 774, 781, 783, 787, 801, 804, 805, 818, 819, 824,
    829, 831, 832, 841, 842, 843, 862, 873, 877, 878, 885, 892, 894, 897, 898, 901, 908, 910, 913, 923,
    928, 929, 940, 941, 945, 947, 948, 950, 955, 958, 963, 975, 986, 988, 999,
)  # fmt: skip

# Shards of a streamed imagefolder tree (parquet sources are sharded by row group, see _parquet_shards).
STREAMING_SHARDS = 64


# -- specs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how it is used (columns, splits, sizes, normalization).

    ``hub_id`` (+ ``config``, ``revision``) names a Hub dataset; ``data_dir`` a local copy (a folder of
    Hub-style parquet files, or an ``imagefolder`` tree); ``data_files`` explicit files per split
    (relative to ``data_dir`` when set). ``generator`` is ``"module:function"`` returning a local
    folder (the built-in synthetic set). Split names accept slices: ``"train[:-5000]"``.
    ``class_subset`` keeps only those labels (remapped to ``0..len-1``), e.g. IN-200.
    """

    name: str
    hub_id: str | None = None
    config: str | None = None
    revision: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    pretrain_splits: tuple[str, ...] = ("train",)
    train_split: str = "train"
    test_split: str | None = "test"
    image_size: int = 224
    eval_resize: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int | None = None
    blur: bool = False
    class_subset: tuple[int, ...] | None = None
    data_dir: str | None = None
    data_files: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    generator: str | None = None
    extra_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.pretrain_splits, str):
            fix("pretrain_splits", (self.pretrain_splits,))
        fix("pretrain_splits", tuple(self.pretrain_splits))
        fix("mean", tuple(float(v) for v in self.mean))
        fix("std", tuple(float(v) for v in self.std))
        fix("extra_columns", tuple(self.extra_columns))
        if self.eval_resize is not None:
            fix("eval_resize", tuple(int(v) for v in self.eval_resize))
        if self.class_subset is not None:
            fix("class_subset", tuple(int(c) for c in self.class_subset))
        if self.data_dir is not None:
            fix("data_dir", os.fspath(self.data_dir))
        if isinstance(self.data_files, Mapping):
            files = self.data_files
            fix("data_files", tuple((k, (v,) if isinstance(v, str) else tuple(v)) for k, v in files.items()))
        if self.hub_id is None and self.data_dir is None and self.data_files is None and self.generator is None:
            raise ValueError(f"dataset spec {self.name!r} needs a hub_id, data_dir, data_files or generator")

    def replace(self, **changes: Any) -> DatasetSpec:
        """A copy with some fields changed (e.g. ``data_dir`` of a local copy)."""
        return dataclasses.replace(self, **changes)

    def with_holdout(self, rows: int) -> DatasetSpec:
        """Hold the last ``rows`` rows of the train split out as the labeled test split (ids kept).

        Pretraining and the labeled train split become ``"train[:-rows]"``; the test split
        ``"train[-rows:]"`` (for copies that have only a train split, like ``../shared/data/cifar10``).
        """
        base, _ = parse_split(self.train_split)
        return self.replace(
            pretrain_splits=(f"{base}[:-{rows}]",), train_split=f"{base}[:-{rows}]", test_split=f"{base}[-{rows}:]"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (for run.json / box table metadata)."""
        return dataclasses.asdict(self)


_SPECS: dict[str, DatasetSpec] = {}


def register_spec(spec: DatasetSpec) -> DatasetSpec:
    """Add (or replace) a named spec in the registry."""
    _SPECS[spec.name] = spec
    return spec


def list_specs() -> list[str]:
    return sorted(_SPECS)


def get_spec(name: str, *, holdout: int | None = None, **overrides: Any) -> DatasetSpec:
    """A registered spec by name, or a spec for any Hub id / local folder with explicit options.

    ``get_spec("cifar10", data_dir="../shared/data/cifar10", holdout=5000)`` reads a local copy;
    ``get_spec("org/dataset", image_column="img", image_size=64, ...)`` any Hub dataset;
    ``get_spec("/path/to/folder", ...)`` any local parquet folder or imagefolder tree.
    """
    if name in _SPECS:
        spec = _SPECS[name].replace(**overrides) if overrides else _SPECS[name]
    elif Path(name).expanduser().exists():
        spec = DatasetSpec(name=Path(name).name, **{"data_dir": str(Path(name).expanduser()), **overrides})
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        spec = DatasetSpec(name=name, **{"hub_id": name, **overrides})
    else:
        raise KeyError(f"unknown dataset {name!r}: use one of {list_specs()}, a Hub id (org/name) or a local folder")
    return spec.with_holdout(holdout) if holdout else spec


register_spec(DatasetSpec(
    name="cifar10", hub_id="uoft-cs/cifar10", config="plain_text", image_column="img", label_column="label",
    image_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes=10,
))  # fmt: skip
register_spec(DatasetSpec(
    name="cifar100", hub_id="uoft-cs/cifar100", config="cifar100", image_column="img",
    label_column="fine_label", image_size=32, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
    num_classes=100,
))  # fmt: skip
# STL-10 needs a Hub copy with the 100k "unlabeled" split (labels -1); verify the id when online.
register_spec(DatasetSpec(
    name="stl10", hub_id="jxie/stl10", pretrain_splits=("train", "unlabeled"), image_size=96,
    mean=(0.4406, 0.4273, 0.3858), std=(0.2312, 0.2265, 0.2237), num_classes=10,
))  # fmt: skip
register_spec(DatasetSpec(
    name="tiny_imagenet", hub_id="zh-plus/tiny-imagenet", test_split="valid", image_size=64,
    mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262), num_classes=200,
))  # fmt: skip
register_spec(DatasetSpec(
    name="imagenet1k", hub_id="ILSVRC/imagenet-1k", test_split="validation", image_size=224,
    eval_resize=(256, 224), num_classes=1000, blur=True,
))  # fmt: skip
register_spec(_SPECS["imagenet1k"].replace(name="imagenet200", class_subset=IMAGENET200_CLASSES, num_classes=200))
# The built-in synthetic set (hub_ccrop.synthetic), generated offline on first use; mean/std measured.
register_spec(DatasetSpec(
    name="small_objects", generator="hub_ccrop.synthetic:small_objects_dir", image_size=64,
    mean=(0.519, 0.485, 0.396), std=(0.182, 0.116, 0.114), num_classes=10, extra_columns=("gt_box",),
))  # fmt: skip
register_spec(_SPECS["small_objects"].replace(  # objects 5-30% of the image instead of 10-40%
    name="small_objects_hard", generator="hub_ccrop.synthetic:small_objects_hard_dir",
    mean=(0.496, 0.472, 0.409), std=(0.158, 0.102, 0.100),
))  # fmt: skip


# -- splits and files ----------------------------------------------------------------------------

_SLICE = re.compile(r"^(?P<base>[^\[\]]+?)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """``"train[-5000:]"`` -> ``("train", slice(-5000, None))``; ``%`` bounds become fractions."""
    m = _SLICE.match(split.strip())
    if not m:
        raise ValueError(f"bad split {split!r}: use 'name' or 'name[start:stop]' (ints or percents)")

    def bound(text: str | None) -> int | float | None:
        if text is None:
            return None
        return float(text[:-1]) / 100 if text.endswith("%") else int(text)

    return m["base"], slice(bound(m["start"]), bound(m["stop"]))


def _slice_range(sl: slice, n: int) -> tuple[int, int]:
    def absolute(v: int | float | None, default: int) -> int:
        if v is None:
            return default
        if isinstance(v, float):
            v = round(v * n)
        return v + n if v < 0 else v

    start, stop = absolute(sl.start, 0), absolute(sl.stop, n)
    start, stop = max(0, min(start, n)), max(0, min(stop, n))
    return start, max(start, stop)


@dataclass(frozen=True)
class _File:
    url: str  # local path or hf:// URL
    name: str  # path relative to the dataset root: stable across copies of the data
    size: int
    row_groups: tuple[int, ...]  # rows per parquet row group; (1,) for an image file
    # The parquet footer, read once when listing: readers never fetch it again (pq.FileMetaData pickles).
    metadata: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Split:
    kind: str  # "parquet" | "imagefolder"
    files: tuple[_File, ...]
    root: str

    @property
    def num_rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _local_root(spec: DatasetSpec, data_dir: str | None) -> str | None:
    """The local dataset folder (a generated one for ``spec.generator``), or None for the Hub."""
    if data_dir is None and spec.generator is not None and spec.data_dir is None:
        module, func = spec.generator.split(":")
        return os.fspath(getattr(importlib.import_module(module), func)())
    root = data_dir or spec.data_dir
    if root is None:
        return None
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return root


def _open(url: str):  # noqa: ANN202 - a binary file object
    import fsspec

    return fsspec.open(url, "rb").open()


_HF_URL = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)$")


class _HubRangeFile(io.RawIOBase):
    """A Hub dataset file of known size read by HTTP ``Range`` requests on its resolve URL, nothing else.

    ``HfFileSystem`` re-resolves the revision and asks for the file's info in every new process (its
    instance cache is cleared on fork), so each DataLoader worker of each process would call the
    repo API; this reader only downloads the byte ranges parquet asks for.
    """

    def __init__(self, url: str, size: int) -> None:
        from huggingface_hub import hf_hub_url

        m = _HF_URL.match(url)
        if m is None:
            raise ValueError(f"not a Hub dataset file URL: {url}")
        self.name, self.size, self._pos = url, size, 0
        rev = unquote(m["rev"]) if m["rev"] else None
        self._url = hf_hub_url(m["repo"], unquote(m["path"]), repo_type="dataset", revision=rev)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        headers = {"Range": f"bytes={self._pos}-{self._pos + n - 1}", **build_hf_headers()}
        response = http_backoff("GET", self._url, headers=headers)
        hf_raise_for_status(response)
        data = response.content
        if response.status_code == 200:  # a server that ignores Range sends the whole file
            data = data[self._pos : self._pos + n]
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_sized(url: str, size: int):  # noqa: ANN202 - a binary file object
    """Open a listed file for reading byte ranges: Hub files without any API call, others as usual."""
    if "://" not in url:
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    if _HF_URL.match(url):
        return _HubRangeFile(url, size)
    return _open(url)


def _file_size(url: str) -> int:
    if "://" not in url:
        return os.path.getsize(url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.size(path))


def _relative_name(url: str, root: str) -> str:
    if "://" not in url:
        return os.path.relpath(url, root).replace(os.sep, "/")
    # hf://datasets/org/name@revision/config/train-0000.parquet -> config/train-0000.parquet
    m = re.match(r"^hf://datasets/[^/]+/[^/@]+(?:@[^/]+)?/(.*)$", url)
    return m.group(1) if m else url


def clear_cache() -> None:
    """Forget cached file listings and parquet footers (they are cached per process)."""
    _LISTINGS.clear()
    _subset_labels.cache_clear()


def _resolve_split(spec: DatasetSpec, split: str, data_dir: str | None) -> _Split:
    """The sorted files of one (unsliced) split, with parquet row-group sizes (cached per process)."""
    return _resolve_files(spec, split, _local_root(spec, data_dir))


_LISTINGS: dict[tuple[DatasetSpec, str, str | None], _Split] = {}


def _resolve_files(spec: DatasetSpec, split: str, root: str | None) -> _Split:
    key = (spec, split, root)
    if key not in _LISTINGS:
        _LISTINGS[key] = _list_files(spec, split, root)
    return _LISTINGS[key]


def share_listings(
    spec: DatasetSpec,
    splits: Sequence[str],
    *,
    is_main: bool,
    broadcast: Callable[[list[Any]], list[Any]],
    data_dir: str | None = None,
) -> None:
    """List ``splits`` (files, row groups, footers) on the main process only and give the listing to
    the others through ``broadcast`` (e.g. ``accelerate.utils.broadcast_object_list``).

    Call it on every process before :func:`load_images`: N processes then query the Hub repo once,
    not N times (the Hub rate-limits repeated listings). DataLoader workers inherit the listing.
    """
    root = _local_root(spec, data_dir)
    keys = list(dict.fromkeys((spec, parse_split(s)[0], root) for s in splits))
    payload = [[_resolve_files(*key) for key in keys] if is_main else None]
    listings = broadcast(payload)[0]
    _LISTINGS.update(zip(keys, listings, strict=True))


def _list_files(spec: DatasetSpec, split: str, root: str | None) -> _Split:
    import datasets

    if spec.data_files is not None:
        explicit = dict(spec.data_files)
        if split not in explicit:
            raise KeyError(f"dataset {spec.name!r} has no split {split!r} (data_files: {sorted(explicit)})")
        base = root or os.getcwd()
        urls = [u if "://" in u or os.path.isabs(u) else os.path.join(base, u) for u in explicit[split]]
        root = base
    else:
        if root is not None:
            # A copy of a multi-config Hub repo: read the config's subfolder (names stay repo-relative).
            config_dir = os.path.join(root, spec.config) if spec.config else root
            builder = datasets.load_dataset_builder(config_dir if os.path.isdir(config_dir) else root)
        else:
            builder = datasets.load_dataset_builder(spec.hub_id, spec.config, revision=spec.revision)
            if builder.name not in ("parquet", "imagefolder"):
                # Script/other formats: the Hub's automatic parquet conversion of the same data.
                builder = datasets.load_dataset_builder(
                    spec.hub_id, revision="refs/convert/parquet", data_dir=spec.config or "default"
                )
        data_files = builder.config.data_files or {}
        if split not in data_files:
            where = root or spec.hub_id
            raise KeyError(f"dataset {spec.name!r} ({where}) has no split {split!r}: found {sorted(map(str, data_files))}")
        urls = list(data_files[split])
        root = root or f"hf://datasets/{spec.hub_id}"
    urls = sorted(urls)
    if urls and all(u.endswith(".parquet") for u in urls):

        def describe(url: str) -> _File:  # the footer only: row groups and their sizes
            with _open(url) as f:
                meta = pq.ParquetFile(f).metadata
            groups = tuple(meta.row_group(k).num_rows for k in range(meta.num_row_groups))
            return _File(url, _relative_name(url, root), _file_size(url), groups, meta)

        return _Split("parquet", tuple(_map_io(describe, urls)), root)
    images = [u for u in urls if os.path.splitext(u)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ValueError(f"split {split!r} of {spec.name!r} has neither parquet files nor images: {urls[:5]}")
    return _Split(
        "imagefolder",
        tuple(_File(u, _relative_name(u, root), _file_size(u), (1,)) for u in images),
        root,
    )


def _map_io(fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` with a few threads when there are many (remote footers are slow)."""
    if len(items) < 4:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


@lru_cache(maxsize=64)
def _subset_labels(spec: DatasetSpec, split: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """Per parquet file: the label column (for class-subset ids in streaming mode)."""
    resolved = _resolve_split(spec, split, data_dir)
    if resolved.kind != "parquet" or spec.label_column is None:
        raise ValueError(f"class_subset needs parquet files with a label column ({spec.name!r})")
    def labels(f: _File) -> np.ndarray:
        with _open(f.url) as fh:
            return pq.read_table(fh, columns=[spec.label_column]).column(0).to_numpy()

    return tuple(_map_io(labels, resolved.files))


def _subset_map(spec: DatasetSpec) -> np.ndarray | None:
    """label -> new label (``-1`` = dropped) for a class-subset spec."""
    if spec.class_subset is None:
        return None
    table = np.full(max(spec.class_subset) + 1, -1, dtype=np.int64)
    table[np.asarray(spec.class_subset)] = np.arange(len(spec.class_subset))
    return table


def _remap(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    ok = (labels >= 0) & (labels < len(table))
    return np.where(ok, table[np.clip(labels, 0, len(table) - 1)], -1)


def _base_rows(spec: DatasetSpec, split: str, data_dir: str | None) -> int:
    """Rows of an unsliced split (after the class filter)."""
    table = _subset_map(spec)
    if table is None:
        return _resolve_split(spec, split, data_dir).num_rows
    return int(sum((_remap(labels, table) >= 0).sum() for labels in _subset_labels(spec, split, data_dir)))


def _as_splits(splits: str | Sequence[str]) -> list[str]:
    return [splits] if isinstance(splits, str) else list(splits)


def _id_offsets(spec: DatasetSpec, splits: Sequence[str], data_dir: str | None) -> dict[str, int]:
    """Id offset of each base split: bases concatenated in the order they are first named."""
    offsets: dict[str, int] = {}
    total = 0
    for s in splits:
        base, _ = parse_split(s)
        if base not in offsets:
            offsets[base] = total
            total += _base_rows(spec, base, data_dir)
    return offsets


def num_rows(spec: DatasetSpec, splits: str | Sequence[str] | None = None, *, data_dir: str | None = None) -> int:
    """Rows that :func:`load_images` yields for ``splits`` (default: the pretraining splits)."""
    splits = _as_splits(splits or spec.pretrain_splits)
    total = 0
    for s in splits:
        base, sl = parse_split(s)
        start, stop = _slice_range(sl, _base_rows(spec, base, data_dir))
        total += stop - start
    return total


def num_ids(spec: DatasetSpec, splits: str | Sequence[str] | None = None, *, data_dir: str | None = None) -> int:
    """``1 + the largest id`` the rows of ``splits`` can carry: the size of their box table.

    Equal to :func:`num_rows` for the pretraining splits of every registered spec (and for
    ``with_holdout`` specs, whose pretraining slice is a prefix).
    """
    splits = _as_splits(splits or spec.pretrain_splits)
    offsets = _id_offsets(spec, splits, data_dir)
    top = 0
    for s in splits:
        base, sl = parse_split(s)
        _, stop = _slice_range(sl, _base_rows(spec, base, data_dir))
        top = max(top, offsets[base] + stop)
    return top


def dataset_fingerprint(
    spec: DatasetSpec, splits: str | Sequence[str] | None = None, *, data_dir: str | None = None
) -> str:
    """A stable string naming exactly which rows carry which ids (stored in and checked by box tables).

    Built from the source id, config, splits, class subset, row counts and the files' relative names
    and sizes, so a local copy of Hub parquet files has the same fingerprint as the Hub dataset.
    """
    splits = _as_splits(splits or spec.pretrain_splits)
    parts = []
    for base in _id_offsets(spec, splits, data_dir):
        resolved = _resolve_split(spec, base, data_dir)
        parts.append({
            "split": base, "kind": resolved.kind,
            "files": [[f.name, f.size, sum(f.row_groups)] for f in resolved.files],
        })  # fmt: skip
    source = spec.hub_id or spec.name
    payload = {
        "id_scheme": ID_SCHEME, "source": source, "config": spec.config, "splits": splits,
        "class_subset": list(spec.class_subset) if spec.class_subset else None, "bases": parts,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    n = num_rows(spec, splits, data_dir=data_dir)
    return f"{ID_SCHEME}:{source}:{spec.config or 'default'}:{'+'.join(splits)}:{n}:{digest}"


# -- loading -------------------------------------------------------------------------------------


def _features(spec: DatasetSpec, source_features: Any):  # noqa: ANN202 - datasets.Features
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    feats = {"id": Value("int64"), "image": ImageFeature(decode=False), "label": Value("int64")}
    for col in spec.extra_columns:
        if source_features is None or col not in source_features:
            raise KeyError(f"extra column {col!r} of {spec.name!r} is not in the data")
        feats[col] = source_features[col]
    return Features(feats)


def _normalize_map_dataset(ds: Any, spec: DatasetSpec, offset: int) -> Any:
    """Uniform columns ``id, image, label, *extras`` on one loaded (unsliced) split."""
    from datasets import Image as ImageFeature

    image_col = spec.image_column if spec.image_column in ds.column_names else "image"
    if image_col not in ds.column_names:
        raise KeyError(f"{spec.name!r}: no image column {spec.image_column!r} in {ds.column_names}")
    label_col = spec.label_column if spec.label_column in ds.column_names else None
    if label_col is None and spec.label_column not in (None, "label") and spec.label_column not in ds.column_names:
        raise KeyError(f"{spec.name!r}: no label column {spec.label_column!r} in {ds.column_names}")
    ds = ds.select_columns([c for c in (image_col, label_col, *spec.extra_columns) if c is not None])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if isinstance(ds.features["image"], ImageFeature) and ds.features["image"].decode:
        ds = ds.cast_column("image", ImageFeature(decode=False))
    n = len(ds)
    if label_col:
        labels = ds.data.column(label_col).to_numpy().astype(np.int64)
    else:
        labels = np.full(n, -1, dtype=np.int64)
    if label_col:
        ds = ds.remove_columns(label_col)
    table = _subset_map(spec)
    if table is None:
        ids = offset + np.arange(n, dtype=np.int64)
        ds = ds.add_column("id", ids).add_column("label", labels)
    else:
        labels = _remap(labels, table)
        keep = labels >= 0
        ids = np.where(keep, offset + np.cumsum(keep) - 1, -1).astype(np.int64)
        ds = ds.add_column("id", ids).add_column("label", labels)
        ds = ds.select(np.flatnonzero(keep))
    return ds.select_columns(["id", "image", "label", *spec.extra_columns])


def _load_map_split(spec: DatasetSpec, base: str, resolved: _Split, offset: int, cache_dir: str | None) -> Any:
    import datasets

    files = [f.url for f in resolved.files]
    ds = datasets.load_dataset(resolved.kind, data_files={base: files}, split=base, cache_dir=cache_dir)
    return _normalize_map_dataset(ds, spec, offset)


def _parquet_shards(
    spec: DatasetSpec, base: str, resolved: _Split, data_dir: str | None, offset: int, lo: int, hi: int
) -> list[dict[str, Any]]:
    """One shard per parquet row group holding ids in ``[lo, hi)`` of one split, with its id offsets.

    Shards end on row-group boundaries: a shuffled stream (shard order, then a buffer) reads each row
    group once per epoch per process. Cutting groups into row ranges would read a group once per range.
    """
    labels = _subset_labels(spec, base, data_dir) if spec.class_subset is not None else None
    table = _subset_map(spec)
    shards = []
    row_id = kept_id = 0
    for k, f in enumerate(resolved.files):
        file_row = 0
        for g, rows in enumerate(f.row_groups):
            if labels is not None:
                count = int((_remap(labels[k][file_row : file_row + rows], table) >= 0).sum())
                first = kept_id
                kept_id += count
            else:
                first, count = row_id, rows
            if count and first < hi and first + count > lo:
                shards.append({
                    "url": f.url, "size": f.size, "metadata": f.metadata, "row_group": g, "first_id": first,
                    "offset": offset, "lo": lo, "hi": hi, "rows": min(first + count, hi) - max(first, lo),
                })  # fmt: skip
            row_id += rows
            file_row += rows
    return shards


def _read_row_group(shard: dict[str, Any], columns: list[str]) -> pa.Table:
    """One row group, with the footer from the listing: the only bytes read are its column chunks."""
    with _open_sized(shard["url"], shard["size"]) as f:
        return pq.ParquetFile(f, metadata=shard["metadata"]).read_row_group(shard["row_group"], columns=columns)


def _generate_rows(
    shards: list[dict[str, Any]],
    image_column: str,
    label_column: str | None,
    extra_columns: tuple[str, ...],
    subset: tuple[int, ...] | None,
) -> Iterator[dict[str, Any]]:
    """Rows of parquet row-group ranges; ids from the shard's offsets (stable under any sharding)."""
    table_map = None
    if subset is not None:
        table_map = np.full(max(subset) + 1, -1, dtype=np.int64)
        table_map[np.asarray(subset)] = np.arange(len(subset))
    columns = [c for c in (image_column, label_column, *extra_columns) if c is not None]
    for sh in shards:
        part = _read_row_group(sh, columns)
        n = part.num_rows
        if label_column is not None:
            labels = part.column(label_column).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            labels = np.full(n, -1, dtype=np.int64)
        if table_map is not None:
            labels = _remap(labels, table_map)
            keep = labels >= 0
            ids = sh["first_id"] + np.cumsum(keep) - 1
        else:
            keep = np.ones(n, dtype=bool)
            ids = sh["first_id"] + np.arange(n)
        keep &= (ids >= sh["lo"]) & (ids < sh["hi"])
        rows = np.flatnonzero(keep)
        if not len(rows):
            continue
        images = part.column(image_column).take(rows).to_pylist()
        extras = {c: part.column(c).take(rows).to_pylist() for c in extra_columns}
        for k, r in enumerate(rows):
            row = {"id": int(sh["offset"] + ids[r]), "image": images[k], "label": int(labels[r])}
            for c in extra_columns:
                row[c] = extras[c][k]
            yield row


def _source_features(resolved: _Split) -> Any:
    from datasets import Features

    return Features.from_arrow_schema(resolved.files[0].metadata.schema.to_arrow_schema())


def load_images(
    spec: DatasetSpec,
    splits: str | Sequence[str] | None = None,
    *,
    streaming: bool = False,
    data_dir: str | None = None,
    num_shards: int = STREAMING_SHARDS,
    cache_dir: str | None = None,
) -> Any:
    """Rows ``{"id", "image", "label", *spec.extra_columns}`` of ``splits`` (default: pretraining).

    Returns a map-style ``datasets.Dataset`` or, with ``streaming=True``, a
    ``datasets.IterableDataset`` whose ids do not depend on shuffling, DataLoader workers or
    ``split_dataset_by_node``. Images are left undecoded (``{"bytes", "path"}``): decode with
    :func:`decode_image` (the collate stage does, skipping bad images by id).

    Streamed parquet has one shard per row group (each read once per epoch per process; write
    files with at least workers x processes row groups to keep every worker busy); streamed
    imagefolder trees have ``num_shards`` shards.
    """
    import datasets

    splits = _as_splits(splits or spec.pretrain_splits)
    offsets = _id_offsets(spec, splits, data_dir)
    parts: list[Any] = []
    shards: list[dict[str, Any]] = []
    loaded: dict[str, Any] = {}
    first_parquet: _Split | None = None
    for s in splits:
        base, sl = parse_split(s)
        resolved = _resolve_split(spec, base, data_dir)
        start, stop = _slice_range(sl, _base_rows(spec, base, data_dir))
        if streaming and resolved.kind == "parquet":
            first_parquet = first_parquet or resolved
            shards += _parquet_shards(spec, base, resolved, data_dir, offsets[base], start, stop)
            continue
        if base not in loaded:
            loaded[base] = _load_map_split(spec, base, resolved, offsets[base], cache_dir)
        part = loaded[base]
        parts.append(part if (start, stop) == (0, len(part)) else part.select(range(start, stop)))
    if streaming and shards:
        if parts:
            raise ValueError(f"{spec.name!r}: cannot stream a mix of parquet and imagefolder splits")
        source = _source_features(first_parquet)
        for col in (spec.image_column, spec.label_column):
            if col is not None and col not in source:
                raise KeyError(f"{spec.name!r}: no column {col!r} in {sorted(source)} (set image_column/label_column)")
        features = _features(spec, source)
        return datasets.IterableDataset.from_generator(
            _generate_rows,
            features=features,
            gen_kwargs={
                "shards": shards, "image_column": spec.image_column, "label_column": spec.label_column,
                "extra_columns": spec.extra_columns, "subset": spec.class_subset,
            },
        )  # fmt: skip
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if streaming:  # imagefolder trees: stream the (path-only) map-style rows, ids already fixed
        return ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
    return ds


def min_rows_per_process(
    spec: DatasetSpec,
    world_size: int,
    splits: str | Sequence[str] | None = None,
    *,
    data_dir: str | None = None,
    num_shards: int = STREAMING_SHARDS,
) -> int:
    """The fewest rows any of ``world_size`` processes can get from ``split_dataset_by_node`` of the
    stream :func:`load_images` makes, in any epoch: the steps every process can safely take.

    ``datasets`` gives each process whole shards (reshuffled every epoch) when the shard count is a
    multiple of ``world_size``, else every ``world_size``-th row; row groups can differ in size.
    """
    splits = _as_splits(splits or spec.pretrain_splits)
    total = num_rows(spec, splits, data_dir=data_dir)
    offsets = _id_offsets(spec, splits, data_dir)
    rows: list[int] = []
    for s in splits:
        base, sl = parse_split(s)
        resolved = _resolve_split(spec, base, data_dir)
        if resolved.kind != "parquet":  # imagefolder: to_iterable_dataset's near-equal row ranges
            shards = max(1, min(num_shards, total))
            rows = [total // shards + (k < total % shards) for k in range(shards)]
            break
        start, stop = _slice_range(sl, _base_rows(spec, base, data_dir))
        rows += [sh["rows"] for sh in _parquet_shards(spec, base, resolved, data_dir, offsets[base], start, stop)]
    if len(rows) % world_size:
        return total // world_size
    return sum(sorted(rows)[: len(rows) // world_size])


# -- decoding ------------------------------------------------------------------------------------


class BadImageError(ValueError):
    """An image that cannot be decoded; names the sample id and the file when known."""

    def __init__(self, sample_id: Any, reason: str, path: str | None = None) -> None:
        where = f" ({path})" if path else ""
        super().__init__(f"sample id {sample_id}: cannot decode image{where}: {reason}")
        self.sample_id = sample_id
        self.path = path
        self.reason = reason


class BadImageWarning(UserWarning):
    """An image was skipped because it could not be decoded."""


def _open_image(value: Any) -> tuple[Image.Image, str | None]:
    if isinstance(value, Image.Image):
        return value, getattr(value, "filename", None) or None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return Image.open(io.BytesIO(data)), path
        if path:
            return Image.open(path), path
        raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(value))), None
    if isinstance(value, str | os.PathLike):
        return Image.open(value), os.fspath(value)
    if isinstance(value, torch.Tensor):  # CHW, like torchvision
        arr = value.detach().cpu().numpy()
        return _array_to_image(arr.transpose(1, 2, 0) if arr.ndim == 3 else arr), None
    if isinstance(value, np.ndarray):  # HWC or HW
        return _array_to_image(value), None
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"array of shape {arr.shape} is not an image")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        arr = np.round(arr.astype(np.float32) / 257.0).clip(0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.round(arr.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
    else:
        arr = arr.clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit/int/float scaled to 8 bits, transparency composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        peak = arr.max(initial=0)
        if mode == "F" and peak <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif mode != "F" and (mode.startswith("I;16") or peak > 255):
            arr = arr / 257.0  # 16-bit range -> 8 bits
        return Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(value: Any, sample_id: Any = None, *, max_side: int | None = None) -> Image.Image:
    """Decode one image value (PIL, bytes, ``{"bytes", "path"}``, path, numpy/tensor) to an RGB PIL image.

    Grayscale, palette, transparent and 16-bit images are converted; anything that cannot be decoded
    (truncated, not an image, empty) raises :class:`BadImageError` naming ``sample_id`` and the path.
    ``max_side`` shrinks images whose longer side is larger (JPEGs are decoded at reduced scale).
    """
    path = value.get("path") if isinstance(value, dict) else None
    try:
        img, path = _open_image(value)
        target = _limited_size(img.size, max_side)
        if target != img.size and img.format == "JPEG":
            img.draft("RGB", target)  # DCT-domain downscale while decoding: much faster
        img.load()
        if img.width < 1 or img.height < 1:
            raise ValueError(f"empty image {img.size}")
        img = to_rgb(img)
        target = _limited_size(img.size, max_side)
        return img if target == img.size else img.resize(target, Image.BILINEAR)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported with the sample id
        raise BadImageError(sample_id, f"{type(err).__name__}: {err}", path) from err


def _limited_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_to_tensor(value: Any, sample_id: Any = None, *, max_side: int | None = None) -> Tensor:
    """Like :func:`decode_image` but returns a uint8 ``[3, H, W]`` tensor.

    JPEG bytes take torchvision's libjpeg-turbo decoder (no PIL round trip); everything else goes
    through :func:`decode_image`. Failures raise :class:`BadImageError` with the id.
    """
    data = value.get("bytes") if isinstance(value, dict) else value
    if max_side is None and isinstance(data, bytes | bytearray) and data[:3] == _JPEG_MAGIC:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as err:
            path = value.get("path") if isinstance(value, dict) else None
            raise BadImageError(sample_id, f"{type(err).__name__}: {err}", path) from err
    img = decode_image(value, sample_id, max_side=max_side)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def image_size(value: Any, sample_id: Any = None, *, max_side: int | None = None) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`decode_to_tensor` would return it, from its header only (no decoding)."""
    path = value.get("path") if isinstance(value, dict) else None
    try:
        img, path = _open_image(value)
        width, height = _limited_size(img.size, max_side)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - reported with the sample id, like a decoding failure
        raise BadImageError(sample_id, f"{type(err).__name__}: {err}", path) from err
    if width < 1 or height < 1:
        raise BadImageError(sample_id, f"empty image {(width, height)}", path)
    return height, width


def _jpeg_bytes(value: Any) -> bytes | None:
    data = value.get("bytes") if isinstance(value, dict) else value
    return bytes(data) if isinstance(data, bytes | bytearray) and data[:3] == _JPEG_MAGIC else None


def decode_on_device(
    values: Sequence[Any],
    ids: Sequence[Any],
    device: torch.device | str,
    *,
    max_side: int | None = None,
    decoder: Callable[..., Any] | None = None,
) -> list[Tensor | BadImageError]:
    """Decode a batch into uint8 ``[3, H, W]`` tensors on ``device``: the JPEGs in one batched call of
    ``decoder`` (default torchvision's ``decode_jpeg``, nvJPEG on CUDA), then, if that call fails, each
    JPEG alone, and any image the device cannot decode (not a JPEG, CMYK, corrupt) on the CPU with
    :func:`decode_to_tensor` (reduced-size JPEG decoding included). Images larger than ``max_side``
    are shrunk like the CPU path's. An image nothing decodes is returned as its :class:`BadImageError`.
    """
    if decoder is None:
        from torchvision.io import decode_jpeg as decoder
    from torchvision.io import ImageReadMode

    device = torch.device(device)
    out: list[Tensor | BadImageError | None] = [None] * len(values)
    jpegs = [k for k, v in enumerate(values) if _jpeg_bytes(v) is not None]
    if jpegs:
        data = [torch.frombuffer(bytearray(_jpeg_bytes(values[k])), dtype=torch.uint8) for k in jpegs]

        def device_decode(items: list[Tensor]) -> list[Tensor]:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                return decoder(items, mode=ImageReadMode.RGB, device=device)

        try:
            decoded: list[Tensor | None] = list(device_decode(data))
        except RuntimeError:  # one bad image fails the whole batch: retry one by one
            decoded = []
            for item in data:
                try:
                    decoded.append(device_decode([item])[0])
                except RuntimeError:
                    decoded.append(None)  # the CPU gets its turn below
        for k, img in zip(jpegs, decoded, strict=True):
            if img is not None:
                out[k] = _shrink(img, max_side)
    for k, value in enumerate(values):
        if out[k] is None:
            try:
                out[k] = decode_to_tensor(value, ids[k], max_side=max_side).to(device, non_blocking=True)
            except BadImageError as err:
                out[k] = err
    return out


def _shrink(img: Tensor, max_side: int | None) -> Tensor:
    """``img`` resized (antialiased) so its longer side is at most ``max_side``."""
    height, width = img.shape[-2:]
    new_w, new_h = _limited_size((width, height), max_side)
    if (new_h, new_w) == (height, width):
        return img
    from torchvision.transforms import functional as TF

    return TF.resize(img, [new_h, new_w], antialias=True)

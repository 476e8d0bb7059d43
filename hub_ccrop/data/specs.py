"""Dataset specs: where a dataset lives, its columns, splits, sizes and normalization; the registry of
named specs; split names with slices (``"train[:-5000]"``)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hub_ccrop.errors import UserError

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



class DataError(UserError, KeyError):
    """A dataset, split or column that is not there: one line for the user (``error: ...``, exit 2)."""

    __str__ = Exception.__str__  # the message, not KeyError's quoted repr


# A Hub repo id as huggingface_hub validates it: ORG/NAME, each starting and ending with a letter or digit.
_HUB_ID = re.compile(r"\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hub dataset id (``ORG/NAME``); ``./photos``, ``~/x``, ``a/b/c`` cannot."""
    return _HUB_ID.fullmatch(name) is not None and "--" not in name and ".." not in name


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local folder or file: it starts with ``.``, ``/`` or ``~``, ends with ``/``
    or has more than one ``/`` (so it is never sent to the Hub)."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or os.sep in name.replace("/", "")


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
    elif looks_like_path(name):
        raise DataError(f"dataset folder {name} does not exist: check the path (a folder of images, in class "
                        "subfolders if they have labels, or of parquet files)")
    elif is_hub_id(name):
        spec = DatasetSpec(name=name, **{"hub_id": name, **overrides})
    else:
        raise DataError(f"unknown dataset {name!r}: use one of {list_specs()}, a Hub id (org/name) or a local folder")
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

_SLICE = re.compile(
    r"^(?P<base>[^\[\]]+?)(?:\[(?P<exclude>!)?(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?(?::(?P<step>[1-9]\d*))?\])?$"
)


@dataclass(frozen=True)
class Rows:
    """The rows of a split that a split name selects, as positions in the unsliced split.

    ``start:stop:step`` as in a Python slice (``%`` bounds are fractions of the split, ``step`` >= 1); with
    ``exclude`` (``"train[!9::10]"``) the name selects every row of the split except those: the complement,
    so a strided hold-out and the rest of the split are two names of one split that keep their ids.
    """

    start: int | float | None = None
    stop: int | float | None = None
    step: int = 1
    exclude: bool = False

    def range(self, n: int) -> range:
        """The positions ``start:stop:step`` names in a split of ``n`` rows (before ``exclude``)."""
        start, stop = _slice_range(slice(self.start, self.stop), n)
        return range(start, stop, self.step)

    def count(self, n: int, lo: int = 0, hi: int | None = None) -> int:
        """How many selected positions lie in ``[lo, hi)`` (default: the whole split)."""
        hi = n if hi is None else hi
        picked = self.range(n)
        step = picked.step
        first = max(picked.start, lo)
        first += (picked.start - first) % step  # the first position of the stride at or after lo
        inside = max(0, -(-(min(picked.stop, hi) - first) // step))
        return (max(0, hi - lo) - inside) if self.exclude else inside

    def mask(self, positions: np.ndarray, n: int) -> np.ndarray:
        """Which of ``positions`` (of a split of ``n`` rows) are selected."""
        picked = self.range(n)
        hit = (positions >= picked.start) & (positions < picked.stop) & ((positions - picked.start) % picked.step == 0)
        return ~hit if self.exclude else hit

    def positions(self, n: int) -> range | np.ndarray:
        """The selected positions, ascending."""
        picked = self.range(n)
        if not self.exclude:
            return picked
        return np.flatnonzero(self.mask(np.arange(n), n))

    def is_all(self, n: int) -> bool:
        return self.count(n) == n


def parse_split(split: str) -> tuple[str, Rows]:
    """``"train[-5000:]"`` -> ``("train", Rows(-5000, None))``; ``%`` bounds become fractions;
    ``"train[9::10]"`` every 10th row from row 9, ``"train[!9::10]"`` all the other rows."""
    m = _SLICE.match(split.strip())
    if not m:
        raise ValueError(f"bad split {split!r}: use 'name', 'name[start:stop]' (ints or percents), "
                         "'name[start:stop:step]' or 'name[!start:stop:step]' (the other rows)")

    def bound(text: str | None) -> int | float | None:
        if text is None:
            return None
        return float(text[:-1]) / 100 if text.endswith("%") else int(text)

    step = int(m["step"]) if m["step"] else 1
    return m["base"], Rows(bound(m["start"]), bound(m["stop"]), step, exclude=bool(m["exclude"]))


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

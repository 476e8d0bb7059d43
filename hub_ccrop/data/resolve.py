"""A dataset as its files describe it: the image and label columns, the classes and a labeled test split.

Own data (a folder of images, with or without class subfolders, parquet files, any Hub dataset) comes
without a spec's knowledge, so before training :func:`resolve_spec` reads what the files say:

- the image column: the spec's, else (when the spec says the default ``image``) the one image column
  there is (an ``Image`` feature, a ``{bytes, path}`` struct or a binary column);
- the labels: the spec's label column, ``label`` when there is one (class subfolders are labels, by
  ``datasets``' imagefolder rule: more than one folder, all at one depth), else none;
- the classes: the spec's count, else the ``ClassLabel``'s, else ``max(label) + 1``;
- the kNN monitor's labeled test split: the spec's, else ``validation``, else every m-th row of the
  train split held out (``train[m-1::m]``; pretraining and the kNN bank keep ``train[!m-1::m]``, the
  other rows, so ids stay row positions and class-sorted folders give every class test rows).

It returns the resolved spec and the start line that says what was found when it is not a registered
dataset's usual setting (no labels: the kNN monitor is off; an automatic hold-out: how many rows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from hub_ccrop.data.columns import image_column_of
from hub_ccrop.data.decode import BadImageError, image_size
from hub_ccrop.data.ids import num_rows
from hub_ccrop.data.listing import _File, _map_io, _open, _resolve_split, split_names
from hub_ccrop.data.specs import DataError, DatasetSpec, parse_split

__all__ = ["HOLDOUT_EVERY", "MIN_HOLDOUT_ROWS", "image_column_of", "resolve_for_run", "resolve_on_main", "resolve_spec"]

# The automatic hold-out: every 10th row (at most 10,000 rows); data with fewer rows gets no kNN monitor.
HOLDOUT_EVERY = 10
HOLDOUT_MAX_ROWS = 10_000
MIN_HOLDOUT_ROWS = 20
NO_LABELS = ("", "none")  # data.label_column values that turn inferred labels (e.g. folders) off


def _class_folders(files: tuple[_File, ...]) -> list[str] | None:
    """The class names ``datasets``' imagefolder builder infers: the images' parent folders, when there
    is more than one and every image lies at the same depth; else None (no labels)."""
    names = {os.path.basename(os.path.dirname(f.url)) for f in files}
    depths = {f.url.count("/") for f in files}
    return sorted(names) if len(names) > 1 and len(depths) == 1 else None


def _features(spec: DatasetSpec, split: str) -> tuple[Any, list[str] | None]:
    """The columns of one split (``datasets.Features``) and, for image folders, the class folders."""
    from datasets import ClassLabel, Features, Image

    resolved = _resolve_split(spec, parse_split(split)[0], None)
    if resolved.kind == "parquet":
        return Features.from_arrow_schema(resolved.files[0].metadata.schema.to_arrow_schema()), None
    classes = _class_folders(resolved.files)
    columns = {"image": Image()} | ({"label": ClassLabel(names=classes)} if classes else {})
    return Features(columns), classes


def _num_classes(spec: DatasetSpec, features: Any) -> int:
    """The ``ClassLabel``'s class count, else ``max(label) + 1`` over the train split's files."""
    from datasets import ClassLabel

    feature = features[spec.label_column]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    resolved = _resolve_split(spec, parse_split(spec.train_split)[0], None)

    def top(f: _File) -> int:
        with _open(f.url) as fh:
            labels = pq.read_table(fh, columns=[spec.label_column]).column(0).to_numpy(zero_copy_only=False)
        return int(np.max(labels, initial=-1))

    return 1 + max(_map_io(top, resolved.files))


def _with_box_column(spec: DatasetSpec, features: Any, box_column: str | None) -> DatasetSpec:
    """The spec with ``box_column`` among the columns its rows carry (``data.box_column``)."""
    if box_column is None or box_column in spec.extra_columns:
        return spec
    if box_column not in features:
        hint = (": an image folder has no columns; put the images and their boxes in a parquet file"
                if set(features) <= {"image", "label"} else "")
        raise DataError(f"data.box_column: dataset {spec.name!r} has no column {box_column!r} (columns: "
                        f"{', '.join(features)}){hint}")
    return spec.replace(extra_columns=(*spec.extra_columns, box_column))


def _with_columns(spec: DatasetSpec, box_column: str | None = None) -> tuple[DatasetSpec, str, list[str] | None]:
    """The spec with the data's image/label/box columns and classes; the reason when it has no labels."""
    features, classes = _features(spec, spec.pretrain_splits[0])
    spec = spec.replace(image_column=image_column_of(features, spec.image_column, spec.name))
    spec = _with_box_column(spec, features, box_column)
    label = spec.label_column
    if label is None or label.lower() in NO_LABELS:
        return spec.replace(label_column=None), "data.label_column is off", None
    if label not in features:
        if label != "label":
            raise DataError(f"dataset {spec.name!r} has no label column {label!r} (columns: {', '.join(features)}): "
                            "set data.label_column, or data.label_column=none for no labels")
        kind = _resolve_split(spec, parse_split(spec.pretrain_splits[0])[0], None).kind
        why = "no class subfolders" if kind == "imagefolder" else f"no label column (columns: {', '.join(features)})"
        return spec.replace(label_column=None), why, None
    if spec.num_classes is None:
        spec = spec.replace(num_classes=_num_classes(spec, features))
    return spec, "", classes


def _spread_holdout(spec: DatasetSpec) -> tuple[DatasetSpec, int] | None:
    """Every m-th row of the unsliced train split as the test split, the rest for pretraining and the kNN
    bank; None when the train split is sliced or too small. Returns the spec and m."""
    base = parse_split(spec.train_split)[0]
    uses = [s for s in spec.pretrain_splits if parse_split(s)[0] == base]
    if spec.train_split != base or any(s != base for s in uses) or base not in split_names(spec):
        return None
    n = num_rows(spec, base)
    if n < MIN_HOLDOUT_ROWS:
        return None
    every = max(HOLDOUT_EVERY, math.ceil(n / HOLDOUT_MAX_ROWS))
    test, rest = f"{base}[{every - 1}::{every}]", f"{base}[!{every - 1}::{every}]"
    pretrain = tuple(rest if s == base else s for s in spec.pretrain_splits)
    spec = spec.replace(pretrain_splits=pretrain, train_split=rest, test_split=test)
    return spec, every


def _with_test_split(spec: DatasetSpec, where: str, labels: str) -> tuple[DatasetSpec, str | None]:
    """The spec with a labeled test split that exists (the spec's, ``validation``, or a spread hold-out)."""
    splits = split_names(spec)
    if spec.test_split and parse_split(spec.test_split)[0] in splits:
        return spec, None
    if spec.test_split not in (None, "test"):  # a split someone named: say it is missing, do not guess
        raise DataError(f"dataset {spec.name!r} has no split {spec.test_split!r} (splits: {', '.join(splits)}): "
                        "set data.test_split, or data.holdout=N to hold out the last N train rows")
    if "validation" in splits:
        return spec.replace(test_split="validation"), None
    held = _spread_holdout(spec)
    if held is None:
        return spec.replace(test_split=None), (
            f"{where}: {labels}, no test split and too few rows to hold some out: the kNN monitor is off")
    spec, every = held
    return spec, (f"{where}: {labels}; no test split, so every {every}th image ({num_rows(spec, spec.test_split)} "
                  f"images, {spec.test_split}) is held out as the kNN monitor's labeled test split and left out "
                  f"of pretraining ({num_rows(spec)} images)")


def _check_readable(spec: DatasetSpec) -> None:
    """An image folder in which no image opens is a mistake (one line), not a run that trains on nothing:
    a spread sample of headers is read, and every file only when none of the sample opens."""
    for split in dict.fromkeys(parse_split(s)[0] for s in spec.pretrain_splits):
        resolved = _resolve_split(spec, split, None)
        if resolved.kind != "imagefolder":
            continue
        files = resolved.files
        step = max(1, len(files) // 16)
        first: BadImageError | None = None
        for f in (*files[::step], *(f for k, f in enumerate(files) if k % step)):
            try:
                image_size({"bytes": None, "path": f.url})
                break
            except BadImageError as err:
                first = first or err
        else:
            raise DataError(f"none of the {len(files)} images of dataset {spec.name!r} can be read, e.g. "
                            f"{first.path}: {first.reason}")


def resolve_spec(
    spec: DatasetSpec, *, knn: bool = True, box_column: str | None = None
) -> tuple[DatasetSpec, str | None]:
    """``spec`` with the columns, classes and labeled test split its data has, and the start line that
    says what was found (None for the usual setting). ``knn``: a labeled test split is wanted;
    ``box_column``: a column of ground-truth boxes the rows must carry."""
    source = spec.data_dir or spec.hub_id or spec.name
    for split in spec.pretrain_splits:
        base = parse_split(split)[0]
        if base not in (splits := split_names(spec)):
            raise DataError(f"dataset {spec.name!r} ({source}) has no split {base!r} to pretrain on "
                            f"(splits: {', '.join(splits)}): set data.splits")
    _check_readable(spec)
    spec, no_labels, classes = _with_columns(spec, box_column)
    where = f"data {source}: {num_rows(spec)} images"
    if spec.label_column is None:
        off = "" if not knn else ": the kNN monitor is off (it needs labels, as `hub-ccrop eval linear` does)"
        return spec.replace(test_split=None), f"{where} without labels ({no_labels}){off}"
    labels = (f"{spec.num_classes} classes from the class subfolders ({', '.join(classes[:5])}"
              f"{', ...' if len(classes) > 5 else ''}; not classes? data.label_column=none)") if classes else (
        f"{spec.num_classes} classes in column {spec.label_column!r}")
    if not knn:
        return spec, None
    spec, note = _with_test_split(spec, where, labels)
    return spec, note if note or not classes else f"{where}, {labels}"


def resolve_on_main(
    spec: DatasetSpec,
    *,
    knn: bool,
    box_column: str | None = None,
    is_main: bool = True,
    broadcast: Callable[[list[Any]], list[Any]] | None = None,
    say: Callable[[str], Any] = print,
) -> DatasetSpec:
    """:func:`resolve_spec` on the main process, handed to the others through ``broadcast`` (e.g.
    accelerate's ``broadcast_object_list``); the main process ``say``s the start line. A mistake in the
    data is raised on every process (the others would otherwise wait for the main one forever)."""
    payload: list[Any] = [None]
    if is_main:
        try:
            payload = [("ok", resolve_spec(spec, knn=knn, box_column=box_column))]
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            payload = [("error", err)]
    if broadcast is not None:
        payload = broadcast(payload)
    status, value = payload[0]
    if status == "error":
        raise value
    spec, note = value
    if note and is_main:
        say(note)
    return spec


def resolve_for_run(spec: DatasetSpec, *, knn: bool, box_column: str | None = None, accelerator: Any = None
                    ) -> DatasetSpec:
    """:func:`resolve_on_main` for a training run under an ``accelerate.Accelerator`` (or none)."""
    if accelerator is None or accelerator.num_processes == 1:
        return resolve_on_main(spec, knn=knn, box_column=box_column,
                               say=print if accelerator is None else accelerator.print)
    from accelerate.utils import broadcast_object_list

    return resolve_on_main(spec, knn=knn, box_column=box_column, is_main=accelerator.is_main_process,
                           broadcast=broadcast_object_list, say=accelerator.print)

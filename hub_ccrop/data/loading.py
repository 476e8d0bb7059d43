"""Loading rows ``{"id", "image", "label", *extra columns}``: map-style through ``datasets`` or streamed by
parquet row group, with ids that survive shuffling, workers, processes and resumption."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hub_ccrop.data.columns import image_column_of
from hub_ccrop.data.ids import (
    _as_splits,
    _base_rows,
    _id_offsets,
    _remap,
    _subset_labels,
    _subset_map,
    num_rows,
)
from hub_ccrop.data.listing import _open_sized, _resolve_split, _Split
from hub_ccrop.data.specs import DataError, DatasetSpec, Rows, parse_split

# Shards of a streamed imagefolder tree (parquet sources are sharded by row group, see _parquet_shards).
STREAMING_SHARDS = 64


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

    image_col = spec.image_column if spec.image_column in ds.column_names else image_column_of(ds.features, "image", spec.name)
    label_col = spec.label_column if spec.label_column in ds.column_names else None
    if label_col is None and spec.label_column not in (None, "label") and spec.label_column not in ds.column_names:
        raise DataError(f"{spec.name!r}: no label column {spec.label_column!r} in {ds.column_names}")
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
    spec: DatasetSpec, base: str, resolved: _Split, data_dir: str | None, offset: int, select: Rows
) -> list[dict[str, Any]]:
    """One shard per parquet row group holding rows ``select`` picks from one split, with its id offsets.

    Shards end on row-group boundaries: a shuffled stream (shard order, then a buffer) reads each row
    group once per epoch per process. Cutting groups into row ranges would read a group once per range.
    """
    labels = _subset_labels(spec, base, data_dir) if spec.class_subset is not None else None
    table = _subset_map(spec)
    n = _base_rows(spec, base, data_dir)
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
            picked = select.count(n, first, first + count) if count else 0
            if picked:
                shards.append({
                    "url": f.url, "size": f.size, "metadata": f.metadata, "row_group": g, "first_id": first,
                    "offset": offset, "select": select, "split_rows": n, "rows": picked,
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
        keep &= sh["select"].mask(ids, sh["split_rows"])
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
        base, rows = parse_split(s)
        resolved = _resolve_split(spec, base, data_dir)
        if streaming and resolved.kind == "parquet":
            first_parquet = first_parquet or resolved
            shards += _parquet_shards(spec, base, resolved, data_dir, offsets[base], rows)
            continue
        if base not in loaded:
            loaded[base] = _load_map_split(spec, base, resolved, offsets[base], cache_dir)
        part = loaded[base]
        parts.append(part if rows.is_all(len(part)) else part.select(rows.positions(len(part))))
    if streaming and shards:
        if parts:
            raise ValueError(f"{spec.name!r}: cannot stream a mix of parquet and imagefolder splits")
        source = _source_features(first_parquet)
        image_column = spec.image_column if spec.image_column in source else image_column_of(source, "image", spec.name)
        label_column = spec.label_column if spec.label_column in source else None
        if label_column is None and spec.label_column not in (None, "label"):
            raise DataError(f"{spec.name!r}: no column {spec.label_column!r} in {sorted(source)} (set label_column)")
        features = _features(spec, source)
        return datasets.IterableDataset.from_generator(
            _generate_rows,
            features=features,
            gen_kwargs={
                "shards": shards, "image_column": image_column, "label_column": label_column,
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
        base, select = parse_split(s)
        resolved = _resolve_split(spec, base, data_dir)
        if resolved.kind != "parquet":  # imagefolder: to_iterable_dataset's near-equal row ranges
            shards = max(1, min(num_shards, total))
            rows = [total // shards + (k < total % shards) for k in range(shards)]
            break
        rows += [sh["rows"] for sh in _parquet_shards(spec, base, resolved, data_dir, offsets[base], select)]
    if len(rows) % world_size:
        return total // world_size
    return sum(sorted(rows)[: len(rows) // world_size])


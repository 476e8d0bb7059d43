"""Sample ids (scheme ``"row-index-v1"``): rows per split after the class filter, id offsets of the
requested splits, the box table's size and the dataset fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pyarrow.parquet as pq

from hub_ccrop.boxes import ID_SCHEME
from hub_ccrop.data.listing import _LISTINGS, _SPLIT_FILES, _File, _map_io, _open, _resolve_split
from hub_ccrop.data.specs import DatasetSpec, parse_split


def clear_cache() -> None:
    """Forget cached file listings and parquet footers (they are cached per process)."""
    _LISTINGS.clear()
    _SPLIT_FILES.clear()
    _subset_labels.cache_clear()


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
        base, rows = parse_split(s)
        total += rows.count(_base_rows(spec, base, data_dir))
    return total


def num_ids(spec: DatasetSpec, splits: str | Sequence[str] | None = None, *, data_dir: str | None = None) -> int:
    """``1 + the largest id`` the rows of ``splits`` can carry: the size of their box table.

    Equal to :func:`num_rows` for the pretraining splits of every registered spec (and for
    ``with_holdout`` specs, whose pretraining slice is a prefix); a spread hold-out leaves gaps.
    """
    splits = _as_splits(splits or spec.pretrain_splits)
    offsets = _id_offsets(spec, splits, data_dir)
    top = 0
    for s in splits:
        base, rows = parse_split(s)
        picked = rows.positions(_base_rows(spec, base, data_dir))
        if len(picked):
            top = max(top, offsets[base] + int(picked[-1]) + 1)
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



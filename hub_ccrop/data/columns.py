"""The image column of a dataset: the one named, else the only column that holds images."""

from __future__ import annotations

from typing import Any

from hub_ccrop.data.specs import DataError

__all__ = ["image_column_of"]


def _is_image_feature(feature: Any) -> bool:
    from datasets import Image, Value

    if isinstance(feature, Image):
        return True
    if isinstance(feature, dict):  # a plain parquet file's {bytes, path} struct
        return "bytes" in feature
    return isinstance(feature, Value) and feature.dtype in ("binary", "large_binary")


def image_column_of(features: Any, wanted: str, dataset: str) -> str:
    """``wanted`` when the data has it; for the default ``image``, the data's only image column."""
    if wanted in features:
        return wanted
    columns = ", ".join(features)
    if wanted != "image":
        raise DataError(f"dataset {dataset!r} has no image column {wanted!r} (columns: {columns}): "
                        "set data.image_column (eval: --image-column)")
    found = [c for c, f in features.items() if _is_image_feature(f)]
    if len(found) > 1:  # an Image feature wins over raw binary columns
        from datasets import Image

        found = [c for c in found if isinstance(features[c], Image)] or found
    if len(found) == 1:
        return found[0]
    what = f"several image columns ({', '.join(found)})" if found else f"no image column (columns: {columns})"
    raise DataError(f"dataset {dataset!r} has {what}: set data.image_column (eval: --image-column)")

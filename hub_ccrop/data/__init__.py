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

Modules: ``specs`` (``DatasetSpec``, the registry, split slices), ``listing`` (the files of a split, local
or on the Hub, read by byte range), ``ids`` (row counts, id offsets, fingerprints), ``loading``
(``load_images``), ``decode`` (images to RGB on the CPU or a device).
"""

from hub_ccrop.boxes import ID_SCHEME
from hub_ccrop.data.decode import (
    BadImageError,
    BadImageWarning,
    decode_image,
    decode_on_device,
    decode_to_tensor,
    image_size,
    to_rgb,
)
from hub_ccrop.data.gt_boxes import BOX_FORMATS, ground_truth_boxes, mean_matched_iou, single_objects
from hub_ccrop.data.ids import clear_cache, dataset_fingerprint, num_ids, num_rows
from hub_ccrop.data.listing import IMAGE_EXTENSIONS, share_listings
from hub_ccrop.data.loading import STREAMING_SHARDS, load_images, min_rows_per_process
from hub_ccrop.data.specs import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET200_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    DatasetSpec,
    Rows,
    get_spec,
    is_hub_id,
    list_specs,
    looks_like_path,
    parse_split,
    register_spec,
)

__all__ = [
    "BOX_FORMATS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ID_SCHEME",
    "IMAGENET200_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "STREAMING_SHARDS",
    "BadImageError",
    "BadImageWarning",
    "DataError",
    "DatasetSpec",
    "Rows",
    "clear_cache",
    "dataset_fingerprint",
    "decode_image",
    "decode_on_device",
    "decode_to_tensor",
    "get_spec",
    "ground_truth_boxes",
    "image_size",
    "is_hub_id",
    "list_specs",
    "load_images",
    "looks_like_path",
    "mean_matched_iou",
    "min_rows_per_process",
    "num_ids",
    "num_rows",
    "parse_split",
    "register_spec",
    "share_listings",
    "single_objects",
    "to_rgb",
]

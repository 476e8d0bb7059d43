"""Views: the crops a method trains on, from the view groups of a recipe.

* :mod:`~hub_ccrop.views.sampler`: every crop's rectangle, ContrastiveCrop (Algorithm 1 inside each
  image's box) or RandomResizedCrop, for any number of groups and crops per group;
* :mod:`~hub_ccrop.views.ops`: the pixel operations (colour jitter, grayscale, blur, solarize), batched;
* :mod:`~hub_ccrop.views.augment`: the batched executor (CPU grouped, accelerator masked);
* :mod:`~hub_ccrop.views.collate`: the collate stage (per image with PIL, or batched) -> :class:`Views`;
* :mod:`~hub_ccrop.views.resident`: device-resident small datasets;
* :mod:`~hub_ccrop.views.eval`: the one eval transform.
"""

from hub_ccrop.views.augment import BatchedViewAugment, ViewsAugment
from hub_ccrop.views.batch import EncodedBatch, RawBatch, Views
from hub_ccrop.views.collate import ViewCollate, pil_pipeline
from hub_ccrop.views.eval import EvalCollate, eval_image
from hub_ccrop.views.ops import blur_kernel_size
from hub_ccrop.views.resident import DeviceResidentImages
from hub_ccrop.views.rows import SkipCounter, max_side_for, stack_padded
from hub_ccrop.views.sampler import CropSampler, two_views

__all__ = [
    "BatchedViewAugment",
    "CropSampler",
    "DeviceResidentImages",
    "EncodedBatch",
    "EvalCollate",
    "RawBatch",
    "SkipCounter",
    "ViewCollate",
    "Views",
    "ViewsAugment",
    "blur_kernel_size",
    "eval_image",
    "max_side_for",
    "pil_pipeline",
    "stack_padded",
    "two_views",
]

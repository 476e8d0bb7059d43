"""Recipes: one YAML file per training setting, validated before anything runs.

A recipe has the sections ``model``, ``method``, ``data``, ``crop``, ``optim`` and ``train``, and an optional
``views`` list of view groups (default: two identical views per image, the paper's).
Unknown keys and values of the wrong type or range are refused with the key's dotted name;
``--set section.key=value`` overrides any key (values parse as YAML).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hub_ccrop.checks import RecipeError, check_type
from hub_ccrop.choices import (
    BOX_RULES,
    CROP_MODES,
    HEATMAP_ALIGNMENTS,
    HEATMAP_SOURCES,
    LR_SCALINGS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    SCHEDULES,
    WEIGHT_DECAY_FILTERS,
)

__all__ = ["Recipe", "RecipeError", "ViewGroup", "apply_overrides", "batch_split", "check_type", "load_recipe",
           "per_process_batch"]


@dataclass
class ModelConfig:
    name: str = "resnet18_cifar"  # a timm model name (resnet50, vit_small_patch16_224, ...), hf-hub:ORG/NAME or local-dir:PATH
    args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (model_args)
    channels_last: bool = False  # channels_last memory format (faster convolutions on recent GPUs)
    sync_bn: bool = False  # BatchNorm statistics over all processes (SyncBatchNorm) when there are several


@dataclass
class MethodConfig:
    name: str = "simclr"  # simclr, moco_v1, moco_v2, byol, simsiam, dino, moco_v3 (or mocov3), barlow_twins, vicreg
    options: dict[str, Any] = field(default_factory=dict)  # passed to build_method (temperature, dims, ...)


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # a spec name (cifar10, small_objects, ...) or a Hub id / local path
    data_dir: str | None = None  # local copy: a folder of Hub-style parquet files or an imagefolder tree
    image_column: str | None = None  # the image column instead of the spec's (else "image")
    label_column: str | None = None  # the label column (kNN monitor only; labels never train) instead of the spec's
    image_size: int | None = None  # training (and eval) resolution instead of the spec's
    streaming: bool = False  # stream the dataset (parquet row groups) instead of downloading it first
    batch_size: int = 512  # GLOBAL batch (all processes x grad_accum), as the paper and official configs
    num_workers: int = 4  # DataLoader worker processes per training process
    batched_views: bool = False  # crop/augment whole batches on the training device
    device_resident: bool = False  # keep decoded uint8 images on the device (small datasets)
    holdout: int = 0  # last N rows of the train split held out as the labeled kNN test split
    splits: list[str] | None = None  # pretraining splits instead of the spec's, e.g. ["train[:10000]"]
    train_split: str | None = None  # the kNN monitor's labeled bank instead of the spec's, e.g. "train[:45000]"
    test_split: str | None = None  # the kNN monitor's labeled test split instead of the spec's
    box_column: str | None = None  # a column of ground-truth boxes (one or several per image): box IoU is reported
    box_format: str = "xyxy"  # of box_column: xyxy | xywh | cxcywh (pixels), or with _normalized (fractions)


@dataclass
class CropConfig:
    mode: str = "ccrop"  # ccrop | rcrop (RandomResizedCrop baseline)
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # [min, max] crop area, fraction of the image (or box)
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # [min, max] crop aspect ratio (width / height)
    alpha: float = 0.1  # Beta(alpha, alpha) of the crop centres inside the box (1: uniform; small: spread to the box's edges)
    k: float = 0.1  # heatmap threshold: the box bounds the pixels above k in the min-max normalized heatmap
    heatmap_alignment: str = "receptive_field"  # receptive_field | official (the official code's boxes, for reproduction)
    heatmap: str = "auto"  # auto | cls_attention | feature_norm: where heatmaps come from (auto: the feature map for CNNs; for ViTs the class-token attention, or the token norm in a pass where the attention's boxes fail the follow check)
    box_rule: str = "threshold"  # threshold (the paper's: around every pixel above k) | largest_component | quantile (k: each map's quantile)
    heatmap_flip: bool = True  # average each heatmap with the 180-degree-rotated image's: no positional prior
    follow_images: int = 512  # images per pass also localized through two shifted windows: do boxes follow the content? (0: off)
    localizer: str | None = None  # another backbone, for the passes only (run folder, timm export, hf-hub:ORG/NAME); warmup_epochs 0: a pass before epoch 1
    warmup_epochs: int = 100  # RandomResizedCrop epochs before ContrastiveCrop starts
    loc_interval: int = 100  # localize after every loc_interval epochs once warm-up is over
    loc_epochs: list[int] | None = None  # explicit epochs (1-based, after the epoch) instead of the interval
    loc_batch_size: int | None = None  # GLOBAL batch of the localization pass; default: 2 x data.batch_size
    init_boxes: str | None = None  # a box table (file, run folder or Hub repo) to start from; skips warm-up
    blur: bool = False  # Gaussian blur p=0.5 (ImageNet pipeline)


@dataclass
class ViewGroup:
    """A group of ``count`` crops per image of one size and one augmentation (``views:`` in a recipe).

    ``None`` fields follow the rest of the recipe (``Recipe.view_groups`` fills them in): ``size`` the
    training resolution, ``scale``/``ratio`` ``crop.scale``/``crop.ratio``, ``blur_p`` 0.5 when
    ``crop.blur`` or the dataset asks for blur, else 0.
    """

    count: int = 2  # crops per image in this group
    size: int | None = None  # pixels (square views)
    scale: list[float] | None = None  # crop area range, fraction of the image (of the box for ccrop)
    ratio: list[float] | None = None  # crop aspect-ratio range
    crop: str = "ccrop"  # ccrop: Algorithm 1 inside the image's box once boxes exist | rcrop: the whole image, always
    flip_p: float = 0.5  # probability of a horizontal flip
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of the colour jitter
    gray_p: float = 0.2  # probability of grayscale
    blur_p: float | None = None  # probability of Gaussian blur; None: 0.5 with crop.blur or a dataset that asks for blur, else 0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # [min, max] sigma of the blur, in pixels
    solarize_p: float = 0.0  # probability of solarization


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.5  # base learning rate (see lr_scaling)
    momentum: float = 0.9  # SGD / LARS momentum; AdamW: unused (see betas)
    weight_decay: float = 1e-4  # weight decay (see weight_decay_filter, weight_decay_end)
    schedule: str = "cosine"  # cosine (per epoch, to lr * final_lr_ratio) | step | constant
    final_lr_ratio: float = 0.1  # cosine schedule: the last epoch's lr as a fraction of lr
    milestones: list[int] = field(default_factory=lambda: [60, 80])  # step schedule: epochs (1-based) after which the lr is multiplied by step_factor
    step_factor: float = 0.1  # step schedule: the lr's factor at each milestone
    warmup_epochs: int = 0  # linear LR warm-up
    lr_scaling: str = "none"  # none | linear (lr * global batch / 256)
    per_step: bool = False  # the schedule at every step (fractional epoch) instead of once per epoch
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (per step); None: constant
    weight_decay_filter: str = "all"  # all | no_norm_bias | timm: the parameters exempt from weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2)


@dataclass
class TrainConfig:
    epochs: int = 500  # training epochs
    seed: int = 0  # seeds the model, the data order and every augmentation (runs are reproducible)
    mixed_precision: str | bool = "no"  # no | bf16 | fp16 (YAML's unquoted `no` arrives as false)
    grad_accum: int = 1  # gradient accumulation steps per optimizer step (data.batch_size stays the global batch)
    checkpoint_every: int = 1  # epochs between checkpoints
    checkpoint_every_steps: int | None = None  # also checkpoint every N steps (long epochs)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    knn_every: int = 10  # epochs between kNN monitor evaluations; 0 disables the monitor
    knn_k: int = 200  # kNN monitor: neighbours
    knn_temperature: float = 0.1  # kNN monitor: temperature of the weighted vote
    log_every: int = 10  # steps between logged losses
    log_with: str | list[str] = "tensorboard"  # accelerate tracker(s), e.g. tensorboard, wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab; all (every installed one) or none; logs go to RUN/logs
    show_images: int = 8  # images in each localization picture
    output_dir: str | None = None  # the run folder; default runs/<name> (--output-dir overrides)
    max_steps: int | None = None  # stop (without finishing) after this many steps: debugging and tests


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    views: list[ViewGroup] | None = None  # view groups; None: two identical views (the paper's)
    name: str = "run"  # the run's name (its default folder, its tracker project); default: the recipe file's name
    target: str | None = None  # the paper's reference number for this setting (documentation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def trackers(self) -> list[str]:
        """``train.log_with`` as accelerate's ``log_with`` list (``none``: no tracker)."""
        names = [self.train.log_with] if isinstance(self.train.log_with, str) else list(self.train.log_with)
        return [] if names == ["none"] else names

    def run_dir(self, output_dir: str | Path | None = None) -> Path:
        """The run folder: ``output_dir``, else ``train.output_dir``, else ``runs/<name>``."""
        return Path(output_dir or self.train.output_dir or Path("runs") / self.name)

    def localization_epochs(self) -> list[int]:
        """Epochs (1-based) after which boxes are re-localized; empty for RandomResizedCrop runs."""
        c, epochs = self.crop, self.train.epochs
        if c.mode == "rcrop":
            return []
        if c.loc_epochs is not None:
            return sorted(e for e in c.loc_epochs if e <= epochs)
        first = c.warmup_epochs if c.init_boxes is None else c.loc_interval
        # epoch 0: a pass before the first epoch, with an external localizer and no warm-up
        return list(range(max(first, 0 if c.localizer else 1), epochs, c.loc_interval))

    def view_groups(self, image_size: int, dataset_blur: bool = False) -> list[ViewGroup]:
        """The view groups with every ``None`` filled in (see :class:`ViewGroup`)."""
        c = self.crop
        blur_p = 0.5 if c.blur or dataset_blur else 0.0
        return [dataclasses.replace(
            group, size=group.size or image_size, scale=list(group.scale or c.scale),
            ratio=list(group.ratio or c.ratio), blur_p=blur_p if group.blur_p is None else group.blur_p)
            for group in (self.views or [ViewGroup()])]

    def per_process_batch_size(self, num_processes: int) -> int:
        """``data.batch_size`` (global) / (processes x grad_accum); RecipeError when it does not divide."""
        return per_process_batch(self.data.batch_size, num_processes, self.train.grad_accum)

    def loc_per_process_batch_size(self, num_processes: int) -> int:
        """The localization pass's per-process batch: ``crop.loc_batch_size`` (global, default 2 x
        ``data.batch_size``) / processes."""
        if self.crop.loc_batch_size is None:
            return 2 * self.data.batch_size // num_processes  # 2 x a global batch that divides already
        return per_process_batch(self.crop.loc_batch_size, num_processes, key="crop.loc_batch_size")

    def crop_mode(self, epoch: int) -> str:
        """``"rcrop"`` or ``"ccrop"`` for a 0-based epoch."""
        if self.crop.mode == "rcrop":
            return "rcrop"
        if self.crop.init_boxes is not None:
            return "ccrop"
        return "ccrop" if epoch >= self.crop.warmup_epochs else "rcrop"


_CHOICES = {
    "crop.mode": CROP_MODES,
    "crop.heatmap_alignment": HEATMAP_ALIGNMENTS,
    "crop.heatmap": HEATMAP_SOURCES,
    "crop.box_rule": BOX_RULES,
    "optim.name": OPTIMIZERS,
    "optim.schedule": SCHEDULES,
    "optim.lr_scaling": LR_SCALINGS,
    "optim.weight_decay_filter": WEIGHT_DECAY_FILTERS,
    "train.mixed_precision": MIXED_PRECISIONS,
}
_POSITIVE = {
    "data.batch_size", "data.image_size", "crop.loc_batch_size", "optim.lr", "train.epochs", "train.grad_accum", "crop.loc_interval", "crop.alpha",
    "train.checkpoint_every", "train.keep_checkpoints", "train.knn_k", "train.knn_temperature", "train.log_every",
}
_NON_NEGATIVE = {
    "data.num_workers", "data.holdout", "crop.warmup_epochs", "crop.follow_images", "optim.momentum", "optim.weight_decay",
    "optim.warmup_epochs", "optim.final_lr_ratio", "optim.step_factor", "train.knn_every", "train.show_images",
    "optim.weight_decay_end",
}


def per_process_batch(global_batch: int, num_processes: int, grad_accum: int = 1, key: str = "data.batch_size") -> int:
    """The per-process batch of a global batch split over ``num_processes`` x ``grad_accum`` steps.

    Raise :class:`RecipeError` naming ``key`` when it does not divide evenly (the paper's batch sizes are
    global: a silent rounding would train another setting)."""
    parts = num_processes * grad_accum
    if global_batch % parts:
        accum = f" x {grad_accum} accumulation steps" if grad_accum > 1 else ""
        lower = max(parts, global_batch // parts * parts)
        raise RecipeError(
            f"{key}={global_batch} is the global batch and does not divide over {num_processes} process(es){accum}: "
            f"set {key} to a multiple of {parts} (e.g. --set {key}={lower})")
    return global_batch // parts


def batch_split(global_batch: int, num_processes: int, grad_accum: int = 1) -> str:
    """``"global batch 512 = 2 processes x 256"`` (the run's start line)."""
    per = per_process_batch(global_batch, num_processes, grad_accum)
    processes = f"{num_processes} process{'es' if num_processes > 1 else ''}"
    accum = f" x {grad_accum} accumulation steps" if grad_accum > 1 else ""
    return f"global batch {global_batch} = {processes}{accum} x {per}"


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise RecipeError(f"unknown recipe key {dotted!r}{hint}; known keys: {', '.join(sorted(known))}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{dotted}.")
        elif key == "views" and value is not None:  # the one list of sections
            if not isinstance(value, list) or not value:
                raise RecipeError(f"{dotted}: expected a non-empty list of view groups, got {value!r}")
            kwargs[key] = [_build(ViewGroup, group, f"{dotted}[{i}].") for i, group in enumerate(value)]
        else:
            kwargs[key] = check_type(value, hints[key], dotted)
    return cls(**kwargs)


def _validate(recipe: Recipe) -> None:
    if recipe.train.mixed_precision is False:
        recipe.train.mixed_precision = "no"
    for key, choices in _CHOICES.items():
        value = _get(recipe, key)
        if value not in choices:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE | _NON_NEGATIVE:
        value = _get(recipe, key)
        if value is not None and (value <= 0 if key in _POSITIVE else value < 0):
            raise RecipeError(f"{key}: must be {'> 0' if key in _POSITIVE else '>= 0'}, got {value!r}")
    c = recipe.crop
    _check_range("crop.scale", c.scale, upper=1.0)
    _check_range("crop.ratio", c.ratio)
    for i, group in enumerate(recipe.views or []):
        _check_view_group(group, f"views[{i}]")
    if len(recipe.optim.betas) != 2 or not all(0 <= b < 1 for b in recipe.optim.betas):
        raise RecipeError(f"optim.betas: expected [beta1, beta2] in [0, 1), got {recipe.optim.betas}")
    if not 0 <= c.k < 1:
        raise RecipeError(f"crop.k: the heatmap threshold must be in [0, 1), got {c.k}")
    if c.mode == "ccrop" and c.init_boxes is None and c.warmup_epochs >= recipe.train.epochs:
        raise RecipeError(
            f"crop.warmup_epochs ({c.warmup_epochs}) must be below train.epochs ({recipe.train.epochs}) "
            "for a ContrastiveCrop run (or set crop.mode: rcrop, or crop.init_boxes)"
        )
    if c.loc_epochs is not None and any(e < (0 if c.localizer else 1) for e in c.loc_epochs):
        raise RecipeError(f"crop.loc_epochs: epochs are 1-based (localize after that epoch; 0, before the first, "
                          f"only with crop.localizer), got {c.loc_epochs}")
    if c.localizer is not None:
        from hub_ccrop.localize import check_localizer_source

        if problem := check_localizer_source(c.localizer):
            raise RecipeError(f"crop.localizer: {problem}")
    if recipe.data.holdout and (recipe.data.splits or recipe.data.train_split or recipe.data.test_split):
        raise RecipeError("data.holdout and data.splits/train_split/test_split exclude each other: slice the "
                          "splits yourself, e.g. splits: ['train[:-5000]'], train_split: 'train[:-5000]', "
                          "test_split: 'train[-5000:]'")
    if recipe.data.streaming and recipe.data.device_resident:
        raise RecipeError("data.device_resident needs a map-style dataset: set data.streaming: false")
    if recipe.data.device_resident and not recipe.data.batched_views:
        raise RecipeError("data.device_resident works with the batched views path: set data.batched_views: true")
    _check_trackers(recipe)
    _check_names(recipe)


def _check_range(key: str, values: list[float], upper: float | None = None) -> None:
    """A ``[min, max]`` range with ``0 < min <= max`` (``<= upper`` when given)."""
    if len(values) != 2 or not 0 < values[0] <= values[1] or (upper is not None and values[1] > upper):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise RecipeError(f"{key}: expected [min, max] with 0 < min <= max{bound}, got {values}")


def _check_view_group(group: ViewGroup, key: str) -> None:
    if group.count < 1:
        raise RecipeError(f"{key}.count: must be >= 1, got {group.count}")
    if group.size is not None and group.size < 1:
        raise RecipeError(f"{key}.size: must be > 0, got {group.size}")
    if group.crop not in CROP_MODES:
        raise RecipeError(f"{key}.crop: {group.crop!r} is not one of {', '.join(CROP_MODES)}")
    if group.scale is not None:
        _check_range(f"{key}.scale", group.scale, upper=1.0)
    if group.ratio is not None:
        _check_range(f"{key}.ratio", group.ratio)
    _check_range(f"{key}.blur_sigma", group.blur_sigma)
    if len(group.jitter) != 4 or min(group.jitter) < 0 or group.jitter[3] > 0.5:
        raise RecipeError(f"{key}.jitter: expected [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, "
                          f"got {group.jitter}")
    for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
        p = getattr(group, name)
        if p is not None and not 0 <= p <= 1:
            raise RecipeError(f"{key}.{name}: a probability in [0, 1], got {p}")


def _check_trackers(recipe: Recipe) -> None:
    """``train.log_with``: accelerate's tracker names, each installed (a missing one fails here, not at step 1)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    names = recipe.trackers()
    if "none" in names:
        raise RecipeError("train.log_with: 'none' stands alone (no tracker); give it without other trackers")
    for name in names:
        if name not in known:
            raise RecipeError(f"train.log_with: unknown tracker {name!r}{_did_you_mean(name, known)}; "
                              f"choose from {', '.join(known)} or none")
        if name != "all" and name not in available:
            raise RecipeError(f"train.log_with: {name} is not installed: pip install {name.replace('_', '-')} "
                              f"(installed: {', '.join(sorted(available)) or 'none'})")


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _check_names(recipe: Recipe) -> None:
    """Model, method (and its options) and dataset: checked here, before any data is read or folder made."""
    import timm

    import hub_ccrop.models  # noqa: F401  (registers the CIFAR-stem ResNets with timm)
    from hub_ccrop.data import BOX_FORMATS, is_hub_id, list_specs, looks_like_path
    from hub_ccrop.methods import METHODS, canonical_method, method_config

    model = recipe.model.name
    if model.startswith("local-dir:") and not Path(model.removeprefix("local-dir:")).expanduser().is_dir():
        raise RecipeError(f"model.name: {model}: no such folder")
    if not model.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(model):
        raise RecipeError(f"model.name: unknown timm model {model!r}{_did_you_mean(model, timm.list_models())}; "
                          "list them with timm.list_models()")
    method = canonical_method(recipe.method.name)
    if method not in METHODS:
        raise RecipeError(f"method.name: unknown method {recipe.method.name!r}{_did_you_mean(method, list(METHODS))}; "
                          f"choose one of {', '.join(METHODS)}")
    try:
        method_config(method, **recipe.method.options)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"method.options: {err}") from None
    d = recipe.data
    if d.dataset not in list_specs() and not Path(d.dataset).expanduser().exists() and looks_like_path(d.dataset):
        raise RecipeError(f"data.dataset: folder {d.dataset} does not exist: fix the path (a folder of images, in "
                          "class subfolders if they have labels, or of parquet files)")
    if d.dataset not in list_specs() and not Path(d.dataset).expanduser().exists() and not is_hub_id(d.dataset):
        raise RecipeError(f"data.dataset: unknown dataset {d.dataset!r}{_did_you_mean(d.dataset, list_specs())}; "
                          f"use one of {', '.join(list_specs())}, a Hub id (ORG/NAME) or an existing local folder")
    if d.box_format not in BOX_FORMATS:
        raise RecipeError(f"data.box_format: {d.box_format!r} is not one of {', '.join(BOX_FORMATS)}")
    if d.data_dir is not None and not Path(d.data_dir).expanduser().is_dir():
        raise RecipeError(f"data.data_dir: folder {d.data_dir} does not exist: fix the path, or download the "
                          "dataset there first (a folder of its parquet files, as on the Hub)")


def _get(recipe: Recipe, dotted: str) -> Any:
    obj: Any = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {dotted}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item}: the value is not valid YAML (quote it?): {err}") from None
    return raw


def load_recipe(path_or_dict: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise :class:`RecipeError` with the offending key."""
    if isinstance(path_or_dict, dict):
        raw, source = dict(path_or_dict), "recipe"
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path} is not valid YAML: {err}") from err
        source = str(path)
        raw.setdefault("name", path.stem)
    try:
        recipe = _build(Recipe, apply_overrides(raw, overrides or []), "")
        _validate(recipe)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe

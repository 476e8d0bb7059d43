"""``RUN/run.json``: what a training run records about itself, written and read only here.

``train`` writes it at the end of a run; ``hub.export_run``, ``evaluate.load_backbone`` and ``show`` read
the run folder through :class:`RunInfo`. The dataset is the full :class:`~hub_ccrop.data.DatasetSpec` the
run trained on (``data_dir``, columns, splits, image size, recipe overrides), so ``show`` and the model
card see the same data. Files written before the spec was recorded (no ``version``) still load: their
dataset is rebuilt from its registered name and the fields they kept.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_ccrop.data import DatasetSpec, get_spec, list_specs
from hub_ccrop.errors import UserError

__all__ = ["RUN_FILE", "RunInfo", "Schedule"]

RUN_FILE = "run.json"
VERSION = 2  # 2: "dataset" holds the whole DatasetSpec (1, unversioned: name, hub id, splits and columns only)


@dataclass(frozen=True)
class Schedule:
    """The crop schedule: ContrastiveCrop or the RandomResizedCrop baseline, its passes and box settings."""

    crop: str  # ccrop | rcrop
    k: float  # heatmap threshold of the box
    alpha: float  # Beta(alpha, alpha) of the crop centres
    warmup_epochs: int | None = None
    loc_epochs: tuple[int, ...] = ()  # epochs after which a localization pass ran
    heatmap_alignment: str = "receptive_field"  # older runs all used it
    box_rule: str = "threshold"  # older runs all used the paper's rule, without flip averaging
    heatmap_flip: bool = False
    localizer: str | None = None  # None: the backbone being trained

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Schedule:
        loc_epochs = tuple(int(e) for e in raw.get("loc_epochs") or ())
        # early runs did not record the mode: a run with passes used ContrastiveCrop
        crop = str(raw.get("crop") or ("ccrop" if loc_epochs else "rcrop")).lower()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known} | {"crop": crop, "loc_epochs": loc_epochs})


@dataclass(frozen=True)
class RunInfo:
    """A run's backbone (timm name, args, preprocessing), data, method, batch and schedule."""

    model: str  # timm model name
    model_args: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None  # (3, S, S), the training resolution
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None  # eval centre crop; None: by input size, see :attr:`eval_crop_pct`
    method: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetSpec | None = None  # the spec pretraining read (None for a hand-made backbone folder)
    num_rows: int | None = None  # box table size
    fingerprint: str | None = None  # of the pretraining data, checked against box tables
    epochs: int | None = None
    batch_size: int | None = None  # global: all processes x grad_accum
    num_processes: int = 1
    grad_accum: int = 1
    per_process_batch_size: int | None = None
    schedule: Schedule | None = None
    license: str = "other"
    target: str | None = None  # the paper's reference number for the recipe's setting

    @property
    def eval_crop_pct(self) -> float:
        """The recorded crop_pct, else native-size eval for small images (<= 96 px), resize 256 / crop 224 style otherwise."""
        if self.crop_pct is not None:
            return self.crop_pct
        return 1.0 if self.input_size is None or self.input_size[-1] <= 96 else 0.875

    def data_config(self) -> dict[str, Any]:
        """timm ``pretrained_cfg`` entries (input size, crop_pct, mean, std) the run recorded."""
        cfg: dict[str, Any] = {}
        if self.input_size is not None:
            cfg |= {"input_size": self.input_size, "crop_pct": self.eval_crop_pct}
        if self.mean is not None:
            cfg["mean"] = self.mean
        if self.std is not None:
            cfg["std"] = self.std
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout: flat fields; ``dataset`` is the spec plus ``num_rows`` and ``fingerprint``."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        dataset = self.dataset.to_dict() if self.dataset is not None else {}
        raw["dataset"] = dataset | {"num_rows": raw.pop("num_rows"), "fingerprint": raw.pop("fingerprint")}
        raw["schedule"] = dataclasses.asdict(self.schedule) if self.schedule is not None else None
        return {"version": VERSION, **raw}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = RUN_FILE) -> RunInfo:
        """Read the JSON layout (either version); a missing or malformed field is a :class:`UserError`."""
        if not isinstance(raw.get("model"), str):
            raise UserError(f"{source}: no 'model' (the timm model name); a run folder's run.json is written by "
                            "`hub-ccrop train`")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in raw.items() if k in known and v is not None}
        dataset = dict(raw.get("dataset") or {})
        fields["num_rows"] = dataset.pop("num_rows", None)
        fields["fingerprint"] = dataset.pop("fingerprint", None)
        try:
            if fields.get("input_size") is not None:
                fields["input_size"] = _input_size(fields["input_size"])
            for key in ("mean", "std"):
                if key in fields:
                    fields[key] = tuple(float(v) for v in fields[key])
            schedule = fields.pop("schedule", None)
            fields["schedule"] = Schedule.from_dict(schedule) if schedule else None
            spec_of = _spec if raw.get("version", 1) >= 2 else _legacy_spec
            fields["dataset"] = spec_of(dataset, fields) if dataset else None
            return cls(**fields)
        except (TypeError, ValueError, KeyError) as err:
            raise UserError(f"{source}: malformed run info ({err}); re-run `hub-ccrop train` or fix the file") from None

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / RUN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> RunInfo:
        """The run info of a run folder; ``FileNotFoundError`` when it has no run.json."""
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {Path(run_dir)} a hub_ccrop run folder?")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err}); re-run `hub-ccrop train` or fix the file") from None
        return cls.from_dict(raw, str(path))


def _input_size(value: Any) -> tuple[int, int, int]:
    """``32``, ``[32, 32]`` or ``[3, 32, 32]`` -> ``(3, 32, 32)`` (hand-made run folders use the short forms)."""
    if isinstance(value, int):
        return (3, value, value)
    size = tuple(int(v) for v in value)
    if len(size) == 2:
        return (3, *size)
    if len(size) != 3:
        raise ValueError(f"input_size {value!r} is not S, [H, W] or [C, H, W]")
    return size  # type: ignore[return-value]


def _spec(dataset: dict[str, Any], fields: dict[str, Any]) -> DatasetSpec:
    """The recorded DatasetSpec (its JSON form: lists for tuples, ``data_files`` as [split, [files]] pairs)."""
    if dataset.get("data_files") is not None:
        dataset["data_files"] = {split: tuple(files) for split, files in dataset["data_files"]}
    return DatasetSpec(**dataset)


def _legacy_spec(dataset: dict[str, Any], fields: dict[str, Any]) -> DatasetSpec | None:
    """A version-1 dataset: the registered spec of that name (or the Hub id) with the fields the file kept.

    ``data_dir`` and other overrides were not recorded: such runs read the spec's own source again.
    """
    kept = {key: dataset[old] for key, old in (("pretrain_splits", "splits"), ("image_column", "image_column"),
                                                 ("label_column", "label_column"), ("train_split", "train_split"),
                                                 ("test_split", "test_split")) if dataset.get(old) is not None}
    if "input_size" in fields:
        kept["image_size"] = fields["input_size"][-1]
    kept |= {key: fields[key] for key in ("mean", "std") if key in fields}
    name, hub_id = dataset.get("name"), dataset.get("hub_id")
    if name in list_specs():
        return get_spec(name, **kept)
    return DatasetSpec(name=name or hub_id, hub_id=hub_id, **kept) if hub_id else None

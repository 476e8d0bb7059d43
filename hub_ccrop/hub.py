"""Export, publish and load: timm weights, box tables and model cards on the Hugging Face Hub.

``export_run(RUN, OUT)`` turns a training run folder into a folder that is a valid timm Hub repo
(``model.safetensors`` + ``config.json`` written by timm's ``save_for_hf``) plus the box table, the recipe,
the metrics, a picture and a model card. ``publish_run`` creates the Hub repo and uploads that folder.
Users load the backbone with ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` and the boxes with
``load_boxes("ORG/NAME")``.

Tokens come only from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); this module never
prints, logs or writes one, and refuses to upload a folder that contains the active token.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from hub_ccrop.boxes import ID_SCHEME, BoxTable, BoxTableMismatch
from hub_ccrop.errors import UserError
from hub_ccrop.run_info import RUN_FILE, RunInfo

__all__ = [
    "EXPORT_FILES",
    "BoxTableMismatch",
    "PAPER_ARXIV_ID",
    "PAPER_CITATION",
    "PAPER_LINEAR_TOP1",
    "PublishError",
    "PublishResult",
    "add_cli",
    "build_model_card",
    "export_boxes_dataset",
    "export_run",
    "load_boxes",
    "paper_reference",
    "publish_run",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------
# The paper: citation and reference numbers (docs/METHOD.md, section 6)
# ------------------------------------------------------------------------------------------------------------

PAPER_TITLE = "Crafting Better Contrastive Views for Siamese Representation Learning"
PAPER_ARXIV_ID = "2202.03278"
PAPER_CITATION = """@inproceedings{peng2022crafting,
  title     = {Crafting Better Contrastive Views for Siamese Representation Learning},
  author    = {Peng, Xiangyu and Wang, Kai and Zhu, Zheng and Wang, Mang and You, Yang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""

# Linear top-1 (%) of the paper, (R-Crop, C-Crop), keyed by (method, dataset) as normalized by
# `paper_reference`. Table 1: ResNet-18 with the CIFAR stem, 500 epochs. Table 2: ResNet-50 on IN-1K, 100 epochs.
PAPER_LINEAR_TOP1: dict[tuple[str, str], tuple[float, float]] = {
    ("simclr", "cifar10"): (89.63, 90.08),
    ("simclr", "cifar100"): (60.30, 61.91),
    ("simclr", "tiny-imagenet"): (45.19, 46.21),
    ("simclr", "stl10"): (88.95, 89.53),
    ("moco", "cifar10"): (86.73, 88.78),
    ("moco", "cifar100"): (56.10, 57.65),
    ("moco", "tiny-imagenet"): (47.09, 47.98),
    ("moco", "stl10"): (89.17, 89.81),
    ("byol", "cifar10"): (91.96, 92.54),
    ("byol", "cifar100"): (63.75, 64.62),
    ("byol", "tiny-imagenet"): (46.08, 47.23),
    ("byol", "stl10"): (91.84, 92.42),
    ("simsiam", "cifar10"): (90.96, 91.48),
    ("simsiam", "cifar100"): (64.79, 65.82),
    ("simsiam", "tiny-imagenet"): (43.03, 44.54),
    ("simsiam", "stl10"): (89.39, 89.83),
    ("simclr", "imagenet-1k"): (61.60, 61.85),
    ("moco_v1", "imagenet-1k"): (57.25, 58.34),
    ("moco_v2", "imagenet-1k"): (64.40, 64.89),
    ("simsiam", "imagenet-1k"): (65.62, 65.95),
}
PAPER_SETTINGS = {
    "small": "Table 1 of the paper (ResNet-18 with the CIFAR stem, 500 epochs, batch 512, k=0.1, alpha=0.1)",
    "imagenet-1k": "Table 2 of the paper (ResNet-50, 100 epochs, k=0.1, alpha=0.6)",
}
_METHOD_NAMES = {"simclr": "SimCLR", "moco": "MoCo", "moco_v1": "MoCo v1", "moco_v2": "MoCo v2",
                 "byol": "BYOL", "simsiam": "SimSiam"}
_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tiny-imagenet": "Tiny ImageNet",
                  "stl10": "STL-10", "imagenet-1k": "ImageNet-1K"}


def _method_key(method: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", method.lower())
    return {"mocov1": "moco_v1", "mocov2": "moco_v2"}.get(key, key)


def _dataset_key(dataset: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", dataset.lower().rsplit("/", 1)[-1])
    aliases = {"tinyimagenet": "tiny-imagenet", "tinyimagenet200": "tiny-imagenet", "imagenet1k": "imagenet-1k",
               "imagenet": "imagenet-1k", "in1k": "imagenet-1k", "ilsvrc2012": "imagenet-1k"}
    return aliases.get(key, key)


def paper_reference(method: str, dataset: str) -> tuple[float, float] | None:
    """The paper's linear top-1 (R-Crop, C-Crop) for a method and dataset name or Hub id, or None."""
    m, d = _method_key(method), _dataset_key(dataset)
    if d != "imagenet-1k" and m.startswith("moco"):
        m = "moco"  # Table 1 has one MoCo row
    elif d == "imagenet-1k" and m == "moco":
        m = "moco_v1"
    return PAPER_LINEAR_TOP1.get((m, d))


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------

# model_cards/template.md, shipped inside the package through this link (see pyproject package-data)
TEMPLATE_PATH = Path(__file__).parent / "model_card_template.md"
PICTURE_NAME = "boxes_and_crops.png"
EXPORT_FILES = ("README.md", "config.json", "model.safetensors", "boxes.parquet", "boxes.safetensors",
                "recipe.yaml", "metrics.json", PICTURE_NAME)
_SECRET_KEY = re.compile(r"token|secret|password|api_key|apikey|credential", re.IGNORECASE)
_PLACEHOLDER_REPO = "ORG/NAME"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a hub_ccrop run folder?")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _ensure_architecture(name: str) -> bool:
    """Make sure timm knows ``name``; True when it comes from hub_ccrop (users must ``import hub_ccrop``)."""
    import timm

    if not timm.is_model(name):
        try:
            import hub_ccrop.models  # noqa: F401  (registers the CIFAR-stem ResNets with timm)
        except ImportError as e:  # pragma: no cover - models.py is part of the package
            raise ValueError(f"unknown timm architecture {name!r} (and hub_ccrop.models failed: {e})") from e
    if not timm.is_model(name):
        raise ValueError(f"unknown timm architecture {name!r}")
    return not timm.models.model_entrypoint(name).__module__.startswith("timm.")


def _dataset_names(run: RunInfo, unknown: str) -> tuple[str, str, str | None]:
    """(display name, key into the paper's tables, Hub id) of the run's pretraining data."""
    spec = run.dataset
    hub_id = spec.hub_id if spec is not None else None
    name = spec.name if spec is not None else unknown
    key = _dataset_key(hub_id or name)
    return _DATASET_NAMES.get(key, name), key, hub_id


def _clean_pretrained_cfg(model: torch.nn.Module, run: RunInfo) -> dict[str, Any]:
    """A pretrained_cfg that describes these weights only (no URL, hub id, tag or notes of timm's defaults)."""
    base = getattr(model, "pretrained_cfg", {}) or {}
    method = _METHOD_NAMES.get(_method_key(run.method or ""), run.method or "")
    name = _dataset_names(run, "unknown data")[0]
    return {
        "architecture": run.model,
        **run.data_config(),  # input size, crop_pct, mean, std
        "fixed_input_size": bool(base.get("fixed_input_size", False)),
        "interpolation": run.interpolation,
        "crop_mode": "center",
        "num_classes": 0,
        "pool_size": None,
        "first_conv": base.get("first_conv"),
        "classifier": base.get("classifier"),
        "license": run.license,
        "description": f"{method} + ContrastiveCrop self-supervised backbone, pretrained on {name} (hub_ccrop)",
        "paper_name": PAPER_TITLE,
        "paper_ids": f"arXiv:{PAPER_ARXIV_ID}",
    }


def _build_backbone(run: RunInfo, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    import timm

    _ensure_architecture(run.model)
    model_args = {**run.model_args, "num_classes": 0}
    model = timm.create_model(run.model, pretrained=False, **model_args)
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"backbone.safetensors does not fit {run.model} with model_args={model_args}: {e}"
        ) from e
    return model.eval()


def _write_recipe(src: Path, dst: Path) -> None:
    """Copy the recipe, redacting values of keys that look like credentials."""
    text = src.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    redacted = False

    def scrub(node: Any) -> Any:
        nonlocal redacted
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "", False, True):
                    out[k] = "<redacted>"
                    redacted = True
                else:
                    out[k] = scrub(v)
            return out
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    data = scrub(data)
    if redacted:
        dst.write_text("# credentials redacted by hub_ccrop export\n" + yaml.safe_dump(data, sort_keys=False))
    else:
        shutil.copyfile(src, dst)


def _table_picture(run_dir: Path, table: BoxTable | None) -> Path | None:
    """The picture training drew of exactly the exported boxes: the localization pass that made the table."""
    epoch = table.metadata.get("epoch") if table is not None else None
    if epoch is None:  # e.g. boxes from crop.init_boxes, never re-localized: no picture of them
        return None
    picture = run_dir / "pictures" / f"localization_epoch_{int(epoch):04d}.png"
    return picture if picture.is_file() else None


def _load_run_boxes(run_dir: Path) -> BoxTable | None:
    for name in ("boxes.parquet", "boxes.safetensors"):
        if (run_dir / name).is_file():
            return BoxTable.load(run_dir / name)
    return None


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    contents = {p.name for p in out_dir.iterdir()}
    if not contents:
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--force) to replace an earlier export")
    unknown = contents - set(EXPORT_FILES) - {".cache"}
    if unknown:
        raise FileExistsError(
            f"refusing to replace {out_dir}: it holds files that an export does not write ({sorted(unknown)[:5]})"
        )


def _require_preprocessing(run: RunInfo, run_dir: Path) -> None:
    """The model card and timm's config need the backbone's input size and normalization."""
    missing = [key for key in ("input_size", "mean", "std") if getattr(run, key) is None]
    if missing:
        raise UserError(f"{run_dir / RUN_FILE} lacks {', '.join(missing)}: add them (the model's input size and "
                        "normalization) or re-run `hub-ccrop train`")


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of the run, with the ``eval_knn``/``eval_linear`` results written next to it."""
    metrics = _read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    for name in ("eval_knn", "eval_linear"):  # written next to the run by `hub-ccrop eval-knn/eval-linear RUN`
        if (run_dir / f"{name}.json").is_file():
            metrics[name] = _read_json(run_dir / f"{name}.json")
    return metrics


@contextmanager
def _staged_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh folder next to ``out_dir`` that replaces ``out_dir`` when the block succeeds; removed otherwise."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_weights(run_dir: Path, run: RunInfo, folder: Path) -> tuple[torch.nn.Module, bool]:
    """Weights + config through timm's own writer, with a clean pretrained_cfg.

    Returns the backbone and whether loading it needs ``import hub_ccrop`` (an architecture timm lacks).
    """
    import safetensors.torch
    from timm.models import save_for_hf

    weights = run_dir / "backbone.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (the run's final backbone)")
    state_dict = safetensors.torch.load_file(str(weights), device="cpu")
    model = _build_backbone(run, state_dict)
    needs_import = _ensure_architecture(run.model)
    cfg = _clean_pretrained_cfg(model, run)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    data_config = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    save_for_hf(model, str(folder), safe_serialization=True, data_config=data_config)
    return model, needs_import


def _write_boxes(run_dir: Path, run: RunInfo, folder: Path) -> BoxTable | None:
    """The run's box table in both formats, its metadata completed and checked against the run's dataset."""
    table = _load_run_boxes(run_dir)
    if table is None:
        return None
    spec = run.dataset
    table.metadata.setdefault("dataset", (spec.hub_id or spec.name) if spec is not None else None)
    table.metadata.setdefault("split", "+".join(spec.pretrain_splits) if spec is not None else None)
    table.metadata.setdefault("backbone", run.model)
    table.metadata.setdefault("k", run.schedule.k if run.schedule is not None else None)
    if run.fingerprint is not None:
        table.metadata.setdefault("fingerprint", run.fingerprint)
    table.check_compatible(num_rows=run.num_rows, fingerprint=run.fingerprint, source=f"{run_dir}/boxes")
    table.save(folder / "boxes.parquet")
    table.save(folder / "boxes.safetensors")
    return table


def _write_recipe_and_metrics(run_dir: Path, metrics: Mapping[str, Any], folder: Path) -> None:
    """``recipe.yaml`` (credentials redacted) and ``metrics.json`` of the export."""
    if (run_dir / "recipe.yaml").is_file():
        _write_recipe(run_dir / "recipe.yaml", folder / "recipe.yaml")
    with (folder / "metrics.json").open("w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    template: str | os.PathLike | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a timm Hub repo folder for a run: weights, config, boxes, recipe, metrics, picture, model card.

    ``repo_id`` fills the card's usage snippets (``ORG/NAME`` when unknown). The folder is built next to
    ``out_dir`` and moved into place at the end; ``verify`` reloads it with ``timm.create_model("local-dir:...")``
    and checks that the weights are bit-identical. Returns ``out_dir``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = RunInfo.load(run_dir)
    _require_preprocessing(run, run_dir)
    metrics = _run_metrics(run_dir)
    _prepare_out_dir(out_dir, overwrite)
    with _staged_folder(out_dir) as tmp:
        model, needs_import = _write_weights(run_dir, run, tmp)
        table = _write_boxes(run_dir, run, tmp)
        _write_recipe_and_metrics(run_dir, metrics, tmp)
        picture = _table_picture(run_dir, table)
        if picture is not None:
            shutil.copyfile(picture, tmp / PICTURE_NAME)
        card = build_model_card(
            run, metrics, repo_id=repo_id, boxes=table, picture=PICTURE_NAME if picture else None,
            needs_import=needs_import, num_features=int(getattr(model, "num_features", 0)),
            has_recipe=(tmp / "recipe.yaml").is_file(), template=template,
        )
        card.save(tmp / "README.md")
        if verify:
            _verify_export(tmp, model)
    logger.info("exported %s to %s", run_dir, out_dir)
    return out_dir


def _verify_export(folder: Path, model: torch.nn.Module) -> None:
    """Reload the folder the way users will and compare the weights bit for bit."""
    import timm

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    ours, theirs = model.state_dict(), loaded.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise RuntimeError(f"export check failed: timm's local-dir:{folder} does not reproduce the backbone")


# ------------------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------------------


def _number(value: Any, digits: int = 2) -> float | None:
    """A finite number rounded for the card (accuracies are percentages, as train/evaluate write them)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return round(float(value), digits)


KNN_SOURCES = {
    "train": "the training run's kNN monitor after its last epoch (`metrics.json`, the number `hub-ccrop train` "
             "printed in its summary)",
    "eval": "`hub-ccrop eval knn` after training (`eval_knn.json`)",
}


def _card_results(run: RunInfo, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """kNN and linear top-1 with their split, protocol and source, from metrics.json and the eval_*.json it carries.

    The kNN number has one source, named on the card: the training summary's (``knn_top1`` of metrics.json)
    when the run had the monitor, else ``hub-ccrop eval knn``'s. The linear number comes from
    ``hub-ccrop eval linear`` (``eval_linear``) or a plain ``linear_top1``.
    """
    test_split = run.dataset.test_split if run.dataset is not None else None
    default_split = str(test_split or metrics.get("eval_split") or "test")
    lin_eval = dict(metrics.get("eval_linear") or {})
    knn_source = "train" if _number(metrics.get("knn_top1")) is not None else "eval"
    if knn_source == "train":
        knn_eval = {"top1": metrics["knn_top1"], "k": metrics.get("knn_k"),
                    "temperature": metrics.get("knn_temperature"), "test_split": metrics.get("eval_split")}
    else:
        knn_eval = dict(metrics.get("eval_knn") or {})
    k, temperature = knn_eval.get("k"), knn_eval.get("temperature")
    knn_settings = f"k={k}, T={temperature}" if k is not None and temperature is not None else ""
    protocol = str(lin_eval.get("protocol", ""))
    paper_protocol = protocol.startswith("linear-probe (paper)")
    if paper_protocol:
        linear_name = "Linear probe top-1 (paper protocol, last epoch)"
    elif protocol:
        linear_name = f"Linear probe top-1 ({protocol.split(' (')[0]}, not the paper's protocol)"
    else:
        linear_name = "Linear probe top-1"
    return {
        "knn_top1": _number(knn_eval.get("top1")),
        "knn_split": str(knn_eval.get("test_split") or default_split),
        "knn_name": f"kNN top-1 ({knn_settings})" if knn_settings else "kNN top-1",
        "knn_source": KNN_SOURCES[knn_source],
        "later_knn": dict(metrics["eval_knn"]) if knn_source == "train" and metrics.get("eval_knn") else None,
        "linear_source": "`hub-ccrop eval linear` after training (`eval_linear.json`)" if lin_eval else "`metrics.json`",
        "linear_top1": _number(lin_eval.get("top1", metrics.get("linear_top1"))),
        "linear_split": str(lin_eval.get("test_split") or default_split),
        "linear_name": linear_name,
        "linear_paper_protocol": paper_protocol or not protocol,
    }


def _format_epochs(epochs: Sequence[Any] | None) -> str:
    return ", ".join(str(e) for e in epochs) if epochs else "none"


_CCROP_NAMES = ("ccrop", "c-crop", "contrastivecrop", "contrastive_crop")


def _card_eval_results(results: Mapping[str, Any], dataset_type: str, dataset_name: str) -> list[Any]:
    """The card metadata's ``model-index`` entries: kNN and linear top-1, where measured."""
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=results[f"{kind}_split"],
            metric_type="accuracy", metric_name=results[f"{kind}_name"], metric_value=results[f"{kind}_top1"],
        )
        for kind in ("knn", "linear")
        if results[f"{kind}_top1"] is not None
    ]


def _card_model_name(run: RunInfo, repo_id: str, method_key: str, uses_ccrop: bool, dataset_key: str) -> str:
    """The repo's name, else (no repo id yet) ``ARCH-METHOD-ccrop|rcrop-DATASET``."""
    if repo_id != _PLACEHOLDER_REPO:
        return repo_id.split("/")[-1]
    return f"{run.model}-{method_key.replace('_', '')}-{'ccrop' if uses_ccrop else 'rcrop'}-{dataset_key}"


def _card_metadata(
    run: RunInfo, model_name: str, method_key: str, hub_id: str | None, eval_results: list[Any]
) -> Any:
    """The card's YAML header (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    tags = ["timm", "image-feature-extraction", "self-supervised-learning", "contrastive-learning",
            "contrastive-crop", "hub-ccrop", method_key.replace("_", "-"), f"arxiv:{PAPER_ARXIV_ID}"]
    return ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        license=run.license,
        tags=tags,
        datasets=[hub_id] if hub_id and "/" in str(hub_id) else None,
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )


def _card_training(run: RunInfo) -> dict[str, Any]:
    """The template's pretraining section: data, schedule and preprocessing."""
    schedule = run.schedule
    input_size = list(run.input_size or ())
    return dict(
        dataset_splits=", ".join(run.dataset.pretrain_splits) if run.dataset is not None else "unknown",
        dataset_num_rows=run.num_rows,
        epochs=run.epochs,
        batch_size=run.batch_size,
        warmup_epochs=schedule.warmup_epochs if schedule is not None else None,
        loc_epochs=_format_epochs(schedule.loc_epochs if schedule is not None else None),
        k=schedule.k if schedule is not None else None,
        alpha=schedule.alpha if schedule is not None else None,
        input_size=input_size,
        image_size=input_size[-1],
        mean=list(run.mean or ()),
        std=list(run.std or ()),
        interpolation=run.interpolation,
        crop_pct=run.eval_crop_pct,
    )


def _card_metrics(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The template's results section: kNN/linear top-1 (``_card_results``), box IoU, the other metrics."""
    extra_metrics = {k: _number(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                     if k not in ("knn_top1", "linear_top1", "box_iou") and isinstance(v, (int, float, str))}
    return dict(**results, box_iou=_number(metrics.get("box_iou"), 4), extra_metrics=extra_metrics)


def _card_paper(method_key: str, dataset_key: str) -> dict[str, Any]:
    """The template's comparison with the paper and its citation."""
    ref = paper_reference(method_key, dataset_key)
    return dict(
        paper_rcrop=ref[0] if ref else None,
        paper_ccrop=ref[1] if ref else None,
        paper_setting=PAPER_SETTINGS["imagenet-1k" if dataset_key == "imagenet-1k" else "small"],
        paper_title=PAPER_TITLE,
        paper_arxiv_id=PAPER_ARXIV_ID,
        citation=PAPER_CITATION,
    )


def _card_files(boxes: BoxTable | None, picture: str | None, has_recipe: bool) -> dict[str, Any]:
    """The template's section on the other files of the repo: picture, recipe, box table."""
    box_meta = dict(boxes.metadata) if boxes is not None else {}
    return dict(
        picture=picture,
        picture_epoch=box_meta.get("epoch"),
        has_recipe=has_recipe,
        has_boxes=boxes is not None,
        boxes_num_rows=len(boxes) if boxes is not None else None,
        boxes_epoch=box_meta.get("epoch"),
        boxes_fingerprint=box_meta.get("fingerprint"),
        boxes_id_scheme=box_meta.get("id_scheme", ID_SCHEME),
    )


def build_model_card(
    run: RunInfo,
    metrics: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    boxes: BoxTable | None = None,
    picture: str | None = None,
    needs_import: bool = False,
    num_features: int = 0,
    has_recipe: bool = True,
    template: str | os.PathLike | None = None,
):
    """Render the model card (``huggingface_hub.ModelCard``) from ``model_cards/template.md``."""
    from huggingface_hub import ModelCard

    template = Path(template) if template else TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(f"model card template not found: {template}")
    repo_id = repo_id or _PLACEHOLDER_REPO
    method_key = _method_key(run.method or "unknown")
    dataset_display, dkey, hub_id = _dataset_names(run, "unknown")
    uses_ccrop = run.schedule is not None and run.schedule.crop in _CCROP_NAMES
    results = _card_results(run, metrics)
    eval_results = _card_eval_results(results, str(hub_id or dkey), dataset_display)
    model_name = _card_model_name(run, repo_id, method_key, uses_ccrop, dkey)
    card_data = _card_metadata(run, model_name, method_key, hub_id, eval_results)
    context = dict(
        repo_id=repo_id,
        model_name=model_name,
        architecture=run.model,
        needs_import=needs_import,
        num_features=num_features,
        method=_METHOD_NAMES.get(method_key, run.method or "unknown"),
        method_key=method_key,
        crop_name="ContrastiveCrop (C-Crop)" if uses_ccrop else "RandomResizedCrop (R-Crop)",
        uses_ccrop=uses_ccrop,
        dataset_name=dataset_display,
        dataset_hub_id=hub_id,
        **_card_training(run),
        **_card_metrics(results, metrics),
        **_card_paper(method_key, dkey),
        **_card_files(boxes, picture, has_recipe),
    )
    return ModelCard.from_template(card_data, template_path=str(template), **context)


# ------------------------------------------------------------------------------------------------------------
# Publish
# ------------------------------------------------------------------------------------------------------------


class PublishError(RuntimeError):
    """An upload failed; the message says what to re-run (the local export is left intact)."""


@dataclass
class PublishResult:
    repo_url: str
    commit_url: str
    export_dir: Path
    boxes_repo_url: str | None = None


def _is_export_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and not (
        path / RUN_FILE
    ).is_file()


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _check_no_token(folder: Path, token: str | None) -> None:
    """Refuse to upload a folder in which the active token appears (in any file, any size)."""
    if not token:
        return
    needle = token.encode()
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        with path.open("rb") as f:
            tail = b""
            while chunk := f.read(1 << 22):
                if needle in tail + chunk:
                    raise PublishError(f"refusing to upload {folder}: {path.name} contains your Hugging Face token")
                tail = chunk[-len(needle):]


def export_boxes_dataset(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    model_repo_id: str | None = None,
    license: str = "other",
) -> Path:
    """A dataset repo folder with a box table (``boxes.parquet`` + ``.safetensors``) and a dataset card.

    ``source_dir`` is a run folder or an export folder; ``repo_id`` (the dataset repo) fills the card's snippet.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    table = _load_run_boxes(source_dir)
    if table is None:
        raise FileNotFoundError(f"no boxes.parquet or boxes.safetensors in {source_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    table.save(out_dir / "boxes.parquet")
    table.save(out_dir / "boxes.safetensors")
    meta = table.metadata
    data = DatasetCardData(
        license=license,
        tags=["contrastive-crop", "hub-ccrop", "bounding-boxes", f"arxiv:{PAPER_ARXIV_ID}"],
        pretty_name=f"ContrastiveCrop boxes for {meta.get('dataset', 'a dataset')}",
        configs=[{"config_name": "default", "data_files": "boxes.parquet"}],
    )
    model_line = (
        f"They were localized by the backbone [{model_repo_id}](https://huggingface.co/{model_repo_id}). "
        if model_repo_id else ""
    )
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {data.pretty_name}\n\n"
        f"One ContrastiveCrop box `(x0, y0, x1, y1)` in [0, 1] per training image of `{meta.get('dataset')}` "
        f"(split `{meta.get('split')}`, {len(table)} rows; ids follow `{meta.get('id_scheme')}`: a row's "
        f"position in the unshuffled pretraining data). {model_line}Load the table, checked against your copy "
        "of the data, and start ContrastiveCrop without a warm-up (`crop.init_boxes:` in a recipe):\n\n"
        "```python\nimport hub_ccrop\n\n"
        f"table = hub_ccrop.load_boxes(\"{repo_id or 'ORG/NAME'}\", repo_type=\"dataset\", "
        "dataset_num_rows=len(dataset))\n```\n\n"
        f"Metadata: `{json.dumps(meta, sort_keys=True, default=str)}`\n\n## Citation\n\n```bibtex\n"
        f"{PAPER_CITATION}\n```\n"
    )
    DatasetCard(content).save(out_dir / "README.md")
    return out_dir


def _folder_to_publish(
    run_dir: Path, repo_id: str, export_dir: str | os.PathLike | None, template: str | os.PathLike | None
) -> Path:
    """An export folder as it is, else a fresh export of the run (``export_dir``, default ``RUN/export``)."""
    if _is_export_dir(run_dir):
        return run_dir
    folder = Path(export_dir) if export_dir else run_dir / "export"
    export_run(run_dir, folder, repo_id=repo_id, template=template, overwrite=True)
    return folder


def _rerun_command(folder: Path, repo_id: str, private: bool, revision: str | None, boxes_repo_id: str | None) -> str:
    """The ``hub-ccrop publish`` command that uploads ``folder`` again, as a failed publish suggests it."""
    command = f"hub-ccrop publish {folder} --repo-id {repo_id}"
    command += " --private" if private else ""
    command += f" --revision {revision}" if revision else ""
    command += f" --boxes-repo-id {boxes_repo_id}" if boxes_repo_id else ""
    return command


def _upload_model_folder(api: Any, repo_id: str, folder: Path, revision: str | None, commit_message: str | None) -> Any:
    """Upload the export folder to the model repo; returns huggingface_hub's ``CommitInfo``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*about to commit a data file.*")
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision,
            commit_message=commit_message or "Upload ContrastiveCrop backbone (hub_ccrop)",
        )


def _publish_boxes(api: Any, folder: Path, repo_id: str, boxes_repo_id: str, private: bool, token: str) -> str:
    """Export the box table of ``folder`` as a dataset repo folder next to it and upload it; returns its URL."""
    boxes_dir = folder.parent / f"{folder.name}-boxes"
    export_boxes_dataset(folder, boxes_dir, repo_id=boxes_repo_id, model_repo_id=repo_id)
    _check_no_token(boxes_dir, token)
    boxes_url = str(api.create_repo(boxes_repo_id, private=private, exist_ok=True, repo_type="dataset"))
    api.upload_folder(repo_id=boxes_repo_id, repo_type="dataset", folder_path=str(boxes_dir),
                      commit_message="Upload ContrastiveCrop box table (hub_ccrop)")
    return boxes_url


def publish_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    export_dir: str | os.PathLike | None = None,
    boxes_repo_id: str | None = None,
    commit_message: str | None = None,
    template: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PublishResult:
    """Export a run (or take an existing export folder) and upload it to the model repo ``repo_id``.

    The token comes from ``token`` or huggingface_hub's usual sources; it is never printed or written.
    ``revision`` uploads to that branch (created from main if missing). ``boxes_repo_id`` also publishes the
    box table as a dataset repo. On failure a :class:`PublishError` says what to re-run; the export stays.
    """
    from huggingface_hub import HfApi, get_token

    folder = _folder_to_publish(Path(run_dir), repo_id, export_dir, template)
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN, then re-run")
    _check_no_token(folder, token)

    api = HfApi(endpoint=endpoint, token=token)
    step, boxes_url = "create the repo", None
    try:
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        if revision and revision != "main":
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "upload the folder"
        info = _upload_model_folder(api, repo_id, folder, revision, commit_message)
        if boxes_repo_id:
            step = f"publish the box table to the dataset repo {boxes_repo_id}"
            boxes_url = _publish_boxes(api, folder, repo_id, boxes_repo_id, private, token)
    except Exception as e:  # any failure gets the same advice
        message = _redact(f"{type(e).__name__}: {e}", token)
        rerun = _rerun_command(folder, repo_id, private, revision, boxes_repo_id)
        raise PublishError(
            f"publishing to {repo_id} failed while trying to {step}: {message}\n"
            f"The export at {folder} is intact. Re-run: {rerun}\n"
            f"(or upload it directly: hf upload {repo_id} {folder} ."
            + (f" --revision {revision}" if revision else "") + ")"
        ) from e
    logger.info("published %s: %s", repo_id, info.commit_url)
    return PublishResult(repo_url=repo_url, commit_url=str(info.commit_url), export_dir=folder,
                         boxes_repo_url=boxes_url)


# ------------------------------------------------------------------------------------------------------------
# Load boxes
# ------------------------------------------------------------------------------------------------------------


def load_boxes(
    repo_id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    dataset_num_rows: int | None = None,
    fingerprint: str | None = None,
    id_scheme: str | None = ID_SCHEME,
    repo_type: str = "model",
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> BoxTable:
    """A published box table, checked against the dataset it will be used with.

    ``repo_id_or_dir`` is a Hub repo id (``ORG/NAME``, also ``hf-hub:ORG/NAME``), an export or run folder
    (also ``local-dir:DIR``), or a ``.parquet``/``.safetensors`` file. Raises :class:`BoxTableMismatch`
    when ``dataset_num_rows``/``fingerprint``/``id_scheme`` disagree with the table.
    """
    source = str(repo_id_or_dir)
    if source.startswith("local-dir:"):
        source = source[len("local-dir:"):]
    path = Path(source)
    if not source.startswith("hf-hub:") and path.exists():
        if path.is_dir():
            table = _load_run_boxes(path)
            if table is None:
                raise FileNotFoundError(f"no boxes.parquet or boxes.safetensors in {path}")
        else:
            table = BoxTable.load(path)
    else:
        table = _download_boxes(source.removeprefix("hf-hub:"), revision=revision, repo_type=repo_type,
                                cache_dir=cache_dir, token=token)
    table.check_compatible(num_rows=dataset_num_rows, id_scheme=id_scheme, fingerprint=fingerprint,
                           source=f"box table from {repo_id_or_dir}")
    return table


def _download_boxes(repo_id: str, *, revision: str | None, repo_type: str,
                    cache_dir: str | os.PathLike | None, token: str | bool | None) -> BoxTable:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    if "@" in repo_id and revision is None:  # timm-style ORG/NAME@revision
        repo_id, revision = repo_id.split("@", 1)
    errors = []
    for name in ("boxes.parquet", "boxes.safetensors"):
        try:
            path = hf_hub_download(repo_id, name, revision=revision, repo_type=repo_type,
                                   cache_dir=cache_dir, token=token)
        except EntryNotFoundError as e:  # missing on the Hub, or (offline) not in the local cache
            errors.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        return BoxTable.load(path)
    raise FileNotFoundError(f"no box table in the {repo_type} repo {repo_id}: " + "; ".join(errors))


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    out = args.out or Path(args.run) / "export"
    export_run(args.run, out, repo_id=args.repo_id, template=args.template, overwrite=args.force)
    print(f"exported {args.run} -> {out}")
    print(f"load it with: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        result = publish_run(
            args.run, args.repo_id, private=args.private, revision=args.revision, export_dir=args.out,
            boxes_repo_id=args.boxes_repo_id, commit_message=args.message, template=args.template,
        )
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"published {result.export_dir} -> {result.repo_url}")
    print(f"commit: {result.commit_url}")
    if result.boxes_repo_url:
        print(f"box table: {result.boxes_repo_url}")
    print(f"load it with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True)")
    return 0


def add_cli(subparsers: Any) -> None:
    """Add the ``export`` and ``publish`` subcommands to a ``hub-ccrop`` argparse subparsers object."""
    p = subparsers.add_parser("export", help="write a timm Hub repo folder (weights, boxes, card) for a run")
    p.add_argument("run", help="run folder written by training")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    p.add_argument("--repo-id", default=None, help="ORG/NAME used in the card's usage snippets")
    p.add_argument("--template", default=None, help="model card template (default: model_cards/template.md)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("publish", help="export a run and upload it to the Hugging Face Hub")
    p.add_argument("run", help="run folder (exported first) or an existing export folder (uploaded as is)")
    p.add_argument("--repo-id", required=True, help="model repo ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: RUN/export)")
    p.add_argument("--boxes-repo-id", default=None, help="also publish the box table as this dataset repo")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--template", default=None, help="model card template (default: model_cards/template.md)")
    p.set_defaults(func=_cmd_publish)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hub_ccrop.hub {export,publish} ...`` (the same subcommands as ``hub-ccrop``)."""
    parser = argparse.ArgumentParser(prog="python -m hub_ccrop.hub")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

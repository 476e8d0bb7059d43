"""Export a training run as a folder that is a valid timm Hub repo: :func:`export_run`.

The folder holds ``model.safetensors`` + ``config.json`` (written by timm's ``save_for_hf``), the box table,
the recipe (credentials redacted), the metrics, a picture and a model card (:mod:`hub_ccrop.hub.card`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from hub_ccrop.boxes import BoxTable
from hub_ccrop.errors import UserError
from hub_ccrop.hub.card import build_model_card, dataset_names
from hub_ccrop.hub.load import load_run_boxes
from hub_ccrop.hub.paper import METHOD_NAMES, PAPER_ARXIV_ID, PAPER_TITLE, method_key
from hub_ccrop.hub.sharing import DataTerms, data_terms, license_terms, picture_policy
from hub_ccrop.run_info import RUN_FILE, RunInfo

__all__ = ["EXPORT_FILES", "PICTURE_NAME", "export_run"]

logger = logging.getLogger(__name__)

PICTURE_NAME = "boxes_and_crops.png"
EXPORT_FILES = ("README.md", "config.json", "model.safetensors", "boxes.parquet", "boxes.safetensors",
                "recipe.yaml", "metrics.json", PICTURE_NAME)
_SECRET_KEY = re.compile(r"token|secret|password|api_key|apikey|credential", re.IGNORECASE)



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


def _clean_pretrained_cfg(model: torch.nn.Module, run: RunInfo, license: str) -> dict[str, Any]:
    """A pretrained_cfg that describes these weights only (no URL, hub id, tag or notes of timm's defaults)."""
    base = getattr(model, "pretrained_cfg", {}) or {}
    method = METHOD_NAMES.get(method_key(run.method or ""), run.method or "")
    name = dataset_names(run, "unknown data")[0]
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
        "license": license,
        "description": f"{method} + ContrastiveCrop self-supervised backbone, pretrained on {name} (hub_ccrop)",
        "paper_name": PAPER_TITLE,
        "paper_ids": f"arXiv:{PAPER_ARXIV_ID}",
    }


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


def _picture(run_dir: Path, run: RunInfo, table: BoxTable | None, terms: DataTerms,
             with_pictures: bool) -> tuple[Path | None, str | None]:
    """The training picture to export (or None) and the card's sentence on it (None: the run drew none)."""
    picture = _table_picture(run_dir, table)
    if picture is None:
        return None, None
    dataset = f"`{run.dataset.hub_id or run.dataset.name}`" if run.dataset is not None else "the training data"
    include, note = picture_policy(terms, with_pictures, dataset)
    if not include:
        logger.info("no picture of training images in the export: %s", note)
    return (picture if include else None), note


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


def _write_weights(run_dir: Path, run: RunInfo, folder: Path, license: str) -> tuple[torch.nn.Module, bool]:
    """Weights + config through timm's own writer, with a clean pretrained_cfg.

    Returns the backbone and whether loading it needs ``import hub_ccrop`` (an architecture timm lacks).
    """
    from timm.models import save_for_hf

    from hub_ccrop.evaluate.backbone import load_backbone

    needs_import = _ensure_architecture(run.model)
    try:  # the one way to build a run's backbone: strictly, from backbone.safetensors and run.json
        model = load_backbone(run_dir).eval()
    except RuntimeError as e:
        raise ValueError(f"{run_dir / 'backbone.safetensors'} does not fit {run.model} with model_args="
                         f"{run.model_args}: {e}") from e
    cfg = _clean_pretrained_cfg(model, run, license)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    data_config = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    save_for_hf(model, str(folder), safe_serialization=True, data_config=data_config)
    return model, needs_import


def _write_boxes(run_dir: Path, run: RunInfo, folder: Path) -> BoxTable | None:
    """The run's box table in both formats, its metadata completed and checked against the run's dataset."""
    table = load_run_boxes(run_dir)
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
    license: str | None = None,
    with_pictures: bool = False,
) -> Path:
    """Write a timm Hub repo folder for a run: weights, config, boxes, recipe, metrics, picture, model card.

    ``repo_id`` fills the card's usage snippets (``ORG/NAME`` when unknown). ``license`` (a Hub licence id)
    replaces the default, the training data's terms (:func:`~hub_ccrop.hub.sharing.data_terms`). The picture
    of training images goes in only when they are public already or ``with_pictures`` says so; the card says
    which images it shows. The folder is built next to ``out_dir`` and moved into place at the end;
    ``verify`` reloads it with ``timm.create_model("local-dir:...")`` and checks that the weights are
    bit-identical. Returns ``out_dir``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = RunInfo.load(run_dir)
    _require_preprocessing(run, run_dir)
    terms = license_terms(data_terms(run.dataset), license)
    if terms.ask:
        logger.warning("licence `%s`: %s", terms.license, terms.note)
    metrics = _run_metrics(run_dir)
    _prepare_out_dir(out_dir, overwrite)
    with _staged_folder(out_dir) as tmp:
        model, needs_import = _write_weights(run_dir, run, tmp, terms.license)
        table = _write_boxes(run_dir, run, tmp)
        _write_recipe_and_metrics(run_dir, metrics, tmp)
        picture, picture_note = _picture(run_dir, run, table, terms, with_pictures)
        if picture is not None:
            shutil.copyfile(picture, tmp / PICTURE_NAME)
        card = build_model_card(
            run, metrics, repo_id=repo_id, boxes=table, picture=PICTURE_NAME if picture else None,
            needs_import=needs_import, num_features=int(getattr(model, "num_features", 0)),
            has_recipe=(tmp / "recipe.yaml").is_file(), template=template, terms=terms, picture_note=picture_note,
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



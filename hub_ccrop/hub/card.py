"""The model card of an export: metadata (``model-index``), results with their sources, the paper's numbers.

Rendered with huggingface_hub's ``ModelCard.from_template`` from ``model_cards/template.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hub_ccrop.box_quality import BOX_KEYS, box_verdict, quality_line
from hub_ccrop.boxes import ID_SCHEME, BoxTable
from hub_ccrop.hub.paper import (
    DATASET_NAMES,
    METHOD_NAMES,
    PAPER_ARXIV_ID,
    PAPER_CITATION,
    PAPER_SETTINGS,
    PAPER_TITLE,
    dataset_key,
    method_key,
    paper_reference,
)
from hub_ccrop.hub.sharing import DataTerms, data_terms
from hub_ccrop.localize import TRAINED_BACKBONE
from hub_ccrop.run_info import RunInfo

__all__ = ["PLACEHOLDER_REPO", "TEMPLATE_PATH", "build_model_card", "dataset_names"]

# model_cards/template.md, shipped inside the package through this link (see pyproject package-data)
TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_card_template.md"
PLACEHOLDER_REPO = "ORG/NAME"


def dataset_names(run: RunInfo, unknown: str) -> tuple[str, str, str | None]:
    """(display name, key into the paper's tables, Hub id) of the run's pretraining data."""
    spec = run.dataset
    hub_id = spec.hub_id if spec is not None else None
    name = spec.name if spec is not None else unknown
    key = dataset_key(hub_id or name)
    return DATASET_NAMES.get(key, name), key, hub_id


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


def _card_model_name(run: RunInfo, repo_id: str, mkey: str, uses_ccrop: bool, dkey: str) -> str:
    """The repo's name, else (no repo id yet) ``ARCH-METHOD-ccrop|rcrop-DATASET``."""
    if repo_id != PLACEHOLDER_REPO:
        return repo_id.split("/")[-1]
    return f"{run.model}-{mkey.replace('_', '')}-{'ccrop' if uses_ccrop else 'rcrop'}-{dkey}"


def _card_metadata(
    terms: DataTerms, model_name: str, mkey: str, hub_id: str | None, eval_results: list[Any]
) -> Any:
    """The card's YAML header (``huggingface_hub.ModelCardData``)."""
    from huggingface_hub import ModelCardData

    tags = ["timm", "image-feature-extraction", "self-supervised-learning", "contrastive-learning",
            "contrastive-crop", "hub-ccrop", mkey.replace("_", "-"), f"arxiv:{PAPER_ARXIV_ID}"]
    return ModelCardData(
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        license=terms.license,
        license_name=terms.license_name,
        license_link=terms.license_link,
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
    """The template's results section: kNN/linear top-1 (``_card_results``), the boxes' report line beside its
    baselines (``quality_line``; older runs: the box IoU alone), the other metrics."""
    boxes_line = quality_line(metrics) if "box_area" in metrics else None
    shown = {"knn_top1", "linear_top1", "box_iou", *(BOX_KEYS if boxes_line else ())}
    extra_metrics = {k: _number(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                     if k not in shown and isinstance(v, (int, float, str))}
    return dict(**results, box_iou=_number(metrics.get("box_iou"), 4), boxes_line=boxes_line,
                boxes_verdict=box_verdict(metrics) if boxes_line else None, extra_metrics=extra_metrics)


def _card_paper(mkey: str, dkey: str) -> dict[str, Any]:
    """The template's comparison with the paper and its citation."""
    ref = paper_reference(mkey, dkey)
    return dict(
        paper_rcrop=ref[0] if ref else None,
        paper_ccrop=ref[1] if ref else None,
        paper_setting=PAPER_SETTINGS["imagenet-1k" if dkey == "imagenet-1k" else "small"],
        paper_title=PAPER_TITLE,
        paper_arxiv_id=PAPER_ARXIV_ID,
        citation=PAPER_CITATION,
    )


def _card_files(run: RunInfo, boxes: BoxTable | None, picture: str | None, picture_note: str | None,
                has_recipe: bool) -> dict[str, Any]:
    """The template's section on the other files of the repo: picture (which images, and why), recipe, box table."""
    box_meta = dict(boxes.metadata) if boxes is not None else {}
    spec = run.dataset
    where = f"`{spec.hub_id or spec.name}` (splits `{', '.join(spec.pretrain_splits)}`)" if spec is not None else "it"
    return dict(
        picture=picture,
        picture_images=f"a few training images of {where}, each labelled with its sample id (its row in the "
                       "unshuffled data)",
        picture_reason=picture_note if picture else None,
        picture_withheld=picture_note if not picture else None,
        picture_epoch=box_meta.get("epoch"),
        has_recipe=has_recipe,
        has_boxes=boxes is not None,
        boxes_num_rows=len(boxes) if boxes is not None else None,
        boxes_epoch=box_meta.get("epoch"),
        boxes_fingerprint=box_meta.get("fingerprint"),
        boxes_id_scheme=box_meta.get("id_scheme", ID_SCHEME),
        boxes_made_by=boxes_made_by(box_meta),
    )


HEATMAP_NAMES = {"cls_attention": "the class token's attention to the patches in the last block (mean over heads)",
                 "feature_norm": "the last feature map (channel sum; token L2 norm for a ViT)"}


def boxes_made_by(box_meta: Mapping[str, Any]) -> str | None:
    """One sentence on how a box table's boxes were made (heatmap source, network, localizer, rule), from its
    metadata; None for a table that does not record it."""
    source = box_meta.get("heatmap_source")
    if source is None:
        return None
    network, localizer = box_meta.get("localizer_network"), box_meta.get("localizer")
    of = f" of `{network}`" if network else ""
    if localizer:
        of += f" ({localizer})" if localizer == TRAINED_BACKBONE else f" (an external localizer, `{localizer}`)"
    rule = f"rule `{box_meta.get('box_rule', 'threshold')}` at k = {box_meta.get('k')}"
    flip = ", heatmaps averaged with those of the image turned by 180 degrees" if box_meta.get("heatmap_flip") else ""
    chosen = ""
    follow = box_meta.get("heatmap_follow") or {}
    if len(follow) > 1 and source in follow:
        others = ", ".join(f"{name} {score:.2f}" for name, score in follow.items() if name != source)
        chosen = f" (chosen by the follow check: its boxes follow the content {follow[source]:.2f}, {others})"
    return f"heatmaps from {HEATMAP_NAMES.get(source, source)}{of}{chosen}; {rule}{flip}"


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
    terms: DataTerms | None = None,
    picture_note: str | None = None,
):
    """Render the model card (``huggingface_hub.ModelCard``) from ``model_cards/template.md``.

    ``terms`` give the licence (default: the training data's, :func:`~hub_ccrop.hub.sharing.data_terms`
    without a Hub lookup); ``picture_note`` says why the picture is there, or why there is none.
    """
    from huggingface_hub import ModelCard

    template = Path(template) if template else TEMPLATE_PATH
    if not template.is_file():
        raise FileNotFoundError(f"model card template not found: {template}")
    repo_id = repo_id or PLACEHOLDER_REPO
    terms = terms or data_terms(run.dataset, lookup=False)
    mkey = method_key(run.method or "unknown")
    dataset_display, dkey, hub_id = dataset_names(run, "unknown")
    uses_ccrop = run.schedule is not None and run.schedule.crop in _CCROP_NAMES
    results = _card_results(run, metrics)
    eval_results = _card_eval_results(results, str(hub_id or dkey), dataset_display)
    model_name = _card_model_name(run, repo_id, mkey, uses_ccrop, dkey)
    card_data = _card_metadata(terms, model_name, mkey, hub_id, eval_results)
    context = dict(
        repo_id=repo_id,
        model_name=model_name,
        architecture=run.model,
        needs_import=needs_import,
        num_features=num_features,
        method=METHOD_NAMES.get(mkey, run.method or "unknown"),
        method_key=mkey,
        crop_name="ContrastiveCrop (C-Crop)" if uses_ccrop else "RandomResizedCrop (R-Crop)",
        uses_ccrop=uses_ccrop,
        dataset_name=dataset_display,
        dataset_hub_id=hub_id,
        **_card_training(run),
        **_card_metrics(results, metrics),
        **_card_paper(mkey, dkey),
        **_card_files(run, boxes, picture, picture_note, has_recipe),
        license=terms.license,
        license_name=terms.license_name,
        license_link=terms.license_link,
        license_note=terms.note,
    )
    return ModelCard.from_template(card_data, template_path=str(template), **context)



"""Publish an export to the Hugging Face Hub: the model repo, optionally the box table as a dataset repo.

Tokens come only from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``); this module never
prints, logs or writes one, and refuses to upload a folder that contains the active token.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub_ccrop.hub.export import export_run
from hub_ccrop.hub.load import load_run_boxes
from hub_ccrop.hub.paper import PAPER_ARXIV_ID, PAPER_CITATION
from hub_ccrop.run_info import RUN_FILE

__all__ = ["PublishError", "PublishResult", "export_boxes_dataset", "publish_run"]

logger = logging.getLogger(__name__)

NO_TOKEN = ("no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN to a write token from "
            "https://huggingface.co/settings/tokens), then run this command again")


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
    table = load_run_boxes(source_dir)
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


def _folder_to_publish(run_dir: Path, repo_id: str, export_dir: str | os.PathLike | None, **export: Any) -> Path:
    """An export folder as it is, else a fresh export of the run (``export_dir``, default ``RUN/export``)."""
    if _is_export_dir(run_dir):
        return run_dir
    folder = Path(export_dir) if export_dir else run_dir / "export"
    export_run(run_dir, folder, repo_id=repo_id, overwrite=True, **export)
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


def _card_license(folder: Path) -> str:
    """The licence on the model card of an export folder (``other`` when it names none)."""
    from huggingface_hub import metadata_load

    card = folder / "README.md"
    license_id = (metadata_load(card) or {}).get("license") if card.is_file() else None
    return license_id if isinstance(license_id, str) else "other"


def _publish_boxes(api: Any, folder: Path, repo_id: str, boxes_repo_id: str, private: bool, token: str) -> str:
    """Export the box table of ``folder`` as a dataset repo folder next to it and upload it; returns its URL."""
    boxes_dir = folder.parent / f"{folder.name}-boxes"
    export_boxes_dataset(folder, boxes_dir, repo_id=boxes_repo_id, model_repo_id=repo_id,
                         license=_card_license(folder))
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
    license: str | None = None,
    with_pictures: bool = False,
) -> PublishResult:
    """Export a run (or take an existing export folder) and upload it to the model repo ``repo_id``.

    The token comes from ``token`` or huggingface_hub's usual sources; it is never printed or written, and
    without one nothing is exported or sent. ``license`` and ``with_pictures`` go to :func:`export_run`
    (an existing export folder is uploaded as it is). ``revision`` uploads to that branch (created from main
    if missing). ``boxes_repo_id`` also publishes the box table as a dataset repo, under the model's licence.
    On failure a :class:`PublishError` says what to re-run; the export stays.
    """
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PublishError(NO_TOKEN)
    folder = _folder_to_publish(Path(run_dir), repo_id, export_dir, template=template, license=license,
                                with_pictures=with_pictures)
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

"""Box tables from the Hub, an export or run folder, or a file: :func:`load_boxes`."""

from __future__ import annotations

import os
from pathlib import Path

from hub_ccrop.boxes import ID_SCHEME, BoxTable

__all__ = ["load_boxes", "load_run_boxes"]


def load_run_boxes(run_dir: Path) -> BoxTable | None:
    """The box table of a run or export folder (``boxes.parquet``, else ``boxes.safetensors``), or None."""
    for name in ("boxes.parquet", "boxes.safetensors"):
        if (run_dir / name).is_file():
            return BoxTable.load(run_dir / name)
    return None


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
            table = load_run_boxes(path)
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



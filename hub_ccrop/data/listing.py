"""File listing of a split (parquet files with their row groups and footers, or an image tree, local or on
the Hub; cached per process and shareable between processes) and Hub reads by byte range."""

from __future__ import annotations

import importlib
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow.parquet as pq

from hub_ccrop.data.specs import DataError, DatasetSpec, parse_split


@dataclass(frozen=True)
class _File:
    url: str  # local path or hf:// URL
    name: str  # path relative to the dataset root: stable across copies of the data
    size: int
    row_groups: tuple[int, ...]  # rows per parquet row group; (1,) for an image file
    # The parquet footer, read once when listing: readers never fetch it again (pq.FileMetaData pickles).
    metadata: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Split:
    kind: str  # "parquet" | "imagefolder"
    files: tuple[_File, ...]
    root: str

    @property
    def num_rows(self) -> int:
        return sum(sum(f.row_groups) for f in self.files)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _local_root(spec: DatasetSpec, data_dir: str | None) -> str | None:
    """The local dataset folder (a generated one for ``spec.generator``), or None for the Hub."""
    if data_dir is None and spec.generator is not None and spec.data_dir is None:
        module, func = spec.generator.split(":")
        return os.fspath(getattr(importlib.import_module(module), func)())
    root = data_dir or spec.data_dir
    if root is None:
        return None
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return root


def _open(url: str):  # noqa: ANN202 - a binary file object
    import fsspec

    return fsspec.open(url, "rb").open()


_HF_URL = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)$")


class _HubRangeFile(io.RawIOBase):
    """A Hub dataset file of known size read by HTTP ``Range`` requests on its resolve URL, nothing else.

    ``HfFileSystem`` re-resolves the revision and asks for the file's info in every new process (its
    instance cache is cleared on fork), so each DataLoader worker of each process would call the
    repo API; this reader only downloads the byte ranges parquet asks for.
    """

    def __init__(self, url: str, size: int) -> None:
        from huggingface_hub import hf_hub_url

        m = _HF_URL.match(url)
        if m is None:
            raise ValueError(f"not a Hub dataset file URL: {url}")
        self.name, self.size, self._pos = url, size, 0
        rev = unquote(m["rev"]) if m["rev"] else None
        self._url = hf_hub_url(m["repo"], unquote(m["path"]), repo_type="dataset", revision=rev)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        headers = {"Range": f"bytes={self._pos}-{self._pos + n - 1}", **build_hf_headers()}
        response = http_backoff("GET", self._url, headers=headers)
        hf_raise_for_status(response)
        data = response.content
        if response.status_code == 200:  # a server that ignores Range sends the whole file
            data = data[self._pos : self._pos + n]
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_sized(url: str, size: int):  # noqa: ANN202 - a binary file object
    """Open a listed file for reading byte ranges: Hub files without any API call, others as usual."""
    if "://" not in url:
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    if _HF_URL.match(url):
        return _HubRangeFile(url, size)
    return _open(url)


def _file_size(url: str) -> int:
    if "://" not in url:
        return os.path.getsize(url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.size(path))


def _relative_name(url: str, root: str) -> str:
    if "://" not in url:
        return os.path.relpath(url, root).replace(os.sep, "/")
    # hf://datasets/org/name@revision/config/train-0000.parquet -> config/train-0000.parquet
    m = re.match(r"^hf://datasets/[^/]+/[^/@]+(?:@[^/]+)?/(.*)$", url)
    return m.group(1) if m else url


def _resolve_split(spec: DatasetSpec, split: str, data_dir: str | None) -> _Split:
    """The sorted files of one (unsliced) split, with parquet row-group sizes (cached per process)."""
    return _resolve_files(spec, split, _local_root(spec, data_dir))


_LISTINGS: dict[tuple[DatasetSpec, str, str | None], _Split] = {}


def _resolve_files(spec: DatasetSpec, split: str, root: str | None) -> _Split:
    key = (spec, split, root)
    if key not in _LISTINGS:
        _LISTINGS[key] = _list_files(spec, split, root)
    return _LISTINGS[key]


def share_listings(
    spec: DatasetSpec,
    splits: Sequence[str],
    *,
    is_main: bool,
    broadcast: Callable[[list[Any]], list[Any]],
    data_dir: str | None = None,
) -> None:
    """List ``splits`` (files, row groups, footers) on the main process only and give the listing to
    the others through ``broadcast`` (e.g. ``accelerate.utils.broadcast_object_list``).

    Call it on every process before :func:`load_images`: N processes then query the Hub repo once,
    not N times (the Hub rate-limits repeated listings). DataLoader workers inherit the listing.
    """
    root = _local_root(spec, data_dir)
    keys = list(dict.fromkeys((spec, parse_split(s)[0], root) for s in splits))
    payload = [[_resolve_files(*key) for key in keys] if is_main else None]
    listings = broadcast(payload)[0]
    _LISTINGS.update(zip(keys, listings, strict=True))


_SPLIT_FILES: dict[tuple[DatasetSpec, str | None], dict[str, list[str]]] = {}


def split_names(spec: DatasetSpec, data_dir: str | None = None) -> list[str]:
    """The splits the data has, named as ``datasets`` names them (``train``, ``validation``, ``test``, ...)."""
    return sorted(_split_files(spec, _local_root(spec, data_dir)))


def _split_files(spec: DatasetSpec, root: str | None) -> dict[str, list[str]]:
    """Split name -> file URLs, from ``spec.data_files`` or ``datasets``' builder (cached per process)."""
    key = (spec, root)
    if key not in _SPLIT_FILES:
        _SPLIT_FILES[key] = _builder_files(spec, root)
    return _SPLIT_FILES[key]


def _builder_files(spec: DatasetSpec, root: str | None) -> dict[str, list[str]]:
    import datasets
    from datasets.data_files import EmptyDatasetError

    if spec.data_files is not None:
        base = root or os.getcwd()
        return {split: [u if "://" in u or os.path.isabs(u) else os.path.join(base, u) for u in urls]
                for split, urls in spec.data_files}
    if root is not None:
        # A copy of a multi-config Hub repo: read the config's subfolder (names stay repo-relative).
        config_dir = os.path.join(root, spec.config) if spec.config else root
        try:
            builder = datasets.load_dataset_builder(config_dir if os.path.isdir(config_dir) else root)
        except EmptyDatasetError:
            raise DataError(f"dataset folder {root} holds no images and no parquet files: put the images "
                            "(jpg, png, ...) in it, in class subfolders if they have labels") from None
    else:
        builder = datasets.load_dataset_builder(spec.hub_id, spec.config, revision=spec.revision)
        if builder.name not in ("parquet", "imagefolder"):
            # Script/other formats: the Hub's automatic parquet conversion of the same data.
            builder = datasets.load_dataset_builder(
                spec.hub_id, revision="refs/convert/parquet", data_dir=spec.config or "default"
            )
    return {str(split): list(urls) for split, urls in (builder.config.data_files or {}).items()}


def _list_files(spec: DatasetSpec, split: str, root: str | None) -> _Split:
    data_files = _split_files(spec, root)
    if split not in data_files:
        where = root or spec.hub_id
        source = "data_files" if spec.data_files is not None else "found"
        raise DataError(f"dataset {spec.name!r} ({where}) has no split {split!r}: {source} {sorted(data_files)}")
    urls = sorted(data_files[split])
    root = root or (os.getcwd() if spec.data_files is not None else f"hf://datasets/{spec.hub_id}")
    if urls and all(u.endswith(".parquet") for u in urls):

        def describe(url: str) -> _File:  # the footer only: row groups and their sizes
            with _open(url) as f:
                meta = pq.ParquetFile(f).metadata
            groups = tuple(meta.row_group(k).num_rows for k in range(meta.num_row_groups))
            return _File(url, _relative_name(url, root), _file_size(url), groups, meta)

        return _Split("parquet", tuple(_map_io(describe, urls)), root)
    images = [u for u in urls if os.path.splitext(u)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DataError(f"split {split!r} of dataset {spec.name!r} ({root}) has neither parquet files nor images "
                        f"(found {', '.join(os.path.basename(u) for u in urls[:3])}): image files need one of the "
                        f"extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return _Split(
        "imagefolder",
        tuple(_File(u, _relative_name(u, root), _file_size(u), (1,)) for u in images),
        root,
    )


def _map_io(fn: Any, items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` with a few threads when there are many (remote footers are slow)."""
    if len(items) < 4:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


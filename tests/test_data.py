"""Dataset specs, local parquet / imagefolder / streaming sources, stable ids, image decoding."""

from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Features, Value
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import DataLoader

from hub_ccrop.data import (
    ID_SCHEME,
    IMAGENET200_CLASSES,
    BadImageError,
    DatasetSpec,
    Rows,
    clear_cache,
    dataset_fingerprint,
    decode_image,
    decode_to_tensor,
    get_spec,
    list_specs,
    load_images,
    num_ids,
    num_rows,
    parse_split,
)

SHARED = Path(os.environ.get("HUB_CCROP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SPLIT_CODE = {"train": 1, "test": 2, "unlabeled": 3}


def png(color: tuple[int, int, int], size: tuple[int, int] = (6, 5), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def tag(value) -> tuple[int, int]:
    """(split code, row index in split) painted into a toy image's first pixel."""
    r, g, _ = decode_image(value).getpixel((0, 0))
    return g, r


def write_parquet(path: Path, split: str, start: int, count: int, row_group: int = 5) -> None:
    features = Features({"img": ImageFeature(), "label": ClassLabel(num_classes=5)})
    images = [{"bytes": png((start + k, SPLIT_CODE[split], 7)), "path": None} for k in range(count)]
    table = pa.Table.from_pydict(
        {"img": images, "label": [(start + k) % 5 for k in range(count)]}, schema=features.arrow_schema
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture(scope="module")
def toy_parquet(tmp_path_factory) -> Path:
    """A Hub-style folder: train = 2 files (23 + 17 rows, row groups of 5), test = 1 file (9 rows)."""
    root = tmp_path_factory.mktemp("toy_parquet")
    # written out of order on purpose: ids follow the *sorted* file names
    write_parquet(root / "data" / "train-00001-of-00002.parquet", "train", 23, 17)
    write_parquet(root / "data" / "train-00000-of-00002.parquet", "train", 0, 23)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", "test", 0, 9)
    return root


def toy_spec(root: Path, **kw) -> DatasetSpec:
    return DatasetSpec(name="toy", data_dir=str(root), image_column="img", image_size=6, **kw)


@pytest.fixture(scope="module")
def toy_imagefolder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_imagefolder")
    for split, n in (("train", 12), ("test", 4)):
        for k in range(n):
            cls = ("cat", "dog", "emu")[k % 3]
            path = root / split / cls / f"img_{k:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png((k, SPLIT_CODE[split], 7)))
    return root


def rows_by_id(rows) -> dict[int, tuple]:
    return {int(r["id"]): (tag(r["image"]), int(r["label"])) for r in rows}


# -- specs ---------------------------------------------------------------------------------------


def test_registry_has_every_paper_dataset():
    assert {"cifar10", "cifar100", "stl10", "tiny_imagenet", "imagenet1k", "imagenet200", "small_objects"} <= set(
        list_specs()
    )
    c10 = get_spec("cifar10")
    assert (c10.hub_id, c10.image_column, c10.label_column, c10.image_size) == ("uoft-cs/cifar10", "img", "label", 32)
    assert get_spec("cifar100").label_column == "fine_label"
    assert get_spec("stl10").pretrain_splits == ("train", "unlabeled")
    assert get_spec("tiny_imagenet").test_split == "valid"
    inet = get_spec("imagenet1k")
    assert inet.eval_resize == (256, 224) and inet.blur and inet.num_classes == 1000
    in200 = get_spec("imagenet200")
    assert in200.num_classes == 200 and in200.class_subset == IMAGENET200_CLASSES
    assert len(set(IMAGENET200_CLASSES)) == 200 and list(IMAGENET200_CLASSES) == sorted(IMAGENET200_CLASSES)
    assert min(IMAGENET200_CLASSES) >= 0 and max(IMAGENET200_CLASSES) < 1000
    for name in list_specs():
        spec = get_spec(name)
        assert len(spec.mean) == 3 and len(spec.std) == 3 and spec.image_size > 0


def test_get_spec_overrides_holdout_and_any_source(tmp_path):
    spec = get_spec("cifar10", data_dir=str(tmp_path), holdout=5000)
    assert spec.data_dir == str(tmp_path) and spec.hub_id == "uoft-cs/cifar10"
    assert spec.pretrain_splits == ("train[:-5000]",)
    assert (spec.train_split, spec.test_split) == ("train[:-5000]", "train[-5000:]")
    other = get_spec("someone/pets", image_column="picture", image_size=64)
    assert other.hub_id == "someone/pets" and other.image_column == "picture"
    local = get_spec(str(tmp_path), label_column=None)
    assert local.data_dir == str(tmp_path) and local.label_column is None
    with pytest.raises(KeyError, match="unknown dataset"):
        get_spec("no such dataset")
    with pytest.raises(ValueError, match="needs a hub_id"):
        DatasetSpec(name="nowhere")


def test_parse_split():
    assert parse_split("train") == ("train", Rows())
    assert parse_split("train[-5000:]") == ("train", Rows(-5000, None))
    assert parse_split("train[10:20]") == ("train", Rows(10, 20))
    assert parse_split("train[:90%]") == ("train", Rows(None, 0.9))
    assert parse_split("train[1:20:3]") == ("train", Rows(1, 20, 3))
    assert parse_split("train[!9::10]") == ("train", Rows(9, None, 10, exclude=True))
    with pytest.raises(ValueError):
        parse_split("train[1:2:0]")


# -- local parquet, map-style and streaming ------------------------------------------------------


def test_local_parquet_map_style_ids_follow_sorted_files(toy_parquet):
    ds = load_images(toy_spec(toy_parquet))
    assert ds.column_names == ["id", "image", "label"]
    assert ds.features["id"] == Value("int64") and ds.features["label"] == Value("int64")
    assert ds["id"] == list(range(40))
    got = rows_by_id(ds)
    assert all(got[i] == ((1, i), i % 5) for i in range(40))  # row i of the sorted files has id i
    assert isinstance(ds[0]["image"], dict)  # left undecoded for the collate stage


def test_slices_and_split_lists_keep_ids(toy_parquet):
    spec = toy_spec(toy_parquet).with_holdout(10)
    train, held = load_images(spec, spec.train_split), load_images(spec, spec.test_split)
    assert train["id"] == list(range(30)) and held["id"] == list(range(30, 40))
    assert all(tag(r["image"]) == (1, r["id"]) for r in held)
    both = load_images(spec, ["train", "test"])
    assert both["id"] == list(range(49))
    assert rows_by_id(both)[45] == ((2, 5), 0)
    assert num_rows(spec) == 30 and num_ids(spec) == 30  # a prefix: dense ids for the box table
    assert num_rows(spec, spec.test_split) == 10 and num_ids(spec, spec.test_split) == 40
    with pytest.raises(KeyError, match="no split 'valid'"):
        load_images(spec, "valid")


def test_streaming_matches_map_style_under_shuffle(toy_parquet):
    spec = toy_spec(toy_parquet)
    expected = rows_by_id(load_images(spec, ["train", "test"]))
    stream = load_images(spec, ["train", "test"], streaming=True)
    assert stream.num_shards == 5 + 4 + 2  # one shard per row group
    assert rows_by_id(stream) == expected
    shuffled = stream.shuffle(seed=3, buffer_size=8)
    order = [r["id"] for r in shuffled]
    assert order != sorted(order) and rows_by_id(shuffled) == expected


def _ids_and_tags(rows: list[dict]) -> list[tuple[int, tuple[int, int]]]:
    return [(int(r["id"]), tag(r["image"])) for r in rows]


def test_streaming_two_workers_and_two_ranks_give_each_id_once(toy_parquet):
    spec = toy_spec(toy_parquet)
    stream = load_images(spec, streaming=True, num_shards=8).shuffle(seed=0, buffer_size=4)
    seen = []
    for rank in range(2):  # 2 simulated processes x 2 DataLoader workers each
        shard = split_dataset_by_node(stream, rank=rank, world_size=2)
        loader = DataLoader(shard, batch_size=3, num_workers=2, collate_fn=_ids_and_tags)
        seen += [pair for batch in loader for pair in batch]
    ids = [i for i, _ in seen]
    assert sorted(ids) == list(range(40))  # every id exactly once
    assert all(t == (1, i) for i, t in seen)  # and always the same image


class CountingFile(io.RawIOBase):
    """A local file that records every byte range read from it."""

    def __init__(self, path: str, reads: list) -> None:
        self.f, self.reads, self.name = open(path, "rb"), reads, path  # noqa: SIM115

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, buffer) -> int:
        start = self.f.tell()
        n = self.f.readinto(buffer)
        self.reads.append((os.path.basename(self.name), start, n))
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def test_shuffled_streaming_epoch_reads_each_row_group_once(tmp_path, monkeypatch):
    """4 files of one row group each: a shuffled epoch reads 4 row groups (it read 49 when row groups
    were cut into row-range shards), and only their column chunks: no footer is read again."""
    from hub_ccrop.data import loading

    for k in range(4):
        write_parquet(tmp_path / "data" / f"train-{k:05d}-of-00004.parquet", "train", 30 * k, 30, row_group=30)
    spec = toy_spec(tmp_path)
    stream = load_images(spec, streaming=True).shuffle(seed=0, buffer_size=8)
    reads: list = []
    monkeypatch.setattr(loading, "_open_sized", lambda url, size: CountingFile(url, reads))
    chunk_bytes = {}
    for f in sorted((tmp_path / "data").glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata.row_group(0)
        chunk_bytes[f.name] = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
    for epoch in range(2):
        reads.clear()
        stream.set_epoch(epoch)
        ids = [r["id"] for r in stream]
        assert sorted(ids) == list(range(120)) and ids != sorted(ids)
        per_file = {name: sum(n for f, _, n in reads if f == name) for name in chunk_bytes}
        assert per_file == chunk_bytes  # each row group's column chunks, once; nothing else


def test_min_rows_per_process_bounds_every_epoch_and_rank(toy_parquet):
    """Row groups of 5, 5, 5, 5, 3 and 5, 5, 5, 2 rows: 3 processes get 3 whole groups each, reshuffled
    every epoch, at least the 3 smallest (2 + 3 + 5); 2 processes split by rows (9 shards), 20 each."""
    from hub_ccrop.data import min_rows_per_process

    spec = toy_spec(toy_parquet)
    assert min_rows_per_process(spec, 1) == 40 and min_rows_per_process(spec, 2) == 20
    assert min_rows_per_process(spec, 3) == 10
    stream = load_images(spec, streaming=True).shuffle(seed=0, buffer_size=4)
    for world in (2, 3):
        counts = []
        for epoch in range(4):
            stream.set_epoch(epoch)
            counts += [sum(1 for _ in split_dataset_by_node(stream, rank=r, world_size=world)) for r in range(world)]
        assert min(counts) >= min_rows_per_process(spec, world), (world, counts)


def test_streaming_with_few_shards_splits_by_examples(toy_parquet):
    stream = load_images(toy_spec(toy_parquet), "test[:5]", streaming=True)
    assert stream.num_shards == 1
    parts = [[r["id"] for r in split_dataset_by_node(stream, rank=k, world_size=2)] for k in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(5)) and not set(parts[0]) & set(parts[1])


def test_class_subset_ids_are_dense_in_both_modes(toy_parquet):
    spec = toy_spec(toy_parquet, class_subset=(1, 3))
    ds = load_images(spec)
    keep = [i for i in range(40) if i % 5 in (1, 3)]
    assert ds["id"] == list(range(len(keep)))
    assert [tag(r["image"])[1] for r in ds] == keep
    assert ds["label"] == [(0 if i % 5 == 1 else 1) for i in keep]
    stream = load_images(spec, streaming=True, num_shards=6)
    assert rows_by_id(stream) == rows_by_id(ds)
    assert num_ids(spec) == num_rows(spec) == len(keep)
    tail = load_images(spec, "train[-4:]", streaming=True)
    assert sorted(r["id"] for r in tail) == list(range(len(keep) - 4, len(keep)))


def test_fingerprint_is_stable_and_location_independent(toy_parquet, tmp_path):
    spec = toy_spec(toy_parquet)
    fp = dataset_fingerprint(spec)
    assert fp.startswith(f"{ID_SCHEME}:toy:default:train:40:") and fp == dataset_fingerprint(spec)
    assert dataset_fingerprint(spec, ["train", "test"]) != fp
    assert dataset_fingerprint(spec.with_holdout(10)) != fp
    copy = tmp_path / "copy"
    shutil.copytree(toy_parquet, copy)
    assert dataset_fingerprint(spec.replace(data_dir=str(copy))) == fp
    write_parquet(copy / "data" / "train-00001-of-00002.parquet", "train", 23, 16)  # one row fewer
    clear_cache()  # file listings and footers are cached per process
    assert dataset_fingerprint(spec.replace(data_dir=str(copy))) != fp


# -- imagefolder ---------------------------------------------------------------------------------


def test_imagefolder_map_and_streaming(toy_imagefolder):
    spec = DatasetSpec(name="tree", data_dir=str(toy_imagefolder), image_size=6)
    ds = load_images(spec)
    files = sorted((toy_imagefolder / "train").rglob("*.png"))
    assert ds["id"] == list(range(12))
    assert [tag(r["image"])[1] for r in ds] == [int(f.stem[-3:]) for f in files]  # sorted path order
    assert ds["label"] == [("cat", "dog", "emu").index(f.parent.name) for f in files]
    stream = load_images(spec, streaming=True, num_shards=4)
    loader = DataLoader(stream, batch_size=5, num_workers=2, collate_fn=_ids_and_tags)
    seen = sorted(pair for batch in loader for pair in batch)
    assert seen == sorted(_ids_and_tags(list(ds)))
    assert dataset_fingerprint(spec).split(":")[4] == "12"
    test = load_images(spec, "test")
    assert test["id"] == list(range(4)) and all(tag(r["image"])[0] == 2 for r in test)


# -- the shared CIFAR-10 copy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_dir() -> Path:
    path = SHARED / "data" / "cifar10"
    if not any(path.glob("*/train-*.parquet")):
        pytest.skip(f"CIFAR-10 parquet not found under {path}")
    return path


def test_cifar10_local_copy_with_holdout(cifar_dir):
    spec = get_spec("cifar10", data_dir=str(cifar_dir), holdout=5000)
    table = pq.ParquetFile(next(cifar_dir.glob("*/train-*.parquet"))).read_row_group(0, columns=["img", "label"])
    held = load_images(spec, spec.test_split)
    assert len(held) == 5000 and held[0]["id"] == 45000
    assert held[0]["image"]["bytes"] == table.column("img")[45000].as_py()["bytes"]
    assert held[0]["label"] == table.column("label")[45000].as_py()
    assert num_ids(spec) == num_rows(spec) == 45000
    stream = load_images(spec, streaming=True)
    first = next(iter(stream))
    assert first["id"] == 0 and first["image"]["bytes"] == table.column("img")[0].as_py()["bytes"]
    fp = dataset_fingerprint(spec)
    assert fp.startswith(f"{ID_SCHEME}:uoft-cs/cifar10:plain_text:train[:-5000]:45000:")
    assert decode_image(held[0]["image"], 45000).size == (32, 32)


# -- decoding ------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(size=(16, 12)) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(lambda p: jpeg_bytes()[: len(jpeg_bytes()) // 2], id="truncated-jpeg"),
        pytest.param(lambda p: jpeg_bytes()[:-30], id="truncated-jpeg-tail"),
        pytest.param(lambda p: bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8)), id="random"),
        pytest.param(lambda p: b"", id="empty"),
        pytest.param(lambda p: {"bytes": None, "path": str(p / "missing.png")}, id="missing-file"),
        pytest.param(lambda p: {"bytes": None, "path": None}, id="no-bytes-no-path"),
        pytest.param(lambda p: np.zeros((4, 4, 2), np.uint8), id="two-channel-array"),
    ],
)
@pytest.mark.parametrize("decoder", [decode_image, decode_to_tensor])
def test_undecodable_images_name_the_sample(value, decoder, tmp_path):
    with pytest.raises(BadImageError, match="sample id 1234") as err:
        decoder(value(tmp_path), 1234)
    assert err.value.sample_id == 1234


def test_bad_image_error_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(jpeg_bytes()[:100])
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_image({"bytes": None, "path": str(path)}, 7)
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_to_tensor({"bytes": path.read_bytes(), "path": str(path)}, 7)


def odd_images() -> dict[str, Image.Image]:
    rgb = Image.new("RGB", (20, 10), (200, 100, 50))
    pal = rgb.convert("P")
    pal_t = Image.new("P", (20, 10), 0)
    pal_t.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal_t.info["transparency"] = 0
    return {
        "L": rgb.convert("L"),
        "LA": rgb.convert("LA"),
        "RGBA": Image.new("RGBA", (20, 10), (200, 100, 50, 0)),  # fully transparent
        "P": pal,
        "P-transparent": pal_t,
        "I;16": Image.fromarray(np.full((10, 20), 65535, np.uint16)),
        "I": Image.fromarray(np.full((10, 20), 32896, np.int32)),
        "F": Image.fromarray(np.full((10, 20), 0.5, np.float32)),
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("mode", list(odd_images()))
def test_odd_modes_become_rgb(mode):
    img = odd_images()[mode]
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    data = encode(img, fmt)
    out = decode_image(data, 0)
    assert out.mode == "RGB" and out.size == (20, 10)
    tensor = decode_to_tensor({"bytes": data, "path": None}, 0)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 10, 20)
    pixel = out.getpixel((3, 3))
    if mode in ("RGBA", "P-transparent"):
        assert pixel == (255, 255, 255)  # transparency composited on white
    if mode == "I;16":
        assert pixel == (255, 255, 255)  # 16-bit full scale -> 8-bit full scale (not clipped garbage)
    if mode in ("I", "F"):
        assert pixel == (128, 128, 128)


def test_sizes_extreme_shapes_and_in_memory_values(tmp_path):
    for size in ((8, 8), (1000, 10), (10, 1000), (1, 1)):
        assert decode_image(encode(Image.new("RGB", size, "red")), 0).size == size
    assert decode_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    assert decode_image(np.full((5, 7, 3), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(np.full((5, 7, 3), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert decode_image(torch.zeros(3, 5, 7, dtype=torch.uint8)).size == (7, 5)
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (4, 3), "blue")))
    for value in (str(path), path, {"bytes": None, "path": str(path)}, Image.open(path)):
        assert decode_image(value).getpixel((0, 0)) == (0, 0, 255)


def test_max_side_and_tensor_decoding_agree():
    data = jpeg_bytes((40, 30))
    img = decode_image(data, max_side=20)
    assert img.size == (20, 15)
    assert decode_to_tensor(data, max_side=20).shape == (3, 15, 20)
    full = np.asarray(decode_image(data)).astype(int)
    fast = decode_to_tensor(data).permute(1, 2, 0).numpy().astype(int)  # libjpeg-turbo in torchvision
    assert np.abs(full - fast).max() <= 2
    within_cap = decode_to_tensor(data, max_side=40).permute(1, 2, 0).numpy().astype(int)  # torchvision's too
    assert np.array_equal(within_cap, fast)
    png_data = encode(Image.fromarray(full.astype(np.uint8)))
    assert np.array_equal(decode_to_tensor(png_data).permute(1, 2, 0).numpy(), full.astype(np.uint8))


def test_no_warning_for_good_images():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_to_tensor(jpeg_bytes(), 0)
        decode_image(jpeg_bytes(), 0)


def test_hub_and_local_copies_name_files_alike():
    """Fingerprints use repo-relative file names, so a local copy of Hub parquet files matches the Hub."""
    from hub_ccrop.data.listing import _relative_name

    name = "plain_text/train-00000-of-00001.parquet"
    hub = f"hf://datasets/uoft-cs/cifar10@0123456789abcdef0123456789abcdef01234567/{name}"
    assert _relative_name(hub, "hf://datasets/uoft-cs/cifar10") == name
    assert _relative_name(f"/copies/cifar10/{name}", "/copies/cifar10") == name


def test_share_listings_lets_other_processes_skip_listing(toy_parquet, monkeypatch):
    import pickle

    from hub_ccrop import data as data_lib
    from hub_ccrop.data import listing

    spec = toy_spec(toy_parquet)
    expected = rows_by_id(load_images(spec, streaming=True))
    clear_cache()
    sent = []
    data_lib.share_listings(spec, ["train", "test[:3]"], is_main=True, broadcast=lambda x: sent.append(x) or x)
    received = pickle.loads(pickle.dumps(sent[0]))  # what a broadcast delivers to the other processes
    clear_cache()

    def no_listing(*args):
        raise AssertionError("a non-main process listed the dataset")

    monkeypatch.setattr(listing, "_list_files", no_listing)
    data_lib.share_listings(spec, ["train", "test[:3]"], is_main=False, broadcast=lambda x: received)
    assert rows_by_id(load_images(spec, streaming=True)) == expected
    assert len(load_images(spec, "test")) == 9


# -- streaming from a Hub repo (tests/hub_server.py) ------------------------------------------------

HUB_EPOCH = """
import sys
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from hub_ccrop.data import get_spec, load_images
from hub_ccrop.views import ViewCollate

spec = get_spec("test-user/stream-toy", image_column="img", image_size=16, test_split=None)
stream = load_images(spec, streaming=True).shuffle(seed=0, buffer_size=32)
print("listed", stream.num_shards, flush=True)
sys.stdin.readline()
collate = ViewCollate.from_spec(spec, None, batched=True)
ids = []
for rank in range(2):  # 2 simulated processes x 2 DataLoader workers
    shard = split_dataset_by_node(stream, rank=rank, world_size=2)
    ids += [int(i) for views in DataLoader(shard, batch_size=16, num_workers=2, collate_fn=collate) for i in views.ids]
print("ids", len(ids), sorted(ids) == list(range(len(ids))), flush=True)
"""


def test_hub_streaming_epoch_reads_each_image_byte_once(tmp_path):
    """``dataset: ORG/NAME`` streamed from the loopback Hub: the listing happens once, then an epoch over
    2 processes x 2 workers sends no repo API request and downloads <= 1.05 x the image bytes."""
    import subprocess
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_server import FakeHub

    rng = np.random.default_rng(0)
    features = Features({"img": ImageFeature(), "label": ClassLabel(num_classes=5)})
    files, image_bytes, rows = {}, 0, 0
    for k in range(4):  # 4 files x 2 row groups x 40 rows of incompressible 24 px PNGs
        images = [encode(Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))) for _ in range(80)]
        image_bytes += sum(map(len, images))
        rows += len(images)
        table = pa.Table.from_pydict({"img": [{"bytes": b, "path": None} for b in images], "label": [0] * 80},
                                     schema=features.arrow_schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=40)
        files[f"data/train-{k:05d}-of-00004.parquet"] = buf.getvalue()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with FakeHub() as hub:
        hub.add_files("test-user/stream-toy", files)
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        proc = subprocess.Popen([sys.executable, "-c", HUB_EPOCH], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("listed"), proc.communicate(timeout=60)[1][-3000:]
            assert int(line.split()[1]) == 8  # one shard per row group
            time.sleep(0.3)  # the server records a request just after answering it
            listing = len(hub.requests)
            out, err = proc.communicate("go\n", timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        assert out.split()[-2:] == [str(rows), "True"]  # every row once
        epoch = hub.requests[listing:]
    assert not hub.unhandled
    api = [r for r in epoch if r.origin == "api"]
    assert all("/resolve/" in r.path and r.method == "GET" for r in api), [r.path for r in api]  # no listing
    served = sum(r.body_bytes for r in epoch)
    assert image_bytes <= served <= 1.05 * image_bytes, (served, image_bytes)


@pytest.mark.slow
def test_hub_streaming_training_run_end_to_end(tmp_path):
    """``hub-ccrop train`` with ``data.dataset: ORG/NAME`` and ``data.streaming: true`` against the loopback
    Hub: one warm-up epoch, a localization pass over the streamed rows, one ContrastiveCrop epoch."""
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_server import FakeHub

    from hub_ccrop.synthetic import small_objects_dir

    folder = small_objects_dir(tmp_path / "objects", train=96, test=32, size=32)
    files = {f"data/{p.name}": p.read_bytes() for p in sorted(folder.glob("*.parquet"))}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: hub_stream\nmodel: {name: resnet_tiny_cifar}\nmethod: {name: simclr}\n"
        "data: {dataset: test-user/objects, streaming: true, image_size: 32, batch_size: 32, num_workers: 2}\n"
        "crop: {alpha: 0.6, warmup_epochs: 1, loc_epochs: [1]}\noptim: {lr: 0.1}\n"
        "train: {epochs: 2, knn_every: 0, show_images: 2}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with FakeHub() as hub:
        hub.add_files("test-user/objects", files)
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-m", "hub_ccrop", "train", str(recipe), "--output-dir", str(tmp_path / "run")],
                                env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["crop"] for h in history] == ["rcrop", "ccrop"] and history[0]["loc_images"] == 96
    assert not hub.unhandled

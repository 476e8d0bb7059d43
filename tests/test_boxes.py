"""BoxTable: shared storage across DataLoader workers, file formats, mismatch errors."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hub_ccrop.boxes import ID_SCHEME, BoxTable, BoxTableMismatch, pairwise_box_iou


def random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 2, generator=g) * 0.5
    return torch.cat([lo, lo + torch.rand(n, 2, generator=g) * 0.5], dim=1)


def test_new_table_is_whole_image_and_lookup_update():
    table = BoxTable(10, {"dataset": "toy"})
    assert torch.equal(table.lookup([0, 9]), torch.tensor([[0.0, 0, 1, 1]] * 2))
    boxes = random_boxes(3)
    table.update(torch.tensor([7, 2, 5]), boxes)
    assert torch.equal(table.lookup([2, 5, 7]), boxes[[1, 2, 0]])
    assert table.metadata["id_scheme"] == ID_SCHEME and table.metadata["num_rows"] == 10


@pytest.mark.parametrize("suffix", [".parquet", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    meta = {"dataset": "uoft-cs/cifar10", "split": "train", "fingerprint": "abc", "k": 0.1, "epoch": 200,
            "backbone": "resnet18_cifar"}
    table = BoxTable(50, meta)
    table.update(torch.arange(50), random_boxes(50))
    path = table.save(tmp_path / f"boxes{suffix}")
    loaded = BoxTable.load(path)
    assert torch.equal(loaded.boxes, table.boxes)
    assert loaded.metadata == table.metadata
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_parquet_columns(tmp_path):
    import pyarrow.parquet as pq

    BoxTable(4).save(tmp_path / "b.parquet")
    assert pq.read_table(tmp_path / "b.parquet").column_names == ["id", "x0", "y0", "x1", "y1"]


class IdDataset(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i


class LookupCollate:
    def __init__(self, table: BoxTable):
        self.table = table

    def __call__(self, ids):
        return self.table.lookup(torch.tensor(ids)), os.getpid()  # the worker process that read the table


def test_update_seen_by_persistent_workers():
    table = BoxTable(8)
    loader = DataLoader(IdDataset(), batch_size=4, num_workers=2, persistent_workers=True,
                        collate_fn=LookupCollate(table))
    first, first_pids = zip(*loader, strict=True)
    assert torch.equal(torch.cat(first), torch.tensor([[0.0, 0, 1, 1]] * 8))
    new = random_boxes(8, seed=3)
    table.update(torch.arange(8), new)
    second, second_pids = zip(*loader, strict=True)
    assert torch.equal(torch.cat(second), new)
    # The same two worker processes read both epochs: the update reached workers that were not restarted.
    assert set(second_pids) == set(first_pids) and len(set(first_pids)) == 2 and os.getpid() not in first_pids


def test_mismatch_errors(tmp_path):
    table = BoxTable(100, {"dataset": "cifar10", "fingerprint": "aaa"})
    table.check_compatible(num_rows=100, fingerprint="aaa")
    with pytest.raises(BoxTableMismatch, match="100 rows but the dataset has 120"):
        table.check_compatible(num_rows=120)
    with pytest.raises(BoxTableMismatch, match="fingerprint"):
        table.check_compatible(fingerprint="bbb")
    with pytest.raises(BoxTableMismatch, match="id scheme"):
        BoxTable(3, {"id_scheme": "streaming-index"}).check_compatible()
    with pytest.raises(KeyError, match="sample id 100"):
        table.lookup([5, 100])


def test_bad_updates_and_files(tmp_path):
    table = BoxTable(4)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        table.update([0], torch.tensor([[0.5, 0.5, 0.2, 0.9]]))
    with pytest.raises(ValueError, match="non-finite"):
        table.update([0], torch.tensor([[float("nan"), 0, 1, 1]]))
    with pytest.raises(ValueError, match="2 ids but 1 boxes"):
        table.update([0, 1], torch.tensor([[0.0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="unknown box table format"):
        table.save(tmp_path / "b.csv")
    with pytest.raises(FileNotFoundError, match="no box table"):
        BoxTable.load(tmp_path / "missing.parquet")


def test_official_checkpoint_conversion():
    """Official boxes are (y0, x0, y1, x1) with the last active pixel / size."""
    official = torch.tensor([[0.25, 0.5, 0.75, 0.96875], [0.0, 0.0, 0.96875, 0.96875]])
    table = BoxTable.from_official(official, image_size=(32, 32), metadata={"dataset": "cifar10"})
    expected = torch.tensor([[0.5, 0.25, 1.0, 0.78125], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(table.boxes, expected)


def test_pairwise_iou():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]])
    assert torch.allclose(pairwise_box_iou(a, b), torch.tensor([1.0, 0.5, 0.0]))

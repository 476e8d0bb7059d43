"""Localization (DESIGN.md 2.2): heatmaps with known answers, batching, dtypes, model outputs."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from hub_ccrop.boxes import BoxTable
from hub_ccrop.localize import boxes_from_heatmaps, feature_map, heatmaps, localize_boxes

FULL = [0.0, 0.0, 1.0, 1.0]


def reference_box(raw: torch.Tensor, size: tuple[int, int], k: float) -> list[float]:
    """A straightforward per-image loop (the official code's logic, continuous coordinates)."""
    h, w = size
    m = raw.double()
    if m.max() == m.min():
        return FULL
    m = (m - m.min()) / (m.max() - m.min())
    up = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    rows = torch.nonzero((up > k).any(dim=1)).flatten()
    cols = torch.nonzero((up > k).any(dim=0)).flatten()
    if len(rows) == 0:
        return FULL
    return [cols[0].item() / w, rows[0].item() / h, (cols[-1].item() + 1) / w, (rows[-1].item() + 1) / h]


def blob_map(h, w, rows, cols, value=1.0):
    m = torch.zeros(h, w)
    m[rows[0]:rows[1], cols[0]:cols[1]] = value
    return m


def test_known_answers_same_size():
    maps = torch.stack([
        blob_map(10, 10, (2, 5), (3, 7)),                                     # one blob
        blob_map(10, 10, (1, 3), (1, 2)) + blob_map(10, 10, (6, 9), (7, 10)),  # two blobs -> closure
        torch.ones(10, 10),                                                    # constant
        torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) + 5,   # fully active (k=0.1 of noise)
    ])
    boxes = boxes_from_heatmaps(maps, (10, 10), k=0.1)
    expected = torch.tensor([[0.3, 0.2, 0.7, 0.5], [0.1, 0.1, 1.0, 0.9], FULL,
                             reference_box(maps[3], (10, 10), 0.1)])
    assert torch.allclose(boxes, expected)
    assert not torch.isnan(boxes).any()


def test_all_below_threshold_and_constant_give_whole_image():
    maps = torch.stack([blob_map(6, 6, (1, 2), (1, 2)), torch.zeros(6, 6), torch.full((6, 6), -3.0)])
    assert torch.equal(boxes_from_heatmaps(maps, (6, 6), k=1.0), torch.tensor([FULL] * 3))


def test_fully_active_map_is_whole_image():
    m = torch.linspace(1, 2, 16).reshape(1, 4, 4)
    m[0, 0, 0] = 0.0  # min at one corner: everything else is > k after min-max
    box = boxes_from_heatmaps(m, (32, 32), k=0.1)
    assert torch.equal(box, torch.tensor([FULL]))


@pytest.mark.parametrize(("map_size", "size"), [((4, 4), (32, 32)), ((7, 5), (33, 47)), ((3, 9), (64, 64))])
def test_upsampled_odd_sizes_match_reference(map_size, size):
    g = torch.Generator().manual_seed(sum(map_size) + size[0])
    maps = torch.rand(6, *map_size, generator=g) ** 4
    got = boxes_from_heatmaps(maps, size, k=0.3)
    expected = torch.tensor([reference_box(m, size, 0.3) for m in maps])
    assert torch.allclose(got, expected.float())


def test_mixed_batch_and_bfloat16():
    maps = torch.stack([blob_map(8, 8, (2, 4), (2, 6)), torch.ones(8, 8), torch.zeros(8, 8),
                        blob_map(8, 8, (0, 8), (0, 1), value=3.0)])
    f32 = boxes_from_heatmaps(maps, (16, 16))
    bf16 = boxes_from_heatmaps(maps.bfloat16(), (16, 16))
    assert f32.dtype == bf16.dtype == torch.float32
    assert torch.equal(f32, bf16)
    assert torch.equal(f32[1], torch.tensor(FULL)) and torch.equal(f32[2], torch.tensor(FULL))
    assert f32[3, 0] == 0 and f32[3, 2] < 0.2 and f32[3, 1] == 0 and f32[3, 3] == 1


class BrightnessNet(nn.Module):
    """forward_features = the image itself, so the heatmap is the channel sum of the pixels."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward_features(self, x):
        return x * self.scale


def square_images(n: int, size: int = 16):
    images, boxes = torch.zeros(n, 3, size, size), []
    for t in range(n):
        x0, y0 = t % 8, (3 * t) % 8
        images[t, :, y0:y0 + 5, x0:x0 + 6] = 1.0
        boxes.append([x0 / size, y0 / size, (x0 + 6) / size, (y0 + 5) / size])
    return images, torch.tensor(boxes)


def test_localize_boxes_over_loader_sorted_by_id():
    images, truth = square_images(10)
    ids = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    rows = [(images[i], ids[i].item(), 0) for i in range(10)]

    def collate(batch):
        return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), torch.zeros(len(batch))

    model = BrightnessNet().train()
    out_ids, boxes = localize_boxes(model, DataLoader(rows, batch_size=4, collate_fn=collate), k=0.1, progress=False)
    assert model.training  # mode restored
    assert torch.equal(out_ids, torch.arange(10))
    inverse = torch.argsort(ids)
    assert torch.allclose(boxes, truth[inverse])
    table = BoxTable(10)
    table.update(out_ids, boxes)
    assert torch.allclose(table.lookup(ids), truth)


@pytest.mark.parametrize(("name", "kwargs", "grid"), [
    ("resnet18", {}, (2, 2)),
    ("vit_tiny_patch16_224", {"img_size": 64}, (4, 4)),
    ("convnext_atto", {}, (2, 2)),
])
def test_feature_map_of_timm_models(name, kwargs, grid):
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = feature_map(model, x)
        maps = heatmaps(model, x)
    assert fmap.ndim == 4 and tuple(fmap.shape[-2:]) == grid
    assert maps.shape == (2, *grid) and torch.isfinite(maps).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = boxes_from_heatmaps(heatmaps(model, x), (64, 64))
    assert boxes.shape == (2, 4) and ((boxes >= 0) & (boxes <= 1)).all()

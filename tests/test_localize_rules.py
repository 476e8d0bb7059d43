"""Box rules (threshold, largest component, quantile) and flip-averaged heatmaps (issue 25: no positional prior)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from hub_ccrop.localize import (
    boxes_from_heatmaps,
    boxes_from_maps,
    cell_centres,
    image_boxes,
    input_heatmaps,
    normalize_heatmaps,
)

FULL = [0.0, 0.0, 1.0, 1.0]
SHARED = Path(os.environ.get("HUB_CCROP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PHOTOS = SHARED / "data" / "tiny_imagenet_boxes" / "data" / "train-00000-of-00001.parquet"


def blobs(*rects: tuple[int, int, int, int], size: int = 16) -> torch.Tensor:
    m = torch.zeros(size, size)
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = 1.0
    return m


def test_threshold_rule_is_the_paper_rule():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(5, 4, 4, generator=g) ** 3
    maps, constant = normalize_heatmaps(raw)
    up = torch.nn.functional.interpolate(maps[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(boxes_from_maps(up, constant, 0.3), boxes_from_heatmaps(raw, (16, 16), 0.3))


def test_largest_component_drops_a_second_smaller_hot_spot():
    # a 6x6 object and a 2x8 band on the top row: the paper's rule stretches the box over both
    maps = torch.stack([blobs((8, 14, 4, 10), (0, 2, 0, 8)), blobs((2, 4, 2, 4), (10, 12, 10, 12))])
    constant = torch.zeros(2, dtype=torch.bool)
    closure = boxes_from_maps(maps, constant, 0.5, "threshold")
    largest = boxes_from_maps(maps, constant, 0.5, "largest_component")
    assert torch.allclose(closure[0], torch.tensor([0.0, 0.0, 10 / 16, 14 / 16]))
    assert torch.allclose(largest[0], torch.tensor([4 / 16, 8 / 16, 10 / 16, 14 / 16]))
    assert torch.allclose(largest[1], torch.tensor([2 / 16, 2 / 16, 4 / 16, 4 / 16]))  # a tie: the first in raster order


def test_largest_component_is_8_connected_and_follows_long_paths():
    snake = torch.zeros(16, 16)
    snake[0, :] = snake[:, 15] = snake[15, :] = 1  # a U over the whole border: one component
    snake[2, 2] = snake[3, 3] = snake[4, 4] = 1  # a diagonal line: one component of 3 pixels, not 3 of 1
    box = boxes_from_maps(snake[None], torch.zeros(1, dtype=torch.bool), 0.5, "largest_component")
    assert torch.equal(box, torch.tensor([FULL]))
    diagonal = torch.zeros(16, 16)
    diagonal[2, 2] = diagonal[3, 3] = diagonal[4, 4] = 1
    diagonal[10, 10] = diagonal[10, 11] = 1
    box = boxes_from_maps(diagonal[None], torch.zeros(1, dtype=torch.bool), 0.5, "largest_component")
    assert torch.allclose(box, torch.tensor([[2 / 16, 2 / 16, 5 / 16, 5 / 16]]))


def test_quantile_rule_keeps_each_maps_hottest_share():
    ramp = torch.arange(16.0).view(1, 16).expand(16, 16) / 15  # hotter to the right, column by column
    maps = torch.stack([ramp, ramp * 0.1])  # the same order at a tenth of the contrast
    box = boxes_from_maps(maps, torch.zeros(2, dtype=torch.bool), 0.75, "quantile")
    assert torch.allclose(box, torch.tensor([[12 / 16, 0.0, 1.0, 1.0]] * 2))  # the hottest 4 columns in both
    assert torch.equal(boxes_from_maps(maps, torch.tensor([False, True]), 0.75, "quantile")[1], torch.tensor(FULL))


class PriorNet(nn.Module):
    """A stride-2 CNN (its cells sit off-centre in the image) with its top row of cells amplified: a positional
    prior (linear in the input, so the receptive-field probe still places its cells)."""

    def __init__(self, prior: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.prior = prior

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.conv(x)
        gain = torch.ones_like(feats[:1, :1])
        gain[..., 0, :] += self.prior
        return feats * gain


def test_flip_averaged_boxes_rotate_exactly_with_the_image(one_thread):
    """Averaging with the rotated image's map makes the boxes equivariant to a 180-degree rotation, exactly:
    the flipped map is flipped back on the pixel grid, after each cell was placed on its receptive field."""
    model = PriorNet(prior=0.0).eval()
    centres = cell_centres(model, (32, 32))
    assert centres.offset != ((centres.stride[0] - 1) / 2,) * 2  # stride-2 convs: cells not symmetric in the image
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        boxes = image_boxes(model, x, k=0.4, flip=True)
        rotated = image_boxes(model, x.flip(-2, -1), k=0.4, flip=True)
        plain = image_boxes(model, x, k=0.4)
        plain_rotated = image_boxes(model, x.flip(-2, -1), k=0.4)
    assert torch.allclose(rotated, 1 - boxes[:, [2, 3, 0, 1]], atol=1e-6)
    assert not torch.allclose(plain_rotated, 1 - plain[:, [2, 3, 0, 1]], atol=1e-6)  # without it they need not


def test_flip_of_constant_maps_is_the_whole_image():
    class Flat(nn.Module):
        def forward_features(self, x):
            return torch.ones(x.shape[0], 2, 4, 4)

    maps, constant = input_heatmaps(Flat(), torch.zeros(2, 3, 16, 16), alignment="official", flip=True)
    assert constant.all() and torch.equal(boxes_from_maps(maps, constant), torch.tensor([FULL] * 2))


def read_photos(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Tiny ImageNet photos (normalized, 64 px) and their object boxes."""
    import pyarrow.parquet as pq
    from PIL import Image
    from torchvision.transforms.functional import normalize, pil_to_tensor

    table = next(pq.ParquetFile(PHOTOS).iter_batches(batch_size=n, columns=["image", "gt_box"])).to_pylist()
    images = torch.stack([pil_to_tensor(Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")) for r in table])
    x = normalize(images.float() / 255, [0.48, 0.448, 0.398], [0.23, 0.227, 0.226])
    return x, torch.tensor([r["gt_box"] for r in table])


@pytest.mark.skipif(not PHOTOS.is_file(), reason="no Tiny ImageNet photos under $HUB_CCROP_SHARED/data")
def test_boxes_flip_with_photos_turned_upside_down(one_thread):
    """On real photos, a localizer with a top-row prior: plain boxes stay up whichever way up the photo is;
    flip-averaged boxes follow the photo (mean centre offset below 0.01 of the image, against 0.04 without)."""
    x, _ = read_photos(256)
    model = PriorNet(prior=3.0).eval()
    offsets = {}
    with torch.no_grad():
        for flip in (False, True):
            boxes = image_boxes(model, x, k=0.5, flip=flip)
            upside_down = image_boxes(model, x.flip(-2), k=0.5, flip=flip)
            back_y = 1 - (upside_down[:, 1] + upside_down[:, 3]) / 2  # centre y, flipped back
            offsets[flip] = float((back_y - (boxes[:, 1] + boxes[:, 3]) / 2).mean())
    assert abs(offsets[False]) > 0.04  # the prior: boxes of flipped photos do not follow them
    assert abs(offsets[True]) < 0.01

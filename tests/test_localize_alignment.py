"""Heatmap alignment (DESIGN.md 2.2): probe networks, a bright square swept over a stride period.

A symmetric-weight copy of a backbone (uniform positive weights, neutral norms, average pools, zero
position embeddings) turns a bright square into a heatmap blob symmetric about the square's centre, so
the box centre must land on the square's centre. With the receptive-field mapping (the default) the
error averaged over one stride period is ~0; the official mode reproduces the official code's offset:
``(S-1)/2 - a`` from its upsampling plus ``-0.5`` px from its box rule ``x1 = last/W``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import hub_ccrop.models  # noqa: F401  (registers resnet18_cifar)
from hub_ccrop.localize import (
    CellCentres,
    boxes_from_heatmaps,
    cell_centres,
    heatmaps,
    localize_boxes,
    official_boxes_from_heatmaps,
    upsample_heatmaps,
)

# name, create kwargs, input size, total stride S, cell-0 centre a, square side, threshold k, sweep step.
# resnet50 needs 224 px: at smaller sizes its blob reaches the image border and the box is clipped.
PROBES = [
    ("resnet18_cifar", {}, 64, 8, 0.0, 12, 0.3, 1),
    ("resnet50", {}, 224, 32, 0.0, 80, 0.5, 4),
    ("convnext_tiny", {}, 128, 32, 15.5, 40, 0.5, 2),
    ("vit_small_patch16_224", {"img_size": 128}, 128, 16, 7.5, 24, 0.5, 1),
]


def symmetric_copy(model: nn.Module) -> nn.Module:
    """Uniform positive weights, no biases, neutral BN, LayerNorm off (it zeroes channel-equal features),
    max-pool -> avg-pool, zero position embeddings; ConvNeXt's layer scale 0.1 keeps the blob inside 128 px."""
    sym = copy.deepcopy(model).eval()
    for name, module in list(sym.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(module, nn.LayerNorm):
            setattr(sym.get_submodule(parent), attr, nn.Identity())
        elif isinstance(module, nn.MaxPool2d):
            setattr(sym.get_submodule(parent), attr, nn.AvgPool2d(module.kernel_size, module.stride, module.padding))
    with torch.no_grad():
        for module in sym.modules():
            for pname, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.Conv2d | nn.Linear) and pname == "weight":
                    param.fill_(1.0 / param[0].numel())
                elif pname in ("bias", "pos_embed", "cls_token", "reg_token"):
                    param.zero_()
                else:
                    param.fill_(0.1 if pname == "gamma" else 1.0)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    return sym


def swept_squares(size: int, side: int, stride: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on black, moved over one full stride period (x by t, y by 3t mod S) around the centre."""
    shifts = range(0, stride, step)
    images, centres = torch.zeros(len(shifts), 3, size, size), []
    for i, t in enumerate(shifts):
        x0 = size // 2 - side // 2 - stride // 2 + t
        y0 = size // 2 - side // 2 - stride // 2 + (3 * t) % stride
        images[i, :, y0:y0 + side, x0:x0 + side] = 1.0
        centres.append([x0 + side / 2, y0 + side / 2])
    return images, torch.tensor(centres)


def centre_errors(boxes: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Box centre minus square centre, in pixels, ``[N, 2]`` (x, y)."""
    return torch.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], dim=1) / 2 * size - centres


@pytest.mark.parametrize(("name", "kwargs", "size", "stride", "offset", "side", "k", "step"), PROBES,
                         ids=[p[0] for p in PROBES])
def test_swept_square_lands_on_its_box(one_thread, name, kwargs, size, stride, offset, side, k, step):
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    centres = cell_centres(model, (size, size))
    assert centres.stride == pytest.approx((stride, stride), abs=1e-6)
    assert centres.offset == pytest.approx((offset, offset), abs=1e-6)

    images, truth = swept_squares(size, side, stride, step)
    with torch.no_grad():
        maps = heatmaps(symmetric_copy(model), images)
    aligned = centre_errors(boxes_from_heatmaps(maps, (size, size), k, centres), truth, size)
    official = centre_errors(official_boxes_from_heatmaps(maps, (size, size), k), truth, size)
    patchify = centre_errors(boxes_from_heatmaps(maps, (size, size), k), truth, size)

    # Over a full stride period the aligned boxes are centred on the squares (sub-cell interpolation
    # errors of single positions cancel); the official offset is (S-1)/2 - a - 0.5 px.
    assert aligned.mean(dim=0).abs().max() <= 0.25, aligned.mean(dim=0)
    expected_official = (stride - 1) / 2 - offset - 0.5
    assert (official.mean(dim=0) - expected_official).abs().max() <= 0.25, official.mean(dim=0)
    assert (patchify.mean(dim=0) - (stride - 1) / 2 + offset).abs().max() <= 0.25
    if stride < 16 or name == "resnet50":  # smooth maps: every single position is within half a pixel
        assert aligned.abs().max() <= 0.5, aligned


def official_update_box(maps: torch.Tensor, size: tuple[int, int], t: float) -> torch.Tensor:
    """The official ``update_box`` loop (DDP_simclr_ccrop.py), as (x0, y0, x1, y1)."""
    n, hf, wf = maps.shape
    m = maps.view(n, -1)
    m = m - m.min(1, keepdim=True)[0]
    m = m / m.max(1, keepdim=True)[0]
    m = F.interpolate(m.view(n, 1, hf, wf), size=size, mode="bilinear")
    boxes = []
    for hmap in m:
        hmap = hmap.squeeze(0)
        h_filter = (hmap.max(1)[0] > t).int()
        w_filter = (hmap.max(0)[0] > t).int()
        h_min, h_max = torch.nonzero(h_filter).view(-1)[[0, -1]] / size[0]
        w_min, w_max = torch.nonzero(w_filter).view(-1)[[0, -1]] / size[1]
        boxes.append(torch.tensor([w_min, h_min, w_max, h_max]))
    return torch.stack(boxes)


@pytest.mark.parametrize(("map_size", "size", "k"), [((4, 4), (32, 32), 0.1), ((7, 5), (33, 47), 0.3),
                                                     ((7, 7), (224, 224), 0.05), ((2, 9), (64, 64), 0.5)])
def test_official_mode_reproduces_update_box(map_size, size, k):
    g = torch.Generator().manual_seed(size[0] + map_size[1])
    maps = torch.rand(16, *map_size, generator=g) ** 3 * 7 - 2
    assert torch.equal(official_boxes_from_heatmaps(maps, size, k), official_update_box(maps, size, k))


def test_official_mode_constant_map_is_whole_image_not_nan():
    boxes = official_boxes_from_heatmaps(torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]), (16, 16))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))


def test_upsampling_places_each_cell_on_its_centre():
    maps = torch.zeros(3, 4, 5)
    maps[0, 1, 2] = maps[1, 0, 0] = maps[2, 3, 4] = 1.0
    up = upsample_heatmaps(maps, (32, 40), CellCentres((8.0, 8.0), (0.0, 0.0)))
    peaks = [divmod(int(u.argmax()), 40) for u in up]
    assert peaks == [(8, 16), (0, 0), (24, 32)]  # pixel a + S*o, not S*o + 3.5
    assert torch.allclose(up[0, 8, 8:25], torch.tensor([*range(9), *range(7, -1, -1)]) / 8.0)  # linear between centres
    assert torch.equal(up[2, 24:, 32:], torch.ones(8, 8))  # beyond the last centre: the last cell's value
    # the patchify placement is exactly bilinear align_corners=False upsampling
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 7, 5, generator=g)
    assert torch.allclose(upsample_heatmaps(raw, (33, 47), CellCentres.patchify((7, 5), (33, 47))),
                          upsample_heatmaps(raw, (33, 47)), atol=1e-6)


def test_cell_centres_of_odd_inputs_and_cache(monkeypatch):
    model = timm.create_model("resnet18_cifar", pretrained=False, num_classes=0)
    centres = cell_centres(model, (33, 47))  # 5 x 6 cells, the last ones partly over the border
    assert centres == CellCentres((8.0, 8.0), (0.0, 0.0))
    calls = []
    monkeypatch.setattr("hub_ccrop.localize._probe_centres", lambda m, s: calls.append(s))
    other = timm.create_model("resnet18_cifar", pretrained=False, num_classes=0)  # same architecture
    cell_centres(other, (33, 47))
    assert calls == []
    cell_centres(other, (35, 47))
    assert calls == [(35, 47)]


class GatedNet(nn.Module):
    """A feature map that is not linear in the input (a product of two convs): the probe must not trust it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward_features(self, x):
        return self.a(x) * self.b(x)


def test_nonlinear_architecture_falls_back_to_patchify_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        centres = cell_centres(GatedNet(), (16, 16))
    assert centres == CellCentres.patchify((8, 8), (16, 16))
    assert any("not a linear function" in str(w.message) for w in caught)


def test_localize_boxes_alignment_modes():
    model = timm.create_model("resnet18_cifar", pretrained=False, num_classes=0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loader = [(images, torch.arange(4), torch.zeros(4))]
    with torch.no_grad():
        maps = heatmaps(model.eval(), images)
    _, aligned = localize_boxes(model, loader, k=0.3, progress=False)
    _, official = localize_boxes(model, loader, k=0.3, alignment="official", progress=False)
    assert torch.equal(aligned, boxes_from_heatmaps(maps, (32, 32), 0.3, cell_centres(model, (32, 32))))
    assert torch.equal(official, official_boxes_from_heatmaps(maps, (32, 32), 0.3))
    with pytest.raises(ValueError, match="alignment must be one of"):
        localize_boxes(model, loader, alignment="bilinear", progress=False)

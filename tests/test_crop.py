"""ContrastiveCrop sampling (docs/METHOD.md, section 2): geometry, distributions, per-image vs batched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from hub_ccrop.crop import (
    FULL_BOX,
    ContrastiveCrop,
    _fallback_crop,
    object_miss_rate,
    sample_beta,
    sample_crop_params,
)

N_DRAWS = 4000


def per_image_draws(height, width, box, alpha, n=N_DRAWS, seed=0, scale=(0.2, 1.0)):
    crop = ContrastiveCrop(8, scale=scale, alpha=alpha)
    img = torch.zeros(3, height, width)
    g = torch.Generator().manual_seed(seed)
    return np.array([crop.get_params(img, box, generator=g) for _ in range(n)])


def batched_draws(height, width, box, alpha, n=N_DRAWS, seed=1, scale=(0.2, 1.0)):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([box], dtype=torch.float32).expand(n, 4)
    sizes = torch.tensor([[height, width]]).expand(n, 2)
    return sample_crop_params(boxes, sizes, scale=scale, alpha=alpha, generator=g).numpy()


def rrc_draws(height, width, n=N_DRAWS, seed=2):
    torch.manual_seed(seed)
    img = torch.zeros(3, height, width)
    return np.array([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])


def same_distribution(a: np.ndarray, b: np.ndarray, p_min: float = 1e-3) -> None:
    """Chi-square two-sample test per column (i, j, h, w) on the pooled discrete support."""
    from scipy import stats  # imported where used: 1.5 s that a test worker without these tests saves

    for col, name in enumerate("ijhw"):
        values = np.union1d(a[:, col], b[:, col])
        bins = np.append(values, values[-1] + 1) if len(values) <= 30 else np.quantile(
            np.concatenate([a[:, col], b[:, col]]), np.linspace(0, 1, 21)
        )
        ca, _ = np.histogram(a[:, col], bins=np.unique(bins))
        cb, _ = np.histogram(b[:, col], bins=np.unique(bins))
        keep = (ca + cb) > 0
        table = np.stack([ca[keep], cb[keep]])
        if table.shape[1] < 2:
            continue
        p = stats.chi2_contingency(table).pvalue
        assert p > p_min, f"column {name}: p={p:.2e}"


@pytest.mark.parametrize("size", [(32, 32), (96, 64), (224, 160)])
def test_full_box_alpha_one_matches_random_resized_crop(size):
    rrc = rrc_draws(*size)
    same_distribution(per_image_draws(*size, FULL_BOX, alpha=1.0), rrc)
    same_distribution(batched_draws(*size, FULL_BOX, alpha=1.0), rrc)


def test_distribution_test_has_power():
    """The two-sample check above detects a real difference (alpha 0.1 vs RandomResizedCrop)."""
    with pytest.raises(AssertionError):
        same_distribution(per_image_draws(64, 64, FULL_BOX, alpha=0.1), rrc_draws(64, 64))


@pytest.mark.parametrize("box", [(0.3, 0.2, 0.6, 0.5), (0.0, 0.0, 0.1, 0.1), (0.8, 0.7, 1.0, 1.0), (0.5, 0.5, 0.5, 0.5)])
@pytest.mark.parametrize("alpha", [0.1, 0.6, 1.0])
def test_per_image_and_batched_agree(box, alpha):
    same_distribution(per_image_draws(48, 80, box, alpha, n=3000), batched_draws(48, 80, box, alpha, n=3000))


@pytest.mark.parametrize("draw", [per_image_draws, batched_draws])
def test_crops_inside_image_and_centers_in_box_range(draw):
    rng = np.random.default_rng(0)
    n_accepted = 0
    for _ in range(20):
        height = rng.integers(8, 200)
        width = max(4, int(height * np.exp(rng.uniform(-1.2, 1.2))))
        x0, x1 = np.sort(rng.random(2))
        y0, y1 = np.sort(rng.random(2))
        box = (x0, y0, x1, y1)
        p = draw(height, width, box, alpha=0.3, n=200)
        i, j, h, w = p.T
        assert (h > 0).all() and (w > 0).all()
        assert (i >= 0).all() and (j >= 0).all() and (i + h <= height).all() and (j + w <= width).all()
        j0 = np.clip(np.floor(x0 * width) - w // 2, 0, width - w)
        j1 = np.clip(np.floor(x1 * width) - w // 2, 0, width - w)
        i0 = np.clip(np.floor(y0 * height) - h // 2, 0, height - h)
        i1 = np.clip(np.floor(y1 * height) - h // 2, 0, height - h)
        # Step 4's central fallback is the one draw allowed outside the box range.
        accepted = ~(p == np.array(_fallback_crop(height, width, (3 / 4, 4 / 3)))).all(axis=1)
        n_accepted += accepted.sum()
        assert ((j >= j0) & (j <= j1))[accepted].all()
        assert ((i >= i0) & (i <= i1))[accepted].all()
    assert n_accepted > 0.9 * 20 * 200


def test_scale_relative_to_whole_image_not_box():
    p = batched_draws(100, 100, (0.45, 0.45, 0.55, 0.55), alpha=1.0, n=2000)
    area = p[:, 2] * p[:, 3] / 100**2
    assert area.min() > 0.18 and area.max() <= 1.02
    assert np.median(area) > 0.5  # a tiny box does not shrink the crops


def test_small_alpha_pushes_positions_to_range_ends():
    box = (0.2, 0.2, 0.8, 0.8)

    def end_share(alpha):
        p = batched_draws(100, 100, box, alpha, n=4000, scale=(0.04, 0.04))  # fixed 20x20 crops
        j0, j1 = math.floor(0.2 * 100) - 10, math.floor(0.8 * 100) - 10
        rel = (p[:, 1] - j0) / (j1 - j0)
        return np.mean((rel < 0.1) | (rel > 0.9))

    uniform, suppressed = end_share(1.0), end_share(0.1)
    assert abs(uniform - 0.2) < 0.03  # uniform over the inclusive range
    assert suppressed > uniform + 0.3


def test_uniform_position_reaches_both_ends_inclusive():
    p = batched_draws(40, 40, FULL_BOX, alpha=1.0, n=3000, scale=(0.25, 0.25))
    w = p[:, 3]
    assert set(np.unique(p[w == 20, 1])) == set(range(0, 21))


@pytest.mark.parametrize("alpha", [0.1, 0.6, 1.0, 2.5])
def test_beta_sampler_matches_scipy(alpha):
    from scipy import stats

    x = sample_beta(alpha, 20000, generator=torch.Generator().manual_seed(3)).numpy()
    assert np.isfinite(x).all() and (x >= 0).all() and (x <= 1).all()
    assert stats.kstest(x, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_fallback_for_extreme_aspect_ratio():
    """A 1000x10 image accepts no try at scale 1: both forms use torchvision's central fallback."""
    crop = ContrastiveCrop(8, scale=(1.0, 1.0))
    img = torch.zeros(3, 10, 1000)
    i, j, h, w = crop.get_params(img, (0.2, 0.2, 0.4, 0.4), generator=torch.Generator().manual_seed(0))
    rrc = RandomResizedCrop.get_params(img, [1.0, 1.0], [3 / 4, 4 / 3])
    assert (i, j, h, w) == tuple(rrc) == (0, 493, 10, 13)  # ratio clamped to 4/3, centered
    batched = sample_crop_params(torch.tensor([[0.2, 0.2, 0.4, 0.4]]), torch.tensor([[10, 1000]]), scale=(1.0, 1.0))
    assert tuple(batched[0].tolist()) == tuple(rrc)


def test_seeded_generator_is_reproducible():
    crop = ContrastiveCrop(16, alpha=0.6)
    img = Image.new("RGB", (50, 40))
    a = [crop.get_params(img, (0.1, 0.1, 0.9, 0.5), torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [crop.get_params(img, (0.1, 0.1, 0.9, 0.5), torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b
    boxes, sizes = torch.rand(64, 4).sort(dim=1).values[:, [0, 1, 2, 3]], torch.full((64, 2), 40)
    boxes = torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2].clamp(min=boxes[:, 0]), boxes[:, 3]], 1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_crop_params(boxes, sizes, generator=g1), sample_crop_params(boxes, sizes, generator=g2))


def test_transform_output_pil_and_tensor():
    crop = ContrastiveCrop(24, alpha=0.6)
    out = crop(Image.new("RGB", (64, 48)), (0.2, 0.2, 0.5, 0.5))
    assert out.size == (24, 24)
    out = crop(torch.rand(3, 48, 64), None)
    assert out.shape == (3, 24, 24)
    assert "alpha=0.6" in repr(crop)


@pytest.mark.parametrize("kwargs", [{"scale": (0.5, 0.2)}, {"ratio": (0, 1)}, {"alpha": 0.0}])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        ContrastiveCrop(8, **kwargs)


def test_object_miss_rate():
    """Whole-image boxes make both samplers identical; boxes on the object cut misses (the paper's claim)."""
    n = 2000
    sizes = torch.full((n, 2), 64)
    objects = torch.tensor([[0.05, 0.05, 0.3, 0.3]]).expand(n, 4)
    full = torch.tensor([FULL_BOX]).expand(n, 4)
    same = object_miss_rate(objects, full, sizes, alpha=1.0, seed=1)
    assert abs(same["rcrop"] - same["ccrop"]) < 0.03
    tight = object_miss_rate(objects, objects, sizes, alpha=0.6, seed=1)
    assert tight["rcrop"] > 0.2 and tight["ccrop"] < tight["rcrop"] - 0.1
    whole_object = object_miss_rate(full, full, sizes, seed=1)
    assert whole_object["rcrop"] < 0.01  # crops cover >= ~20% of a whole-image object (w, h are rounded)

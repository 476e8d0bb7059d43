"""box_follow: do the boxes stay on the content when the frame moves? (no ground truth needed)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hub_ccrop.box_follow import FOLLOWS, FollowCheck, follow_offsets, window_boxes
from hub_ccrop.box_quality import box_quality, quality_line
from hub_ccrop.localize import localize_boxes


def planted_squares(n: int, size: int = 64, side: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Dark images with one bright square each, placed where both windows of the check see all of it."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size)
    lo, hi = size // 4, size - size // 4 - side  # inside both windows: [16, 48) for 64 px
    corners = torch.randint(lo, hi + 1, (n, 2), generator=g)
    for image, (y, x) in zip(images, corners.tolist(), strict=True):
        image[:, y:y + side, x:x + side] = 1.0
    boxes = torch.stack([corners[:, 1], corners[:, 0], corners[:, 1] + side, corners[:, 0] + side], dim=1) / size
    return images, boxes.float()


def bright_box(images: Tensor) -> Tensor:
    """A localizer that knows where the object is: the rectangle around the pixels brighter than half."""
    mask = images.mean(dim=1) > 0.5
    height, width = mask.shape[-2:]

    def extent(active: Tensor) -> tuple[Tensor, Tensor]:  # first active index, one past the last
        return active.float().argmax(dim=1), active.shape[1] - active.flip(1).float().argmax(dim=1)

    (x0, x1), (y0, y1) = extent(mask.any(dim=1)), extent(mask.any(dim=2))
    return torch.stack([x0 / width, y0 / height, x1 / width, y1 / height], dim=1)


def centred_box(images: Tensor) -> Tensor:
    return torch.tensor([[0.3, 0.2, 0.7, 0.8]]).expand(len(images), 4)


def whole_image(images: Tensor) -> Tensor:
    return torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(images), 4)


def test_window_boxes_map_back_onto_the_image():
    images, truth = planted_squares(16)
    first, second, moved = window_boxes(bright_box, images, shift=0.25)
    assert moved.tolist() == [0.25, 0.25]
    # the square is in both windows: both boxes land on it (within the resize's one-pixel blur at its edges)
    assert (first - truth).abs().max() <= 1.5 / 64 and (second - truth).abs().max() <= 1.5 / 64


def test_boxes_on_the_content_score_one_and_boxes_of_the_frame_score_zero():
    images, _ = planted_squares(32)
    assert follow_offsets(bright_box, images).abs().max() < 0.05
    for frame_box in (centred_box, whole_image):  # the baselines move with the window: exactly 1 shift
        assert torch.allclose(follow_offsets(frame_box, images), torch.ones(32, 2), atol=1e-6)
        check = FollowCheck(images=32)
        check.record(check.offsets(frame_box, images))
        assert check.score() == pytest.approx(0.0, abs=1e-6)


def test_random_boxes_score_zero():
    """Boxes that know nothing (drawn at random, whatever the window shows) score 0 on average."""
    g = torch.Generator().manual_seed(0)

    def random_boxes(images: Tensor) -> Tensor:
        lo = torch.rand(len(images), 2, generator=g) * 0.6
        return torch.cat([lo, lo + 0.2 + torch.rand(len(images), 2, generator=g) * 0.2], dim=1)

    check = FollowCheck(images=4000)
    check.record(check.offsets(random_boxes, torch.zeros(4000, 3, 16, 16)))
    # per image and axis the offset has sd ~0.9 around 1: the mean of 8,000 is within 0.03 of it (3 sd)
    assert check.score() == pytest.approx(0.0, abs=0.03)


def test_the_check_takes_only_its_first_images_over_batches():
    images, _ = planted_squares(10)
    seen = []

    def counting(x: Tensor) -> Tensor:
        seen.append(len(x))
        return centred_box(x)

    check = FollowCheck(images=7)
    offsets = torch.cat([check.offsets(counting, batch) for batch in images.split(4)])
    assert check.count == 7 and seen == [4, 4, 3, 3]  # two windows per checked batch, none after the seventh image
    assert not offsets[:7].isnan().any() and offsets[7:].isnan().all()
    check.record(offsets)
    assert check.score() == pytest.approx(0.0, abs=1e-6)  # the NaN rows are left out
    assert FollowCheck(images=0).score() is None


def test_an_image_a_sharded_loader_repeats_counts_once():
    """accelerate pads the last batches of a shard with repeated samples: the offsets are gathered by id, so
    the score is that of the distinct images."""
    images, _ = planted_squares(8)
    content = torch.zeros(8, dtype=torch.bool)
    content[:2] = True  # images 0 and 1 have their square; the others are blank: whole-image boxes, offset 1
    images[~content] = 0.0
    distinct = DataLoader(list(zip(images, range(8), strict=True)), batch_size=4)
    padded = DataLoader(list(zip(images, range(8), strict=True)) + [(images[0], 0), (images[1], 1)] * 3, batch_size=4)
    scores = []
    for loader in (distinct, padded):
        check = FollowCheck(images=20)
        localize_boxes(BrightnessMap(), loader, k=0.5, progress=False, follow=check)
        scores.append(check.score())
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)
    assert scores[0] == pytest.approx(2 / 8, abs=0.02)  # two images of eight on the content


class BrightnessMap(nn.Module):
    """A 'backbone' whose feature map is the image's brightness pooled to stride 4: it finds bright objects."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(x)


class FixedMap(BrightnessMap):
    """A 'backbone' hot in the same place whatever the image shows: a positional prior and nothing else."""

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.pool(x) * 0
        out[:, :, : out.shape[2] // 2, : out.shape[3] // 2] = 1.0
        return out


@pytest.mark.filterwarnings("ignore:FixedMap")  # its map ignores the input: no receptive field to measure
@pytest.mark.parametrize("flip", [False, True])
def test_a_pass_reports_whether_its_boxes_follow_the_content(flip):
    """localize_boxes feeds the check its first images; box_quality keeps the score and the line states it."""
    images, truth = planted_squares(40)
    loader = DataLoader(list(zip(images, range(40), strict=True)), batch_size=16)
    scores = {}
    for name, model in (("content", BrightnessMap()), ("prior", FixedMap())):
        check = FollowCheck(images=24)
        _, boxes = localize_boxes(model, loader, k=0.5, flip=flip, progress=False, follow=check)
        assert (~check.gathered.isnan().flatten(1).any(dim=1)).sum() == 24  # the first 24 of 40
        assert check.count == 24
        scores[name] = check.score()
        quality = box_quality(boxes, truth, follow=scores[name])
        assert quality.box_follow == scores[name]
        assert f"boxes follow the content {scores[name]:.2f}" in quality_line(quality.metrics())
    assert scores["content"] > 0.9
    # a fixed map scores 0; flip averaging makes it symmetric, so its boxes are the same centred box: 0 too
    assert abs(scores["prior"]) < 0.05


def test_several_sources_the_preferred_one_unless_it_fails():
    """Offsets [N, S, 2] of a pass that compared heatmap sources (the preferred one first): a score per source;
    the preferred one is kept while its boxes follow the content (>= FOLLOWS), else the best follower (the
    first on a tie); rows past the checked images (NaN) are left out."""
    frame, content = torch.ones(6, 2), torch.zeros(6, 2)  # moves with the frame / stays on the content
    offsets = torch.stack([frame, content, content + 0.5], dim=1)
    offsets[4:] = float("nan")
    check = FollowCheck(images=4)
    check.record(offsets, ("attention", "norm", "half"))
    torch.testing.assert_close(check.scores(), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    assert (check.best, check.source, check.score()) == (1, "norm", 1.0)
    assert check.source_scores() == {"attention": 0.0, "norm": 1.0, "half": 0.5}
    check.record(torch.stack([content, content], dim=1), ("attention", "norm"))
    assert (check.best, check.source) == (0, "attention")
    check.record(torch.stack([content + 1 - FOLLOWS, content], dim=1), ("attention", "norm"))
    assert (check.best, check.score()) == (0, pytest.approx(FOLLOWS))  # follows just enough: kept, though norm does better
    check.record(torch.stack([content + 1 - FOLLOWS + 0.01, content], dim=1), ("attention", "norm"))
    assert (check.best, check.score()) == (1, 1.0)
    check.record(content)  # one source, no names: the single-source pass
    assert (check.best, check.source, check.score(), check.source_scores()) == (0, None, 1.0, {})

"""box_quality: IoU of learned boxes beside the whole-image and centred same-size baselines (by hand, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from hub_ccrop.box_quality import BOX_KEYS, box_quality, box_verdict, centred_boxes, pass_line, quality_line


def test_centred_boxes_keep_size_and_sit_on_the_image_centre():
    boxes = torch.tensor([[0.0, 0.0, 0.4, 0.2], [0.5, 0.6, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    centred = centred_boxes(boxes)
    expected = torch.tensor([[0.3, 0.4, 0.7, 0.6], [0.25, 0.3, 0.75, 0.7], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(centred, expected, atol=1e-15)


def test_baselines_by_hand():
    # image 1: a small object (area 0.04) in the top-left corner, found exactly
    # image 2: a large object (area 0.64) in the centre, box half its width
    gt = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.9, 0.9]], dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.5, 0.9]], dtype=torch.float64)
    q = box_quality(boxes, gt, follow=0.25)
    iou = [1.0, 0.32 / 0.64]
    whole = [0.04, 0.64]
    # centred: image 1's box moves to (0.4, 0.4, 0.6, 0.6): no overlap; image 2's to (0.3, 0.1, 0.7, 0.9): inside
    centred = [0.0, 0.32 / 0.64]
    assert q.box_iou == pytest.approx(sum(iou) / 2, abs=1e-12)
    assert q.box_iou_whole_image == pytest.approx(sum(whole) / 2, abs=1e-12)
    assert q.box_iou_centred == pytest.approx(sum(centred) / 2, abs=1e-12)
    assert q.small_objects == 1
    assert (q.box_iou_small, q.box_iou_whole_image_small, q.box_iou_centred_small) == pytest.approx((1.0, 0.04, 0.0))
    assert (q.box_centre_x, q.box_centre_y) == pytest.approx(((0.1 + 0.3) / 2, (0.1 + 0.5) / 2))
    assert (q.gt_centre_x, q.gt_centre_y) == pytest.approx((0.3, 0.3))
    assert q.box_area == pytest.approx((0.04 + 0.32) / 2)
    assert q.box_follow == 0.25
    assert list(q.metrics()) == list(BOX_KEYS)


def test_small_objects_use_area_at_most_a_quarter_and_none_small_is_nan():
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.6, 0.6]], dtype=torch.float64)  # areas 0.25, 0.36
    assert box_quality(gt, gt).small_objects == 1
    q = box_quality(gt[1:], gt[1:])
    assert q.small_objects == 0 and math.isnan(q.box_iou_small)
    assert "box_iou_small" not in q.metrics()  # JSON has no NaN
    assert "small objects" not in q.line() and "centred box of the same size 0.286" in q.line()  # 0.16 / 0.56


def test_without_ground_truth_only_area_and_centre():
    boxes = torch.tensor([[0.0, 0.2, 0.5, 0.6]])
    q = box_quality(boxes)
    assert not q.has_ground_truth
    assert q.metrics() == pytest.approx({"box_area": 0.2, "box_centre_x": 0.25, "box_centre_y": 0.4})
    assert q.line() == "mean box area 0.20, mean box centre (0.25, 0.40) (image centre (0.50, 0.50))"
    followed = box_quality(boxes, follow=0.875)  # the one sign without ground truth
    assert followed.metrics()["box_follow"] == 0.875
    assert followed.line() == (
        "mean box area 0.20, mean box centre (0.25, 0.40) (image centre (0.50, 0.50)); boxes follow the content "
        "0.88 (1: they stay on what the image shows when the frame moves, 0: they move with the frame, as a "
        "centred box does)")


def test_line_and_pass_line_name_every_number():
    gt = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.9, 0.9]])
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.5, 0.9]])
    metrics = box_quality(boxes, gt).metrics()
    line = quality_line(metrics)
    assert line.startswith("IoU with the objects 0.750 (whole image 0.340, centred box of the same size 0.250); "
                           "small objects (area <= 25%, 1 images) 1.000 (whole 0.040, centred 0.000)")
    assert "mean box centre (0.20, 0.30), objects' (0.30, 0.30), image centre (0.50, 0.50)" in line
    record = {"loc_images": 2, "loc_seconds": 1.25, "localizer": "hf-hub:org/dino"} | metrics
    assert pass_line(record) == f"localized 2 images in 1.2s with hf-hub:org/dino: {line}"
    assert pass_line(record | {"localizer": "the backbone being trained"}) == f"localized 2 images in 1.2s: {line}"


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="ground-truth boxes"):
        box_quality(torch.zeros(3, 4), torch.zeros(2, 4))


def test_several_objects_per_image_score_the_best_match():
    nan = float("nan")
    gt = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 1.0, 1.0]],   # a small and a large object
                       [[0.4, 0.4, 0.6, 0.6], [nan] * 4],              # one small object
                       [[nan] * 4, [nan] * 4]], dtype=torch.float64)   # no object: left out
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.4, 0.4, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    q = box_quality(boxes, gt)
    assert q.box_iou == 1.0 and q.box_iou_whole_image == pytest.approx((0.36 + 0.04) / 2)
    assert q.box_iou_centred == pytest.approx((0.04 / 0.36 + 1.0) / 2)  # image 0: centred, inside the large one
    assert q.small_objects == 1 and q.box_iou_small == 1.0  # image 1's largest object is not small
    assert (q.gt_centre_x, q.gt_centre_y) == pytest.approx((0.6, 0.6))


def test_localization_picture_marks_the_mean_box_centre(tmp_path):
    from hub_ccrop.viz import _centre_legend, draw_localization_grid

    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.0, 0.6, 0.6]])
    path = draw_localization_grid(images, torch.rand(2, 4, 4), boxes, tmp_path / "pic.png", alpha=0.6,
                                  centre=[0.35, 0.3])
    assert path.stat().st_size > 1000
    assert _centre_legend([0.35, 0.3]) == "; mean box centre x (0.35, 0.30) vs image centre +"
    assert _centre_legend(None) == ""


@pytest.mark.parametrize(("metrics", "starts"), [
    ({"box_iou": 0.55, "box_iou_centred": 0.50, "box_follow": 0.1}, "the boxes know where the objects are: +0.050"),
    ({"box_iou": 0.51, "box_iou_centred": 0.50, "box_follow": 0.9}, "the boxes know no more than a centred box"),
    ({"box_follow": 0.66}, "the boxes follow the image content (box_follow 0.66 >= 0.5)"),
    ({"box_follow": 0.35}, "the boxes follow the image content only in part (box_follow 0.35)"),
    ({"box_follow": 0.04}, "the boxes hardly follow the image content (box_follow 0.04 < 0.2)"),
])
def test_verdict_says_what_the_numbers_mean(metrics, starts):
    """Ground truth decides when there is some (the IoU gain over the centred box, not the follow score);
    without it, the follow score at the bounds its measurements suggest (benchmarks/README.md)."""
    verdict = box_verdict({"box_area": 0.5, "box_centre_x": 0.5, "box_centre_y": 0.5, **metrics})
    assert verdict.startswith(starts)
    assert ("crop.localizer" in verdict) == ("no more" in starts or "hardly" in starts)


def test_no_verdict_without_ground_truth_or_follow_score():
    assert box_verdict(box_quality(torch.tensor([[0.0, 0.2, 0.5, 0.6]])).metrics()) is None

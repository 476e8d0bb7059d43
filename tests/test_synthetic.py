"""The built-in small-objects dataset: statistics, determinism, loading through the spec."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from hub_ccrop.crop import object_miss_rate
from hub_ccrop.data import dataset_fingerprint, get_spec, load_images, num_ids
from hub_ccrop.synthetic import (
    SHAPES,
    STYLES,
    make_small_objects,
    render_small_object,
    small_objects_dir,
    small_objects_hard_dir,
)


@pytest.fixture(scope="module")
def sample():
    return make_small_objects(400, seed=0)


def test_statistics(sample):
    boxes = np.asarray(sample["gt_box"], dtype=np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    low, high = STYLES["quickstart"].area_range
    assert low <= area.min() and area.max() <= high
    assert area.max() - area.min() > 0.2  # spread over the whole range
    assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    counts = np.bincount(sample["label"], minlength=len(SHAPES))
    assert len(counts) == 10 and counts.min() > 20  # all 10 classes, roughly balanced
    assert sample["id"] == list(range(400)) and sample.features["label"].names == list(SHAPES)


def saturation(arr: np.ndarray) -> np.ndarray:
    mx, mn = arr.max(-1).astype(float), arr.min(-1).astype(float)
    return (mx - mn) / np.maximum(mx, 1)


def test_salient_object_on_a_quiet_background(sample):
    for k in range(0, 400, 37):
        row = sample[k]
        arr = np.asarray(row["image"])
        h, w = arr.shape[:2]
        x0, y0, x1, y1 = row["gt_box"]
        inside = np.zeros((h, w), bool)
        inside[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = True
        sat = saturation(arr)
        obj = sat > 0.45
        assert obj[~inside].mean() < 0.02  # the salient pixels are the object's
        rows, cols = np.flatnonzero(obj.any(1)), np.flatnonzero(obj.any(0))
        assert abs(cols[0] / w - x0) <= 1 / w and abs((rows[-1] + 1) / h - y1) <= 1 / h  # gt_box is tight
        assert np.median(sat[~inside]) < 0.25  # low-saturation background
        value = arr.max(-1)[~inside].astype(float) / 255
        assert value.std() < 0.12  # low contrast
        assert sat[obj].mean() > 0.55


def object_hues(data) -> np.ndarray:
    """Mean hue of each image's salient (object) pixels."""
    hues = []
    for row in data:
        arr = np.asarray(row["image"]).astype(float) / 255
        obj = saturation(np.asarray(row["image"])) > 0.45
        rgb = arr[obj].mean(0)
        hues.append(colorsys.rgb_to_hsv(*rgb)[0])
    return np.asarray(hues)


def test_object_color_carries_no_class_information(sample):
    """Every class is drawn in the same color band: only the shape tells the classes apart."""
    hues, labels = object_hues(sample), np.asarray(sample["label"])
    band = STYLES["quickstart"].object_hue
    assert band[0] - 0.02 <= hues.min() and hues.max() <= band[1] + 0.02
    class_means = np.array([hues[labels == c].mean() for c in range(len(SHAPES))])
    # Class means agree within a few standard errors of a uniform band (std (b - a) / sqrt(12), ~40 per class).
    stderr = (band[1] - band[0]) / np.sqrt(12) / np.sqrt(np.bincount(labels).min())
    assert np.abs(class_means - hues.mean()).max() < 4 * stderr


def test_random_crops_miss_objects_more_often_in_the_hard_style(sample):
    """Both styles keep the paper's problem (random crops miss the object); 'hard' has smaller objects."""
    hard = make_small_objects(400, seed=0, style="hard")
    rates, areas = {}, {}
    for name, data in (("quickstart", sample), ("hard", hard)):
        boxes = torch.tensor(data["gt_box"])
        areas[name] = float(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean())
        sizes = torch.full((len(boxes), 2), 64)
        rates[name] = object_miss_rate(boxes, boxes, sizes, alpha=0.6)["rcrop"]
    low, high = STYLES["hard"].area_range
    assert areas["hard"] < areas["quickstart"] and low <= areas["hard"] <= high
    assert 0.03 < rates["quickstart"] < rates["hard"]


def test_deterministic_and_seeded():
    a, la, ba = render_small_object(0, 5)
    b, lb, bb = render_small_object(0, 5)
    c, _, _ = render_small_object(1, 5)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and (la, ba) == (lb, bb)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    small, big = make_small_objects(5, seed=3), make_small_objects(8, seed=3)  # prefixes agree
    assert all(np.array_equal(np.asarray(small[k]["image"]), np.asarray(big[k]["image"])) for k in range(5))
    assert render_small_object(0, 0, size=128)[0].size == (128, 128)
    assert not np.array_equal(np.asarray(a), np.asarray(render_small_object(0, 5, style="hard")[0]))


def test_colors_are_what_the_design_asks():
    hue, sat, val = colorsys.rgb_to_hsv(*(np.asarray(render_small_object(0, 1)[0])[0, 0] / 255))
    assert sat < 0.35 and 0.15 < val < 0.8  # a background pixel


def test_spec_loads_a_generated_folder(tmp_path):
    folder = small_objects_dir(tmp_path, train=40, test=10)
    again = small_objects_dir(tmp_path, train=40, test=10)
    assert folder == again and sorted(p.name for p in folder.iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]  # fmt: skip
    spec = get_spec("small_objects", data_dir=str(folder))
    train, test = load_images(spec, "train"), load_images(spec, "test")
    assert train.column_names == ["id", "image", "label", "gt_box"]
    assert train["id"] == list(range(40)) and len(test) == 10
    assert train["gt_box"][3] == pytest.approx(render_small_object(0, 3)[2])
    stream = load_images(spec, streaming=True)
    assert [r["id"] for r in stream] == list(range(40)) and num_ids(spec) == 40
    assert dataset_fingerprint(spec) == dataset_fingerprint(spec.replace(data_dir=str(folder)))
    hard = small_objects_hard_dir(tmp_path, train=40, test=10)
    assert hard != folder and load_images(get_spec("small_objects", data_dir=str(hard)))["gt_box"][3] == pytest.approx(
        render_small_object(0, 3, style="hard")[2])
    with pytest.raises(ValueError, match="unknown small-objects style 'easy'"):
        small_objects_dir(tmp_path, style="easy")


@pytest.mark.slow
def test_default_spec_generates_offline(tmp_path, monkeypatch):
    """The quickstart's dataset from an empty cache, with the Hub offline (conftest); its time is part of
    the quickstart's in benchmarks/README.md."""
    monkeypatch.setenv("HUB_CCROP_CACHE", str(tmp_path))
    spec = get_spec("small_objects")
    train = load_images(spec, "train")
    test = load_images(spec, spec.test_split)
    assert (len(train), len(test)) == (4000, 1000)
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == ["test-00000-of-00001.parquet",
                                                                  "train-00000-of-00001.parquet"]


@pytest.mark.parametrize(("spec_name", "style"), [("small_objects", "quickstart"), ("small_objects_hard", "hard")])
def test_spec_normalization_matches_the_style(spec_name, style):
    """Each registered spec's mean/std are those of its style's pixels (200 images, within 0.01)."""
    pixels = np.stack([np.asarray(render_small_object(0, i, style=style)[0]) for i in range(200)]) / 255
    spec = get_spec(spec_name)
    assert np.abs(pixels.mean(axis=(0, 1, 2)) - spec.mean).max() < 0.01
    assert np.abs(pixels.std(axis=(0, 1, 2)) - spec.std).max() < 0.01

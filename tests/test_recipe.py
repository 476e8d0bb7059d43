"""Recipes: validation errors name the key; every shipped recipe parses and builds its pieces offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub_ccrop.recipe import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_defaults_and_overrides():
    recipe = load_recipe({"train": {"epochs": 10}, "crop": {"warmup_epochs": 4, "loc_interval": 3}},
                         ["optim.lr=0.1", "crop.scale=[0.3, 1]", "method.options.temperature=0.2"])
    assert recipe.optim.lr == 0.1 and recipe.crop.scale == [0.3, 1.0]
    assert recipe.method.options == {"temperature": 0.2}
    assert recipe.localization_epochs() == [4, 7]
    assert [recipe.crop_mode(e) for e in (0, 3, 4, 9)] == ["rcrop", "rcrop", "ccrop", "ccrop"]


def test_yaml_no_for_mixed_precision_and_split_keys():
    assert load_recipe({}, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe({}, ["data.splits=[train[:1000]]"])
    recipe = load_recipe({}, ['data.splits=["train[:1000]"]', "data.train_split=train[:45000]",
                              "data.test_split=train[-5000:]"])
    assert recipe.data.train_split == "train[:45000]" and recipe.data.splits == ["train[:1000]"]
    with pytest.raises(RecipeError, match="exclude each other"):
        load_recipe({"data": {"holdout": 5000, "train_split": "train"}})


def test_rcrop_never_localizes_and_init_boxes_skip_warmup():
    assert load_recipe({"crop": {"mode": "rcrop"}, "train": {"epochs": 5}}).localization_epochs() == []
    warm = load_recipe({"crop": {"init_boxes": "org/boxes", "warmup_epochs": 100, "loc_interval": 2},
                        "train": {"epochs": 6}})
    assert warm.crop_mode(0) == "ccrop" and warm.localization_epochs() == [2, 4]


@pytest.mark.parametrize(("raw", "overrides", "message"), [
    ({"trian": {}}, [], "unknown recipe key 'trian' \\(did you mean train\\?\\)"),
    ({"optim": {"learning_rate": 0.1}}, [], "unknown recipe key 'optim.learning_rate'"),
    ({"optim": {"lr": "fast"}}, [], "optim.lr: expected float"),
    ({"optim": {"lr": -1}}, [], "optim.lr: must be > 0"),
    ({"data": {"batch_size": True}}, [], "data.batch_size: expected int"),
    ({"crop": {"mode": "random"}}, [], "crop.mode: 'random' is not one of ccrop, rcrop"),
    ({"crop": {"scale": [0.5, 0.1]}}, [], "crop.scale"),
    ({"crop": {"k": 1.5}}, [], "crop.k"),
    ({"train": {"epochs": 50}, "crop": {"warmup_epochs": 100}}, [], "warmup_epochs \\(100\\) must be below"),
    ({"crop": {"loc_epochs": [0, 10]}}, [], "1-based"),
    ({"data": {"device_resident": True, "streaming": True}}, [], "device_resident"),
    ({}, ["train.epochs"], "key=value"),
    ({"model": "resnet18"}, [], "model: expected a mapping"),
])
def test_validation_errors(raw, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(raw, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_round_trip_through_yaml(tmp_path):
    recipe = load_recipe(RECIPES[0])
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_every_paper_setting_has_a_recipe():
    names = {p.stem for p in RECIPES}
    for crop in ("rcrop", "ccrop"):
        for method in ("simclr", "moco_v2", "byol", "simsiam"):
            for dataset in ("cifar10", "cifar100", "stl10", "tiny_imagenet"):
                assert f"{method}_{dataset}_{crop}" in names
        for method in ("moco_v1", "moco_v2", "simclr", "simsiam"):
            for dataset in ("imagenet200", "imagenet1k"):
                assert f"{method}_{dataset}_{crop}" in names
    assert "quickstart" in names

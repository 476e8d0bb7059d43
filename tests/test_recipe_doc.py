"""docs/RECIPES.md (generated from the recipe dataclasses) and `hub-ccrop recipe show`."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from hub_ccrop.commands import main
from hub_ccrop.methods import method_config
from hub_ccrop.recipe import Recipe, load_recipe
from hub_ccrop.recipe_doc import field_comments, recipe_keys, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
RECIPES_MD = ROOT / "docs" / "RECIPES.md"
REGENERATE = "hub-ccrop recipe reference --out docs/RECIPES.md"


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a recipe dataclass, walked here independently of recipe_doc."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += dotted_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
            inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]  # list[X] | None
            item = typing.get_args(inner[0])[0] if typing.get_origin(inner[0]) is list else None
            if dataclasses.is_dataclass(item):
                keys += dotted_keys(item, f"{prefix}{f.name}[].")
    return keys


def documented(text: str) -> dict[str, list[str]]:
    """Key -> [type, default, meaning] of each table row of RECIPES.md."""
    rows = re.findall(r"^\| `([^`]+)` \| `(.*?)` \| `(.*?)` \| (.*?) \|$", text, re.MULTILINE)
    return {key: [t, d, m.strip()] for key, t, d, m in rows}


def test_every_recipe_key_is_documented_with_type_default_and_meaning():
    text = RECIPES_MD.read_text()
    rows = documented(text)
    missing = [k for k in dotted_keys(Recipe) if k not in rows]
    assert not missing, f"docs/RECIPES.md lacks {missing}: run `{REGENERATE}`"
    no_meaning = [k for k in dotted_keys(Recipe) if not rows[k][2]]
    assert not no_meaning, f"add a comment to these fields in hub_ccrop/recipe.py, then `{REGENERATE}`: {no_meaning}"
    assert rows["crop.alpha"][:2] == ["float", "0.1"] and rows["train.log_with"][1] == '"tensorboard"'
    assert "one of: no, bf16, fp16" in rows["train.mixed_precision"][2] or "bf16" in rows["train.mixed_precision"][2]
    assert "### `moco_v2`" in text and "`method.options.queue_size`" in text  # method options too
    assert text == reference_markdown(), f"docs/RECIPES.md is stale: run `{REGENERATE}`"


def test_the_check_catches_a_missing_key():
    text = reference_markdown()
    without = "\n".join(line for line in text.splitlines() if "`crop.alpha`" not in line)
    assert "crop.alpha" in documented(text) and "crop.alpha" not in documented(without)
    assert [k.key for k in recipe_keys() if "[]" not in k.key] == [k for k in dotted_keys(Recipe) if "[]" not in k]


def test_field_comments_take_the_block_above_and_the_trailing_comment():
    @dataclasses.dataclass
    class Example:
        # the first line
        # and the second
        a: int = 1  # trailing
        b: list[int] = dataclasses.field(default_factory=list)
        c: str = "x#y"  # only this

    assert field_comments(Example) == {"a": "the first line and the second trailing", "b": "", "c": "only this"}


def test_recipe_show_prints_every_default_and_reads_back_the_same(capsys):
    recipe_file = ROOT / "recipes" / "quickstart.yaml"
    assert main(["recipe", "show", str(recipe_file), "--set", "train.epochs=6"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    for key in dotted_keys(Recipe):
        if "[]" in key:  # keys of list entries: checked on the view groups below
            continue
        node = shown
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    assert shown["train"]["epochs"] == 6 and shown["crop"]["scale"] == [0.2, 1.0]
    assert shown["method"]["options"] == {"temperature": 0.2, "base_temperature": None, "hidden_dim": None,
                                          "out_dim": 128}  # the method's defaults filled in too
    assert [(g["count"], g["size"], g["blur_p"]) for g in shown["views"]] == [(2, 32, 0.0)]  # the resolved default
    again, original = load_recipe(shown), load_recipe(recipe_file, ["train.epochs=6"])
    assert again.view_groups(32) == original.view_groups(32)  # the same views ...
    assert dataclasses.replace(again, method=original.method, views=None) == original  # ... and the same recipe
    assert method_config("simclr", **again.method.options) == method_config("simclr", **original.method.options)
    assert main(["recipe", "show", str(recipe_file), "--set", "crop.alfa=1"]) == 2  # one line, as train says it
    assert "did you mean crop.alpha" in capsys.readouterr().err

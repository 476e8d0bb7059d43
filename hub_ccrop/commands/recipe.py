"""``hub-ccrop recipe show`` (a recipe with every default filled in) and ``hub-ccrop recipe reference``.

    hub-ccrop recipe show recipes/quickstart.yaml --set train.epochs=2   # the recipe a run would train
    hub-ccrop recipe reference --out docs/RECIPES.md                     # regenerate the key reference
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from hub_ccrop.commands.common import add_command


def add_cli(subparsers: Any) -> None:
    group = subparsers.add_parser("recipe", help="print a recipe with its defaults, or the reference of every key",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = group.add_subparsers(dest="recipe_command", metavar="COMMAND")
    show = add_command(commands, "show", run_show, help="print a recipe with every default filled in (validated)")
    show.add_argument("recipe", help="a recipe YAML file")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe key, as `hub-ccrop train` does (repeatable)")
    reference = add_command(commands, "reference", run_reference,
                            help="print the reference of every recipe key (docs/RECIPES.md)")
    reference.add_argument("--out", type=Path, default=None, help="write it to this file instead of printing it")


def run_show(args: argparse.Namespace) -> int:
    import dataclasses

    from hub_ccrop.data import get_spec, list_specs
    from hub_ccrop.methods import method_config
    from hub_ccrop.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    raw = recipe.to_dict()  # the method's options with their defaults too (load_recipe checked them)
    raw["method"]["options"] = dataclasses.asdict(method_config(recipe.method.name, **recipe.method.options))
    # the view groups as the run resolves them (size: a registered dataset's; else null = the data's own size)
    spec = get_spec(recipe.data.dataset) if recipe.data.dataset in list_specs() else None
    size = recipe.data.image_size or (spec.image_size if spec else None)
    raw["views"] = [dataclasses.asdict(g) for g in recipe.view_groups(size, spec.blur if spec else False)]
    print(yaml.dump(raw, Dumper=_FlatListDumper, sort_keys=False), end="")
    return 0


class _FlatListDumper(yaml.SafeDumper):
    """Lists of plain values on one line (``scale: [0.2, 1.0]``), as recipes write them."""


_FlatListDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=not any(isinstance(v, dict | list) for v in data)))


def run_reference(args: argparse.Namespace) -> int:
    from hub_ccrop.recipe_doc import reference_markdown

    text = reference_markdown()
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0

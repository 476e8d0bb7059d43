"""The Python API: train a recipe and get its run folder (``hub_ccrop.train(...)``).

``hub_ccrop`` exports :func:`train` (the loop is :func:`hub_ccrop.training.train`) with :func:`~hub_ccrop.recipe.load_recipe`,
:func:`~hub_ccrop.evaluate.load_backbone` and :func:`~hub_ccrop.hub.load_boxes`, each loaded on first use,
so ``import hub_ccrop`` does not import the training loop, the evaluation code or the Hub client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub_ccrop.recipe import Recipe

__all__ = ["override_strings", "train"]


def override_strings(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"train.epochs": 2}`` or ``["train.epochs=2"]`` -> ``--set``-style ``key=value`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):  # JSON is YAML: the values parse back as they were given
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def train(
    recipe_or_path: Recipe | str | os.PathLike | Mapping[str, Any],
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
) -> Path:
    """Train a recipe (a :class:`~hub_ccrop.recipe.Recipe`, a YAML path or a dict) and return its run folder.

    ``overrides`` are ``--set`` values, as ``{"train.epochs": 2}`` or ``["train.epochs=2"]``; ``output_dir``
    defaults to the recipe's ``train.output_dir``, else ``runs/<recipe name>``. The folder holds the backbone,
    box table, ``metrics.json`` and ``run.json``: ``hub_ccrop.load_backbone(folder)``,
    ``hub_ccrop.load_boxes(folder)`` and ``hub-ccrop export`` read it. Launch it under ``accelerate launch``
    for several processes, as the CLI.
    """
    from hub_ccrop.recipe import Recipe, load_recipe
    from hub_ccrop.training import train as train_loop

    if isinstance(recipe_or_path, Recipe):
        recipe = recipe_or_path
        if overrides:
            recipe = load_recipe(recipe.to_dict(), override_strings(overrides))
    else:
        source = dict(recipe_or_path) if isinstance(recipe_or_path, Mapping) else recipe_or_path
        recipe = load_recipe(source, override_strings(overrides))
    out = recipe.run_dir(output_dir)
    train_loop(recipe, out, resume=resume)
    return out

"""The recipe reference, ``docs/RECIPES.md``, generated from the recipe dataclasses (:mod:`hub_ccrop.recipe`).

Every key with its type, default and meaning: the meaning is the comment on (or just above) the field in
``recipe.py`` and the method option classes, the allowed values come from the recipe checker's own lists.
Regenerate after changing a key: ``hub-ccrop recipe reference --out docs/RECIPES.md`` (a test fails while
the file is stale).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["KeyDoc", "field_comments", "method_option_keys", "recipe_keys", "reference_markdown"]


@dataclass(frozen=True)
class KeyDoc:
    """One recipe key: dotted name, type (as written in the dataclass), default (as YAML) and meaning."""

    key: str
    type: str
    default: str
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the comment lines just above the field and the comment on its own lines."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line (1-based) -> comment text
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    (node,) = ast.parse(source).body
    out: dict[str, str] = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above, line = [], item.lineno - 1
        while line in comments and line not in code_lines:  # a block of comment-only lines above the field
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(item.lineno, (item.end_lineno or item.lineno) + 1) if n in comments]
        text = " ".join(part for part in (*above, *trailing) if part)
        out[item.target.id] = text.replace("noqa", "").strip()
    return out


def _yaml(value: Any) -> str:
    """A default as a reader writes it in YAML (JSON is YAML; None is null)."""
    return json.dumps(value)


def _fields(cls: type, prefix: str) -> list[KeyDoc]:
    """The keys of one dataclass (nested dataclasses and lists of them followed), in declaration order."""
    from hub_ccrop.recipe import _CHOICES

    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    instance = cls()
    keys: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        item = _list_item(hint)
        if dataclasses.is_dataclass(hint):
            keys += _fields(hint, f"{key}.")
            continue
        meaning = comments.get(f.name, "")
        if key in _CHOICES and not all(c in meaning for c in _CHOICES[key]):
            meaning = f"{meaning} (one of: {', '.join(_CHOICES[key])})".strip()
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [dataclasses.asdict(v) for v in value]
        keys.append(KeyDoc(key, str(f.type), _yaml(value), meaning))
        if item is not None and dataclasses.is_dataclass(item):  # e.g. a list of groups: document their keys
            keys += _fields(item, f"{key}[].")
    return keys


def _list_item(hint: Any) -> Any:
    """The item type of ``list[X]`` or ``list[X] | None``; None for other types."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    if len(options) == 1 and typing.get_origin(options[0]) is list and typing.get_args(options[0]):
        return typing.get_args(options[0])[0]
    return None


def recipe_keys() -> list[KeyDoc]:
    """Every key of a recipe, in the order of the dataclasses."""
    from hub_ccrop.recipe import Recipe

    return _fields(Recipe, "")


def method_option_keys() -> dict[str, list[KeyDoc]]:
    """Method name -> its ``method.options`` keys (the options dataclass of each registered method)."""
    from hub_ccrop.methods import METHODS

    options: dict[str, list[KeyDoc]] = {}
    for name, (_, config) in METHODS.items():
        comments: dict[str, str] = {}
        for base in reversed(config.__mro__):  # inherited fields keep the comment of the class that declares them
            if dataclasses.is_dataclass(base) and base is not object and "__dataclass_fields__" in vars(base):
                comments |= field_comments(base)
        instance, hints = config(), typing.get_type_hints(config)
        options[name] = [KeyDoc(f"method.options.{f.name}", _type_name(hints[f.name], f.type),
                                _yaml(getattr(instance, f.name)), comments.get(f.name, ""))
                         for f in dataclasses.fields(config)]
    return options


def _type_name(hint: Any, written: Any) -> str:
    return written if isinstance(written, str) else getattr(hint, "__name__", str(hint))


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or " "


def _table(keys: list[KeyDoc]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k.key}` | `{_cell(k.type)}` | `{_cell(k.default)}` | {_cell(k.meaning)} |" for k in keys]
    return rows


def reference_markdown() -> str:
    """The text of ``docs/RECIPES.md``."""
    keys = recipe_keys()
    sections: dict[str, list[KeyDoc]] = {}
    for k in keys:
        sections.setdefault(k.key.split(".")[0] if "." in k.key else "", []).append(k)
    lines = [
        "# Recipe reference",
        "",
        "<!-- generated from the recipe dataclasses (hub_ccrop/recipe.py) by `hub-ccrop recipe reference --out "
        "docs/RECIPES.md`; edit the field comments there, not this file -->",
        "",
        "A recipe is a YAML file with the sections below; a key left out takes its default. Unknown keys, wrong "
        "types and values out of range are refused before anything runs, naming the key. "
        "`--set section.key=value` overrides any key (the value parses as YAML), and "
        "`hub-ccrop recipe show RECIPE.yaml` prints a recipe with every default filled in. "
        "Defaults are written as YAML (`null`: unset).",
        "",
    ]
    for section in sorted(sections, key=bool):  # the top-level keys first, then the sections in order
        title = {"": "Top level", "views[]": "`views[]`: each view group"}.get(section, f"`{section}`")
        lines += [f"## {title}", "", *_table(sections[section]), ""]
    lines += ["## `method.options`, per method", "",
              "Each method's options (`method.options:` in a recipe) with their defaults, the paper's "
              "small-dataset settings; head widths `null` follow the backbone's feature width.", ""]
    for name, rows in method_option_keys().items():
        lines += [f"### `{name}`", "", *_table(rows), ""]
    return "\n".join(lines).rstrip() + "\n"

"""The project's one type check: recipe keys and the methods' options (``methods.MethodOptions``) are
converted and checked by :func:`check_type`; a value that cannot run raises :class:`RecipeError`."""

from __future__ import annotations

import types
import typing
from typing import Any

__all__ = ["RecipeError", "check_type"]


class RecipeError(ValueError):
    """A recipe that cannot run: unknown keys, wrong types or values out of range."""



def check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` (ints widen to floats) or raise RecipeError naming ``key``.

    The one type check of the project: recipe keys and the methods' options (``methods.MethodOptions``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, typing.get_args(annotation)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        for option in inner[1:]:
            try:
                return check_type(value, option, key)
            except RecipeError:
                pass
        return check_type(value, inner[0], key)  # the main type's error message
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is Any or (isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))):
        return value
    raise RecipeError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")

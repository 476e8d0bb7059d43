"""Optional dependencies (pyproject's extras), checked when a command starts rather than when first used.

A run that needs an extra it lacks fails before its first step with one line naming the extra and the
install command, not after hours of training when evaluation imports it.
"""

from __future__ import annotations

import importlib.util

from hub_ccrop.errors import UserError

__all__ = ["EXTRAS", "missing_modules", "require_detection_extras", "require_extra"]

# extra name (pyproject's [project.optional-dependencies]) -> the modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {"detection": ("torchmetrics", "pycocotools")}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, needed_by: str) -> None:
    """Raise :class:`~hub_ccrop.errors.UserError` (one line) when a module of ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        raise UserError(f"{needed_by} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                        f"pip install -e '.[{extra}]' from the repository (or pip install {' '.join(missing)})")


def require_detection_extras() -> None:
    """torchmetrics and pycocotools, for ``hub-ccrop finetune-detection``'s COCO mAP."""
    require_extra("detection", "hub-ccrop finetune-detection (COCO mAP)")

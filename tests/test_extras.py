"""hub_ccrop.extras: a missing optional dependency fails in one line before a command does any work."""

from __future__ import annotations

import importlib.util

import pytest

from hub_ccrop.commands import main
from hub_ccrop.errors import UserError
from hub_ccrop.extras import missing_modules, require_detection_extras


def without(monkeypatch, *names: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else find_spec(name, *a))


def test_missing_detection_extra_is_one_line_naming_the_install(monkeypatch):
    without(monkeypatch, "pycocotools")
    assert "pycocotools" in missing_modules("detection")
    with pytest.raises(UserError, match=r"needs the 'detection' extra \(.*pycocotools not installed\): "
                                        r"pip install -e '\.\[detection\]'"):
        require_detection_extras()


def test_finetune_detection_checks_before_reading_any_data(monkeypatch, tmp_path, capsys):
    without(monkeypatch, "torchmetrics", "pycocotools")
    # the dataset does not exist: had the command started work, the error would name it instead
    code = main(["finetune-detection", str(tmp_path / "run"), "--dataset", str(tmp_path / "no-such-data")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "torchmetrics, pycocotools not installed" in err and "no-such-data" not in err

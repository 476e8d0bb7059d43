"""Pictures are drawn without pyplot: importing or using ``hub_ccrop.viz`` leaves a notebook's backend alone."""

from __future__ import annotations

import importlib
import sys

import matplotlib
import torch
from PIL import Image

from hub_ccrop import viz


def _refuse_use(*args, **kwargs) -> None:
    raise AssertionError("matplotlib.use was called: it switches the backend a notebook or GUI session chose")


def test_drawing_keeps_the_callers_matplotlib_backend(tmp_path, monkeypatch):
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # raw: reading it must not resolve it
    monkeypatch.setattr(matplotlib, "use", _refuse_use)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any `import matplotlib.pyplot` now fails
    importlib.reload(viz)  # importing hub_ccrop.viz ...
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]])
    path = viz.draw_localization_grid(images, torch.rand(2, 4, 4), boxes, tmp_path / "grid.png", alpha=0.6)  # ... and drawing
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    # a PNG of figsize x dpi (6 columns x 1.6 in, 2 rows x 1.6 + 0.4 in)
    assert Image.open(path).size == (1056, 396)

"""Pictures are drawn without pyplot: importing or using ``hub_ccrop.viz`` leaves a notebook's backend alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_drawing_keeps_the_callers_matplotlib_backend(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # what a notebook or a GUI session has chosen
        import torch
        from PIL import Image
        from hub_ccrop.viz import draw_localization_grid

        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        boxes = torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]])
        path = draw_localization_grid(images, torch.rand(2, 4, 4), boxes, {str(tmp_path / "grid.png")!r}, alpha=0.6)
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, Image.open(path).size)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # backend untouched, pyplot never imported, a PNG of figsize x dpi (6 columns x 1.6 in, 2 rows x 1.6 + 0.4 in)
    assert proc.stdout.split() == ["svg", "False", "(1056,", "396)"]

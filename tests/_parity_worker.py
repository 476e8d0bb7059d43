"""Run ``hub_ccrop.training`` with each image's views seeded by its own id (not by its batch).

The training loop seeds a batch's augmentation from the ids of that batch, so a global batch split over two
processes gets other views than the same batch in one process. Seeding per image makes the views independent
of the split, so a 2-process run and a 1-process run train on the very same tensors (tests/test_parity.py).
Usage: python _parity_worker.py RECIPE [train CLI args...] (also under ``accelerate launch``); with
``PARITY_INIT=FILE`` the backbone's initial weights are saved there (safetensors).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from safetensors.torch import save_file

from hub_ccrop.cli import main
from hub_ccrop.training import SeededCollate, loop
from hub_ccrop.views import Views


def per_image_views(self: SeededCollate, rows: list[dict[str, Any]]) -> Any:
    parts = []
    for row in rows:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.batch_seed([row["id"]]))
            parts.append(self.collate([row]))
    groups = [torch.cat(group, dim=1) for group in zip(*(part.groups for part in parts), strict=True)]
    return Views(groups, torch.cat([part.ids for part in parts]), torch.cat([part.labels for part in parts]))


def build_and_save_init(*args: Any, **kwargs: Any) -> Any:
    method = build_method(*args, **kwargs)
    state = method.localization_encoder.state_dict()
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, os.environ["PARITY_INIT"])
    return method


SeededCollate.__call__ = per_image_views
build_method = loop.build_method
if os.environ.get("PARITY_INIT"):
    loop.build_method = build_and_save_init

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(["train", *sys.argv[1:]]))

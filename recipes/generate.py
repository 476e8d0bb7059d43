"""Write the paper-setting recipes (DESIGN.md section 3) into this folder.

    python recipes/generate.py

Small datasets: {SimCLR, MoCo v2, BYOL, SimSiam} x {CIFAR-10, CIFAR-100, STL-10, Tiny ImageNet} x
{rcrop, ccrop}. ImageNet: {MoCo v1, MoCo v2, SimCLR, SimSiam} x {IN-200, IN-1K} x {rcrop, ccrop}.
Each file carries the paper's linear top-1 for its setting as ``target``. Edit this script, not the
generated files, when a shared setting changes; quickstart.yaml is written by hand.

Where the paper text and the official code (xyupeng/ContrastiveCrop) disagree, the recipes follow the
official code and say so in their header, with the ``--set`` that gives the other value; every setting
and its source is listed in docs/PARITY.md. ``data.batch_size`` is the GLOBAL batch (all processes).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hub_ccrop.hub import paper_reference  # the paper's Tables 1 and 2: one copy, shared with the model cards

HERE = Path(__file__).resolve().parent

SMALL_METHODS = {  # official configs/small/*/{simclr,moco,byol,simsiam}_*.py
    "simclr": {"temperature": 0.5, "base_temperature": 0.07},  # losses/NT_Xent_dist.py: loss x 0.5 / 0.07
    # official queue (warns on small sets); split-BN in one process (no-op with several: shuffle-BN)
    "moco_v2": {"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "split_bn": 8},
    "byol": {"momentum": 0.996},
    "simsiam": {"fix_pred_lr": True},
}
# The official DDP_{simclr,byol,simsiam}_ccrop.py convert the model to SyncBatchNorm; DDP_moco_ccrop.py uses
# shuffle-BN. Only SimSiam's ResNet zero-inits the last BN of each block (zero_init_residual=True in
# configs/small/*/simsiam_*.py; models/resnet.py defaults to False); timm's default is True.
SYNC_BN = {"simclr": True, "moco_v1": False, "moco_v2": False, "byol": True, "simsiam": True}
ZERO_INIT_LAST = {"simclr": False, "moco_v1": False, "moco_v2": False, "byol": False, "simsiam": True}
IMAGENET_METHODS = {  # the methods' own papers' ImageNet settings
    "moco_v1": ({"temperature": 0.07, "queue_size": 65536, "momentum": 0.999, "split_bn": 8}, 256, 0.03, 1e-4, False),
    "moco_v2": ({"temperature": 0.2, "queue_size": 65536, "momentum": 0.999, "split_bn": 8}, 256, 0.03, 1e-4, False),
    "simclr": ({"temperature": 0.1}, 512, 0.05, 1e-4, False),
    "simsiam": ({"fix_pred_lr": True}, 512, 0.05, 1e-4, True),
}


OFFICIAL_BOX_RULE = {"box_rule": "threshold", "heatmap_flip": False}  # the paper's boxes (no flip averaging)
ALIGNMENT_NOTE = ("heatmaps placed as the official update_box (cells shifted (S-1)/2 px right/down) to reproduce "
                  "its boxes; receptive-field-centred boxes: --set crop.heatmap_alignment=receptive_field.")
SMALL_NOTES = [
    "data.batch_size is the global batch (official configs: batch_size = 512 over all GPUs).",
    "alpha 0.1 as the official small configs (the paper text gives 0.6: --set crop.alpha=0.6).",
    ALIGNMENT_NOTE,
]
SMALL_METHOD_NOTES = {
    "simclr": ["loss x temperature / base_temperature = 0.5 / 0.07 as the official NT_Xent_dist "
               "(plain NT-Xent: --set method.options.base_temperature=null)."],
    "moco_v2": ["split-BN (8 groups) in a single process, as MoCo's CIFAR demo; several processes use shuffle-BN."],
}
IMAGENET_NOTES = {
    "loc": "boxes every 20 epochs from epoch 20 as the official configs/IN1K|IN200/*.py (the paper text says "
           "every 10: --set crop.loc_interval=10).",
    "moco_v1": "lr schedule of the official configs/IN1K/mocov1_*.py: MultiStep at epochs 60, 80 with "
               "decay_rate 0., i.e. lr 0 after epoch 60 (MoCo v1's x0.1 steps: --set optim.step_factor=0.1).",
    "no_official": "no official ImageNet config for this method: settings from its own paper.",
}


def small_recipe(method: str, dataset: str, crop: str) -> dict:
    rcrop, ccrop = paper_reference(method, dataset)
    notes = SMALL_NOTES + SMALL_METHOD_NOTES.get(method, [])
    if dataset == "tiny_imagenet":
        notes = notes + ["the official configs/small/tiny200/simclr_ccrop.py sets warmup_epochs = 500 (= epochs, so "
                         "it never uses ContrastiveCrop); we use 100 as every other small config."]
    return {
        "notes": notes,
        "name": f"{method}_{dataset}_{crop}",
        "target": f"paper Table 1 linear top-1: {rcrop if crop == 'rcrop' else ccrop} "
                  f"(R-Crop {rcrop} -> C-Crop {ccrop})",
        "model": {"name": "resnet18_cifar", "args": {"zero_init_last": ZERO_INIT_LAST[method]},
                  "sync_bn": SYNC_BN[method]},
        "method": {"name": method, "options": SMALL_METHODS[method]},
        "data": {"dataset": dataset, "batch_size": 512, "num_workers": 8},
        "crop": {"mode": crop, "alpha": 0.1, "k": 0.1, "warmup_epochs": 100, "loc_interval": 100,
                 "heatmap_alignment": "official", **OFFICIAL_BOX_RULE},
        "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
                  "final_lr_ratio": 0.1},
        "train": {"epochs": 500, "mixed_precision": "bf16", "knn_every": 10, "checkpoint_every": 5},
    }


def imagenet_recipe(method: str, dataset: str, crop: str) -> dict:
    options, batch, lr, wd, linear_scaling = IMAGENET_METHODS[method]
    target = None
    if dataset == "imagenet1k":
        rcrop, ccrop = paper_reference(method, dataset)
        target = f"paper Table 2 linear top-1 (100 epochs): {rcrop if crop == 'rcrop' else ccrop} " \
                 f"(R-Crop {rcrop} -> C-Crop {ccrop})"
    notes = [IMAGENET_NOTES["loc"], ALIGNMENT_NOTE]
    if method.startswith("moco"):
        notes.insert(0, "data.batch_size is the global batch (official configs/IN1K/moco*.py: batch_size = 256 "
                        "over all GPUs); 8 processes train 8 x 32.")
    else:
        notes.insert(0, IMAGENET_NOTES["no_official"])
    schedule = {"schedule": "cosine", "final_lr_ratio": 0.0}
    if method == "moco_v1":
        notes.append(IMAGENET_NOTES["moco_v1"])
        schedule = {"schedule": "step", "milestones": [60, 80], "step_factor": 0.0}
    return {
        "notes": notes,
        "name": f"{method}_{dataset}_{crop}",
        "target": target,
        "model": {"name": "resnet50", "args": {"zero_init_last": ZERO_INIT_LAST[method]}, "channels_last": True,
                  "sync_bn": SYNC_BN[method]},
        "method": {"name": method, "options": options},
        "data": {"dataset": dataset, "batch_size": batch, "num_workers": 10},
        "crop": {"mode": crop, "alpha": 0.6, "k": 0.1, "warmup_epochs": 20, "loc_interval": 20, "blur": True,
                 "heatmap_alignment": "official", **OFFICIAL_BOX_RULE},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": wd, **schedule,
                  "lr_scaling": "linear" if linear_scaling else "none"},
        "train": {"epochs": 100, "mixed_precision": "bf16", "knn_every": 10 if dataset == "imagenet200" else 0,
                  "checkpoint_every": 1},
    }


def main() -> None:
    written = []
    for crop in ("rcrop", "ccrop"):
        for method in SMALL_METHODS:
            for dataset in ("cifar10", "cifar100", "stl10", "tiny_imagenet"):
                written.append(small_recipe(method, dataset, crop))
        for method in IMAGENET_METHODS:
            for dataset in ("imagenet200", "imagenet1k"):
                written.append(imagenet_recipe(method, dataset, crop))
    for recipe in written:
        header = f"# {recipe['name']}: generated by recipes/generate.py from docs/METHOD.md and the official code (docs/PARITY.md).\n"
        if recipe["target"]:
            header += f"# Target: {recipe['target']}\n"
        header += "".join(f"# - {note}\n" for note in recipe.pop("notes"))
        (HERE / f"{recipe['name']}.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    print(f"wrote {len(written)} recipes to {HERE}")


if __name__ == "__main__":
    main()

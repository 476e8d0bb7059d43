"""Write the paper-setting recipes (DESIGN.md section 3) into this folder.

    python recipes/generate.py

Small datasets: {SimCLR, MoCo v2, BYOL, SimSiam} x {CIFAR-10, CIFAR-100, STL-10, Tiny ImageNet} x
{rcrop, ccrop}. ImageNet: {MoCo v1, MoCo v2, SimCLR, SimSiam} x {IN-200, IN-1K} x {rcrop, ccrop}.
Redundancy reduction: {Barlow Twins, VICReg} x {CIFAR-10, CIFAR-100, IN-1K} x {rcrop, ccrop}.
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


# Barlow Twins and VICReg: method, optimizer and ImageNet augmentation values of the official code
# (facebookresearch/barlowtwins main.py, facebookresearch/vicreg main_vicreg.py + augmentations.py; neither
# has a CIFAR setting: CIFAR widths, batch and augmentations are solo-learn's scripts/pretrain/cifar/*.yaml,
# the setting of the CIFAR targets). docs/PARITY.md lists each value with its source.
REDUNDANCY_METHODS = {
    "barlow_twins": {"lambd": 0.0051, "bias_lr_scale": 0.024},  # --lambd; --learning-rate-biases 0.0048 / weights 0.2
    "vicreg": {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0},  # --sim-coeff, --std-coeff, --cov-coeff
}
REDUNDANCY_TARGETS = {  # linear top-1 of the R-Crop (RandomResizedCrop) setting; no published C-Crop number
    ("barlow_twins", "imagenet1k"): "73.5 (official README: ResNet-50, 1000 epochs, batch 2048; the paper's Table 1: 73.2)",
    ("vicreg", "imagenet1k"): "73.2 (official README: ResNet-50, 1000 epochs, batch 2048, base lr 0.2)",
    ("barlow_twins", "cifar10"): "92.10 (solo-learn README: ResNet-18, 1000 epochs)",
    ("barlow_twins", "cifar100"): "70.90 (solo-learn README: ResNet-18, 1000 epochs)",
    ("vicreg", "cifar10"): "92.07 (solo-learn README: ResNet-18, 1000 epochs)",
    ("vicreg", "cifar100"): "68.54 (solo-learn README: ResNet-18, 1000 epochs)",
}
JITTER_02 = [0.4, 0.4, 0.2, 0.1]  # ColorJitter(0.4, 0.4, 0.2, 0.1), p 0.8, grayscale p 0.2 (both codes)
REDUNDANCY_NOTES = [
    "data.batch_size is the global batch; lr 0.2 x batch / 256 (optim.lr_scaling: linear), LARS without decay "
    "or adaptation on biases and norms, 10 warm-up epochs and a per-step cosine to 0.001 x lr, as the official code.",
    "ContrastiveCrop at the paper's proportions: RandomResizedCrop for the first 20% of the epochs, boxes "
    "re-localized every 20% (the official configs: 100 of 500 epochs on small data, 20 of 100 on ImageNet).",
    "mixed precision bf16 (the official code: fp16 autocast with a GradScaler); the loss runs in float32.",
    ALIGNMENT_NOTE,
]


def redundancy_views(method: str, imagenet: bool) -> list[dict]:
    """The official two-view augmentation (ImageNet: blur p 1.0 / 0.1, solarization p 0 / 0.2, crop scale
    from 0.08), or solo-learn's CIFAR one (no blur; Barlow Twins' asymmetric.yaml, VICReg's vicreg.yaml)."""
    if imagenet:
        return [{"count": 1, "scale": [0.08, 1.0], "jitter": list(JITTER_02), "blur_p": blur, "solarize_p": solarize}
                for blur, solarize in ((1.0, 0.0), (0.1, 0.2))]
    if method == "vicreg":
        return [{"count": 2, "scale": [0.2, 1.0], "jitter": list(JITTER_02), "blur_p": 0.0, "solarize_p": 0.1}]
    return [{"count": 1, "scale": [0.08, 1.0], "jitter": list(JITTER_02), "blur_p": 0.0, "solarize_p": solarize}
            for solarize in (0.0, 0.2)]


def redundancy_recipe(method: str, dataset: str, crop: str) -> dict:
    imagenet = dataset == "imagenet1k"
    epochs = 1000  # main.py's default; main_vicreg.py's README command for its 73.2%; solo-learn's CIFAR runs
    reference = REDUNDANCY_TARGETS[method, dataset]
    target = f"linear top-1 {reference}" if crop == "rcrop" else f"no published C-Crop number; R-Crop: {reference}"
    notes = REDUNDANCY_NOTES if imagenet else [
        "no official CIFAR setting: projector 2048-2048-2048, batch 256 and the augmentations of solo-learn's "
        "CIFAR config (its target); method and optimizer values of the official code (solo-learn's LARS differs: "
        "eta 0.02 with clipping, lr 0.3, weight decay 1e-4).", *REDUNDANCY_NOTES]
    return {
        "notes": notes,
        "name": f"{method}_{dataset}_{crop}",
        "target": target,
        "model": {"name": "resnet50" if imagenet else "resnet18_cifar", "args": {"zero_init_last": True},
                  **({"channels_last": True} if imagenet else {}), "sync_bn": True},
        "method": {"name": method, "options": {"projector": [8192 if imagenet else 2048] * 3,
                                               **REDUNDANCY_METHODS[method]}},
        "data": {"dataset": dataset, "batch_size": 2048 if imagenet else 256, "num_workers": 10 if imagenet else 8},
        "crop": {"mode": crop, "alpha": 0.6 if imagenet else 0.1, "k": 0.1, "warmup_epochs": epochs // 5,
                 "loc_interval": epochs // 5, "heatmap_alignment": "official"},
        "views": redundancy_views(method, imagenet),
        "optim": {"name": "lars", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-6, "schedule": "cosine",
                  "final_lr_ratio": 0.001, "warmup_epochs": 10, "lr_scaling": "linear", "per_step": True,
                  "weight_decay_filter": "no_norm_bias"},
        "train": {"epochs": epochs, "mixed_precision": "bf16", "knn_every": 0 if imagenet else 10,
                  "checkpoint_every": 1 if imagenet else 5},
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
        for method in REDUNDANCY_METHODS:
            for dataset in ("cifar10", "cifar100", "imagenet1k"):
                written.append(redundancy_recipe(method, dataset, crop))
    write_recipes(written, "recipes/generate.py from docs/METHOD.md and the official code")


def write_recipes(recipes: list[dict], source: str) -> None:
    """Each recipe as ``recipes/NAME.yaml``, headed by its source, target and notes."""
    for recipe in recipes:
        header = f"# {recipe['name']}: generated by {source} (docs/PARITY.md).\n"
        if recipe["target"]:
            header += f"# Target: {recipe['target']}\n"
        header += "".join(f"# - {note}\n" for note in recipe.pop("notes"))
        (HERE / f"{recipe['name']}.yaml").write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    print(f"wrote {len(recipes)} recipes to {HERE}")


if __name__ == "__main__":
    main()

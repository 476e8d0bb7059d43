"""Write the DINO and MoCo v3 recipes (issue 22) into this folder.

    python recipes/generate_dino_moco_v3.py

DINO (facebookresearch/dino: main_dino.py's arguments and the README's commands) and MoCo v3
(facebookresearch/moco-v3: main_moco.py's arguments and CONFIG.md's commands), each as ``_ccrop`` and
``_rcrop``: ViT-S/16 and ResNet-50 on ImageNet-1K with the official settings and results as ``target``,
and ViT-Tiny with 4 px patches for 32 px images (CIFAR-10; any small set with ``--set data.dataset=...``).
docs/PARITY.md lists every value with its official source. Edit this script, not the generated files.
"""

from __future__ import annotations

from generate import write_recipes

# ContrastiveCrop on these schedules: no official setting exists. Boxes after the first 20% of training and
# every 20% after, as the ContrastiveCrop ImageNet configs (20 of 100 epochs), alpha 0.6 and k 0.1 as those.
CCROP_IMAGENET = {"alpha": 0.6, "k": 0.1}
CCROP_SMALL = {"alpha": 0.1, "k": 0.1}  # the ContrastiveCrop small-dataset configs
JITTER = [0.4, 0.4, 0.2, 0.1]  # both repositories: ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2


def views(size: int, scale: list[float], *, local: tuple[int, int, list[float]] | None, blur: bool) -> list[dict]:
    """The two global crops (asymmetric: blur p 1.0 / 0.1, solarize p 0 / 0.2, as main_dino.py's
    DataAugmentationDINO and main_moco.py's augmentation1/2) and DINO's local crops (blur p 0.5)."""
    def group(count: int, size: int, scale: list[float], blur_p: float, solarize_p: float) -> dict:
        return {"count": count, "size": size, "scale": list(scale), "crop": "ccrop", "flip_p": 0.5,
                "jitter": list(JITTER), "jitter_p": 0.8, "gray_p": 0.2, "blur_p": blur_p if blur else 0.0,
                "solarize_p": solarize_p}

    groups = [group(1, size, scale, 1.0, 0.0), group(1, size, scale, 0.1, 0.2)]
    if local is not None:
        groups.append(group(*local, 0.5, 0.0))
    return groups


def schedule(epochs: int) -> dict:
    return {"warmup_epochs": epochs // 5, "loc_interval": epochs // 5}


DINO_NOTES = [
    "data.batch_size is the global batch (main_dino.py: batch_size_per_gpu x GPUs); lr = optim.lr x batch / 256.",
    "the teacher sees the first two crops (method.options.global_crops); view groups 1-2 are the two global "
    "crops with DINO's asymmetric blur/solarization, group 3 the local crops.",
    "local crops use ContrastiveCrop too (crop: ccrop in views[2]); crops over the whole image: crop: rcrop there.",
    "ContrastiveCrop schedule (no official one for DINO): boxes after 20% of the epochs and every 20% after.",
]
MOCO_NOTES = [
    "data.batch_size is the global batch (main_moco.py -b, all GPUs); lr = optim.lr x batch / 256.",
    "ContrastiveCrop schedule (no official one for MoCo v3): boxes after 20% of the epochs and every 20% after.",
]


def dino_vit_small(crop: str) -> dict:
    """README 'Boosting DINO performance' full command (run_with_submitit.py: 2 nodes x 8 GPUs x 64)."""
    lr, batch = 5e-4, 1024
    return {
        "notes": ["README 'Boosting DINO performance': --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs "
                  "30 --norm_last_layer false, 16 GPUs x 64 (run_with_submitit.py defaults); every other value is "
                  "main_dino.py's default.", *DINO_NOTES],
        "name": f"dino_vit_small_imagenet1k_{crop}",
        "target": "official README (ViT-S/16, 300 epochs, boosted): linear 76.0, k-NN 73.3 (top-1, DINO with "
                  "RandomResizedCrop)",
        "model": {"name": "vit_small_patch16_224", "args": {"drop_path_rate": 0.1, "dynamic_img_size": True}},
        "method": {"name": "dino", "options": {
            "out_dim": 65536, "norm_last_layer": False, "momentum": 0.996, "student_temperature": 0.1,
            "teacher_temperature": 0.07, "warmup_teacher_temperature": 0.04, "warmup_teacher_temperature_epochs": 30,
            "center_momentum": 0.9, "clip_grad": 3.0, "freeze_last_layer": 1, "global_crops": 2}},
        "data": {"dataset": "imagenet1k", "batch_size": batch, "num_workers": 10},
        "views": views(224, [0.4, 1.0], local=(8, 96, [0.05, 0.4]), blur=True),
        "crop": {"mode": crop, **CCROP_IMAGENET, **schedule(300)},
        "optim": {"name": "adamw", "lr": lr, "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine",
                  "final_lr_ratio": 1e-6 / (lr * batch / 256), "per_step": True, "weight_decay": 0.04,
                  "weight_decay_end": 0.4, "weight_decay_filter": "no_norm_bias", "betas": [0.9, 0.999]},
        "train": {"epochs": 300, "mixed_precision": "bf16", "knn_every": 0, "checkpoint_every": 1},
    }


def dino_resnet50(crop: str) -> dict:
    """README 'ResNet-50 and other convnets trainings' command (1 node x 8 GPUs x 64)."""
    lr, batch = 0.03, 512
    return {
        "notes": ["README 'ResNet-50 and other convnets trainings': --arch resnet50 --optimizer sgd --lr 0.03 "
                  "--weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale "
                  "0.05 0.14 on 8 GPUs x 64; every other value is main_dino.py's default (teacher temperature "
                  "0.04, norm_last_layer true, 100 epochs). SyncBN: main_dino.py converts models with BatchNorm.",
                  *DINO_NOTES],
        "name": f"dino_resnet50_imagenet1k_{crop}",
        "target": "official README: the released DINO ResNet-50 reaches linear 75.3, k-NN 67.5 (top-1); the README "
                  "gives no number for this 100-epoch command (its training log does)",
        "model": {"name": "resnet50", "args": {"zero_init_last": False}, "channels_last": True, "sync_bn": True},
        "method": {"name": "dino", "options": {
            "out_dim": 65536, "norm_last_layer": True, "momentum": 0.996, "student_temperature": 0.1,
            "teacher_temperature": 0.04, "warmup_teacher_temperature": 0.04, "warmup_teacher_temperature_epochs": 0,
            "center_momentum": 0.9, "clip_grad": 3.0, "freeze_last_layer": 1, "global_crops": 2}},
        "data": {"dataset": "imagenet1k", "batch_size": batch, "num_workers": 10},
        "views": views(224, [0.14, 1.0], local=(8, 96, [0.05, 0.14]), blur=True),
        "crop": {"mode": crop, **CCROP_IMAGENET, **schedule(100)},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "lr_scaling": "linear", "warmup_epochs": 10,
                  "schedule": "cosine", "final_lr_ratio": 1e-6 / (lr * batch / 256), "per_step": True,
                  "weight_decay": 1e-4, "weight_decay_filter": "no_norm_bias"},
        "train": {"epochs": 100, "mixed_precision": "bf16", "knn_every": 0, "checkpoint_every": 1},
    }


def mocov3_vit_small(crop: str) -> dict:
    """CONFIG.md 'ViT-Small, 4-node (32-GPU) pre-training' (batch 4096, main_moco.py's default)."""
    return {
        "notes": ["CONFIG.md ViT-Small: -a vit_small --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --epochs=300 "
                  "--warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2, batch 4096; vits.py::vit_small "
                  "has 12 heads (timm's vit_small_patch16_224: 6), hence model.args.num_heads.", *MOCO_NOTES],
        "name": f"mocov3_vit_small_imagenet1k_{crop}",
        "target": "official CONFIG.md (ViT-Small, 300 epochs, batch 4096): linear 73.2 (top-1, MoCo v3 with "
                  "RandomResizedCrop)",
        "model": {"name": "vit_small_patch16_224", "args": {"num_heads": 12}, "sync_bn": True},
        "method": {"name": "mocov3", "options": {
            "temperature": 0.2, "out_dim": 256, "hidden_dim": 4096, "momentum": 0.99, "momentum_schedule": "cosine",
            "vit_init": True, "stop_grad_conv1": True}},
        "data": {"dataset": "imagenet1k", "batch_size": 4096, "num_workers": 10},
        "views": views(224, [0.08, 1.0], local=None, blur=True),
        "crop": {"mode": crop, **CCROP_IMAGENET, **schedule(300)},
        "optim": {"name": "adamw", "lr": 1.5e-4, "lr_scaling": "linear", "warmup_epochs": 40, "schedule": "cosine",
                  "final_lr_ratio": 0.0, "per_step": True, "weight_decay": 0.1, "weight_decay_filter": "all",
                  "betas": [0.9, 0.999]},
        "train": {"epochs": 300, "mixed_precision": "bf16", "knn_every": 0, "checkpoint_every": 1},
    }


def mocov3_resnet50(crop: str) -> dict:
    """CONFIG.md 'ResNet-50, 100-epoch pre-training' (main_moco.py's defaults + --moco-m-cos --crop-min=.2)."""
    return {
        "notes": ["CONFIG.md ResNet-50 100 epochs: --moco-m-cos --crop-min=.2; main_moco.py's defaults: LARS lr 0.6, "
                  "wd 1e-6, momentum 0.9, batch 4096, warm-up 10, T 1.0, m 0.99; torchvision resnet50 with "
                  "zero_init_residual=True; SyncBN.", *MOCO_NOTES],
        "name": f"mocov3_resnet50_imagenet1k_{crop}",
        "target": "official CONFIG.md (ResNet-50, 100 epochs): linear 68.9 (top-1, MoCo v3 with RandomResizedCrop)",
        "model": {"name": "resnet50", "args": {"zero_init_last": True}, "channels_last": True, "sync_bn": True},
        "method": {"name": "mocov3", "options": {
            "temperature": 1.0, "out_dim": 256, "hidden_dim": 4096, "momentum": 0.99, "momentum_schedule": "cosine"}},
        "data": {"dataset": "imagenet1k", "batch_size": 4096, "num_workers": 10},
        "views": views(224, [0.2, 1.0], local=None, blur=True),
        "crop": {"mode": crop, **CCROP_IMAGENET, **schedule(100)},
        "optim": {"name": "lars", "lr": 0.6, "momentum": 0.9, "lr_scaling": "linear", "warmup_epochs": 10,
                  "schedule": "cosine", "final_lr_ratio": 0.0, "per_step": True, "weight_decay": 1e-6,
                  "weight_decay_filter": "all"},
        "train": {"epochs": 100, "mixed_precision": "bf16", "knn_every": 0, "checkpoint_every": 1},
    }


TINY_VIT = {"name": "vit_tiny_patch16_224", "args": {"img_size": 32, "patch_size": 4, "dynamic_img_size": True}}
SMALL_NOTES = [
    "no official small-dataset setting: the ImageNet recipe scaled down (ViT-Tiny with 4 px patches on 32 px "
    "images, no blur, as the ContrastiveCrop small-dataset configs); sized for a CPU with e.g. "
    "--set data.dataset=small_objects_hard --set train.epochs=16.",
]


def dino_vit_tiny_small(crop: str) -> dict:
    lr, batch = 5e-4, 256
    return {
        "notes": [*SMALL_NOTES, *DINO_NOTES],
        "name": f"dino_vit_tiny_cifar10_{crop}",
        "target": None,
        "model": {**TINY_VIT, "args": {**TINY_VIT["args"], "drop_path_rate": 0.1}},
        "method": {"name": "dino", "options": {
            "out_dim": 4096, "norm_last_layer": False, "momentum": 0.996, "teacher_temperature": 0.07,
            "warmup_teacher_temperature": 0.04, "warmup_teacher_temperature_epochs": 30, "clip_grad": 3.0,
            "freeze_last_layer": 1, "global_crops": 2}},
        "data": {"dataset": "cifar10", "batch_size": batch, "num_workers": 4},
        "views": views(32, [0.4, 1.0], local=(6, 16, [0.05, 0.4]), blur=False),
        "crop": {"mode": crop, **CCROP_SMALL, **schedule(200)},
        "optim": {"name": "adamw", "lr": lr, "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine",
                  "final_lr_ratio": 1e-6 / (lr * batch / 256), "per_step": True, "weight_decay": 0.04,
                  "weight_decay_end": 0.4, "weight_decay_filter": "no_norm_bias"},
        "train": {"epochs": 200, "mixed_precision": "no", "knn_every": 10, "checkpoint_every": 5},
    }


def mocov3_vit_tiny_small(crop: str) -> dict:
    return {
        "notes": [*SMALL_NOTES, *MOCO_NOTES],
        "name": f"mocov3_vit_tiny_cifar10_{crop}",
        "target": None,
        "model": TINY_VIT,
        "method": {"name": "mocov3", "options": {
            "temperature": 0.2, "out_dim": 256, "hidden_dim": 1024, "momentum": 0.99, "momentum_schedule": "cosine",
            "vit_init": True, "stop_grad_conv1": True}},
        "data": {"dataset": "cifar10", "batch_size": 256, "num_workers": 4},
        "views": views(32, [0.2, 1.0], local=None, blur=False),
        "crop": {"mode": crop, **CCROP_SMALL, **schedule(200)},
        "optim": {"name": "adamw", "lr": 1.5e-4, "lr_scaling": "linear", "warmup_epochs": 20, "schedule": "cosine",
                  "final_lr_ratio": 0.0, "per_step": True, "weight_decay": 0.1, "weight_decay_filter": "all"},
        "train": {"epochs": 200, "mixed_precision": "no", "knn_every": 10, "checkpoint_every": 5},
    }


RECIPES = (dino_vit_small, dino_resnet50, mocov3_vit_small, mocov3_resnet50, dino_vit_tiny_small,
           mocov3_vit_tiny_small)


def main() -> None:
    write_recipes([make(crop) for make in RECIPES for crop in ("rcrop", "ccrop")],
                  "recipes/generate_dino_moco_v3.py from the official code")


if __name__ == "__main__":
    main()

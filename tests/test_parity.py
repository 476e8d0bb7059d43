"""Parity with the official ContrastiveCrop code (xyupeng/ContrastiveCrop), setting by setting.

The reference updates below are written from the official code's math (file named at each one) in
plain torch: loss, loss scale, per-epoch lr, SGD with momentum and weight decay, EMA, queue. The
project's side is its method and optimizer built from the paper recipe in ``recipes/``. Networks are a
tiny CIFAR-stem ResNet (the recipe's ``model.args``) on 16 px inputs, so each step runs in well under a
second. docs/PARITY.md names the test of every setting.
"""

from __future__ import annotations

import copy
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hub_ccrop.data import get_spec
from hub_ccrop.methods import SplitBatchNorm2d, build_method
from hub_ccrop.models import create_backbone
from hub_ccrop.optim import build_optimizer, lr_at_epoch, set_epoch_lr
from hub_ccrop.recipe import Recipe, RecipeError, batch_split, load_recipe, per_process_batch

REPO = Path(__file__).resolve().parents[1]
# an unpacked copy of xyupeng/ContrastiveCrop, when there is one: HUB_CCROP_OFFICIAL=/path/to/ContrastiveCrop
OFFICIAL = Path(os.environ.get("HUB_CCROP_OFFICIAL", "/nonexistent"))

# The official settings of each paper recipe, transcribed from the official config named in "file"
# (test_transcription_matches_the_official_files checks them against the files when a copy is at hand).
# What every official small-dataset config (configs/small/cifar10/*_ccrop.py) sets alike.
SMALL = dict(depth=18, maxpool=False, blur=False, batch_size=512, lr=0.5, momentum=0.9, weight_decay=1e-4,
             lr_cfg=dict(type="Cosine", decay_rate=0.1), epochs=500, warmup_epochs=100, loc_interval=100,
             box_thresh=0.1, alpha=0.1)
OFFICIAL_SETTINGS = {
    "simclr_cifar10_ccrop": dict(
        file="configs/small/cifar10/simclr_ccrop.py", **SMALL, temperature=0.5, base_temperature=0.07, sync_bn=True, zero_init=False),
    "moco_v2_cifar10_ccrop": dict(
        file="configs/small/cifar10/moco_ccrop.py", **SMALL, temperature=0.2, queue_size=65536, ema=0.999, sync_bn=False, zero_init=False),
    "byol_cifar10_ccrop": dict(
        file="configs/small/cifar10/byol_ccrop.py", **SMALL, ema=0.996, sync_bn=True, zero_init=False),
    "simsiam_cifar10_ccrop": dict(
        file="configs/small/cifar10/simsiam_ccrop.py", **SMALL, fix_pred_lr=True, sync_bn=True, zero_init=True),
    "moco_v2_imagenet1k_ccrop": dict(
        file="configs/IN1K/mocov2_ccrop.py", depth=50, maxpool=True, blur=True, batch_size=256, lr=0.03, momentum=0.9, weight_decay=1e-4,
        lr_cfg=dict(type="Cosine", decay_rate=0.0), epochs=100, warmup_epochs=20, loc_interval=20,
        box_thresh=0.1, alpha=0.6, temperature=0.2, queue_size=65536, ema=0.999, sync_bn=False, zero_init=False),
    "moco_v1_imagenet1k_ccrop": dict(
        file="configs/IN1K/mocov1_ccrop.py", depth=50, maxpool=True, blur=True, batch_size=256, lr=0.03, momentum=0.9, weight_decay=1e-4,
        lr_cfg=dict(type="MultiStep", decay_rate=0.0, decay_steps=[60, 80]), epochs=100, warmup_epochs=20,
        loc_interval=20, box_thresh=0.1, alpha=0.6, temperature=0.07, queue_size=65536, ema=0.999,
        sync_bn=False, zero_init=False),
}
# The same official config serves the other small datasets of each method (cifar100/stl10/tiny200 differ
# only in data paths and normalization; tiny200's warmup_epochs is discussed in docs/PARITY.md).
SAME_AS = {f"{m}_{d}_ccrop": f"{m}_cifar10_ccrop" for m in ("simclr", "moco_v2", "byol", "simsiam")
           for d in ("cifar100", "stl10", "tiny_imagenet")}
SAME_AS["moco_v2_imagenet200_ccrop"] = "moco_v2_imagenet1k_ccrop"
SAME_AS["moco_v1_imagenet200_ccrop"] = "moco_v1_imagenet1k_ccrop"


def paper(name: str) -> Recipe:
    return load_recipe(REPO / "recipes" / f"{name}.yaml")


def official_lr(cfg: dict, base_lr: float, epochs: int, epoch: int) -> float:
    """utils/util.py::_get_lr for a 1-based ``epoch`` (``steps`` = epochs, ``start_step`` = 1)."""
    if cfg["type"] == "Cosine":
        eta_min = base_lr * cfg["decay_rate"]
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2
    passed = sum(epoch > step for step in cfg["decay_steps"])
    return base_lr * cfg["decay_rate"] ** passed


# ------------------------------------------------------------------------------------- recipe settings
@pytest.mark.parametrize("name", sorted(OFFICIAL_SETTINGS.keys() | SAME_AS.keys()))
def test_recipe_settings_equal_the_official_config(name):
    official = OFFICIAL_SETTINGS[SAME_AS.get(name, name)]
    recipe = paper(name)
    opts = recipe.method.options
    assert recipe.data.batch_size == official["batch_size"]  # global in both
    # models/resnet.py: depth 18 with maxpool=False is the CIFAR stem (3x3 conv, stride 1, no max-pool)
    assert recipe.model.name == {(18, False): "resnet18_cifar", (50, True): "resnet50"}[
        (official["depth"], official["maxpool"])]
    # datasets/transforms/imagenet.py adds GaussianBlur([0.1, 2.0]) p=0.5; small.py has none
    assert (recipe.crop.blur or get_spec(recipe.data.dataset).blur) == official["blur"]
    assert (recipe.optim.lr, recipe.optim.momentum, recipe.optim.weight_decay) == (
        official["lr"], official["momentum"], official["weight_decay"])
    assert recipe.optim.lr_scaling == "none" and recipe.optim.warmup_epochs == 0
    assert recipe.train.epochs == official["epochs"]
    assert (recipe.crop.loc_interval, recipe.crop.k, recipe.crop.alpha) == (
        official["loc_interval"], official["box_thresh"], official["alpha"])
    if not name.startswith("simclr_tiny"):  # official tiny200 config: warmup_epochs = 500, see PARITY.md
        assert recipe.crop.warmup_epochs == official["warmup_epochs"]
    assert recipe.localization_epochs() == list(
        range(official["warmup_epochs"], official["epochs"], official["loc_interval"]))
    # DDP_*_ccrop.py::update_box: bilinear align_corners=False upsampling and x1 = last/W
    assert recipe.crop.heatmap_alignment == "official"
    assert recipe.model.sync_bn == official["sync_bn"]
    assert recipe.model.args["zero_init_last"] == official["zero_init"]
    for key, option in (("temperature", "temperature"), ("base_temperature", "base_temperature"),
                        ("queue_size", "queue_size"), ("ema", "momentum"), ("fix_pred_lr", "fix_pred_lr")):
        if key in official:
            assert opts[option] == official[key], key


@pytest.mark.parametrize("name", sorted(OFFICIAL_SETTINGS))
def test_lr_schedule_equals_the_official_one_every_epoch(name):
    official, recipe = OFFICIAL_SETTINGS[name], paper(name)
    epochs = recipe.train.epochs
    ours = [lr_at_epoch(recipe.optim, e, epochs, recipe.optim.lr) for e in range(epochs)]
    theirs = [official_lr(official["lr_cfg"], official["lr"], epochs, e + 1) for e in range(epochs)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="no copy of the official code: set HUB_CCROP_OFFICIAL")
@pytest.mark.parametrize("name", sorted(OFFICIAL_SETTINGS))
def test_transcription_matches_the_official_files(name):
    official = OFFICIAL_SETTINGS[name]
    cfg = runpy.run_path(str(OFFICIAL / official["file"]))
    assert (cfg["batch_size"], cfg["lr"], cfg["epochs"]) == (official["batch_size"], official["lr"], official["epochs"])
    assert (cfg["optimizer"]["momentum"], cfg["optimizer"]["weight_decay"]) == (
        official["momentum"], official["weight_decay"])
    assert {k: cfg["lr_cfg"][k] for k in official["lr_cfg"]} == official["lr_cfg"]
    assert (cfg["warmup_epochs"], cfg["loc_interval"], cfg["box_thresh"]) == (
        official["warmup_epochs"], official["loc_interval"], official["box_thresh"])
    assert cfg["data"]["train"]["ccrop_dict"]["alpha"] == official["alpha"]
    assert cfg["model"].get("zero_init_residual", False) == official["zero_init"]
    assert (cfg["model"]["depth"], cfg["model"]["maxpool"]) == (official["depth"], official["maxpool"])
    for key, value in (cfg.get("moco") or {}).items():
        expected = {"T": official.get("temperature"), "K": official.get("queue_size"), "m": official.get("ema")}
        if key in expected:
            assert value == expected[key], key
    if "loss" in cfg and "base_temperature" in cfg["loss"]:
        assert (cfg["loss"]["temperature"], cfg["loss"]["base_temperature"]) == (
            official["temperature"], official["base_temperature"])
    script = {"sim": "DDP_simclr_ccrop.py", "moc": "DDP_moco_ccrop.py", "byo": "DDP_byol_ccrop.py",
              "sims": "DDP_simsiam_ccrop.py"}["sims" if name.startswith("simsiam") else name[:3]]
    assert ("convert_sync_batchnorm" in (OFFICIAL / script).read_text()) == official["sync_bn"]


def test_zero_init_last_bn_follows_the_recipe():
    """timm zero-inits the last BN of each block by default; the recipes switch it per method."""
    for name, zero in (("simclr_cifar10_ccrop", False), ("simsiam_cifar10_ccrop", True)):
        recipe = paper(name)
        backbone = create_backbone(recipe.model.name, **recipe.model.args)
        last_bn = torch.cat([block.bn2.weight for stage in (backbone.layer1, backbone.layer4) for block in stage])
        assert bool((last_bn == 0).all()) == zero and bool((last_bn == 1).all()) != zero


# ------------------------------------------------------------------------------------- global batch
def test_global_batch_splits_over_processes_and_accumulation():
    assert per_process_batch(512, 2) == 256 and per_process_batch(512, 2, 2) == 128
    assert batch_split(512, 2) == "global batch 512 = 2 processes x 256"
    assert batch_split(512, 1) == "global batch 512 = 1 process x 512"
    assert batch_split(512, 2, 4) == "global batch 512 = 2 processes x 4 accumulation steps x 64"
    recipe = load_recipe({"data": {"batch_size": 256}, "train": {"grad_accum": 2}})
    assert recipe.per_process_batch_size(8) == 16 and recipe.loc_per_process_batch_size(8) == 64
    with pytest.raises(RecipeError, match=r"data.batch_size=256 is the global batch .* 3 process\(es\) x 2 "
                                          r"accumulation steps: set data.batch_size to a multiple of 6"):
        recipe.per_process_batch_size(3)
    loc = load_recipe({"data": {"batch_size": 256}, "crop": {"loc_batch_size": 100}})
    with pytest.raises(RecipeError, match="crop.loc_batch_size=100"):
        loc.loc_per_process_batch_size(8)


def test_readme_launch_example_trains_the_paper_global_batch():
    readme = (REPO / "README.md").read_text()
    recipe = paper("moco_v2_imagenet1k_ccrop")
    assert "--num_processes 8 -m hub_ccrop train recipes/moco_v2_imagenet1k_ccrop.yaml" in readme
    assert recipe.per_process_batch_size(8) * 8 == recipe.data.batch_size == 256


# ------------------------------------------------------------------------------------- one-step parity
def views(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)


def project_method(recipe: Recipe) -> nn.Module:
    """In float64: on noise images the heads' BatchNorms see a tiny batch variance, so in float32 the second
    step's gradients hang on rounding (which changes with the number of threads) and no tolerance holds."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny_cifar", **recipe.model.args)
    return build_method(recipe.method.name, backbone, **recipe.method.options).double()


def project_steps(method: nn.Module, recipe: Recipe, batches, epoch: int) -> None:
    """The project's side: the method and optimizer built from the recipe, as train.py's loop drives them."""
    base_lr = recipe.optim.lr
    optimizer = build_optimizer(method.param_groups(base_lr, recipe.optim.weight_decay), recipe.optim, base_lr)
    set_epoch_lr(optimizer, recipe.optim, epoch, recipe.train.epochs, base_lr)
    method.train()
    for i, (v1, v2) in enumerate(batches):
        torch.manual_seed(100 + i)  # MoCo's key shuffle draws a permutation
        loss, _ = method(v1, v2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(0, 2)


def official_sgd(groups: list[tuple[list[nn.Parameter], float]], momentum: float, wd: float, buffers: dict) -> None:
    """torch.optim.SGD(momentum, weight_decay) as the official builder/build.py makes it, written out."""
    with torch.no_grad():
        for params, lr in groups:
            for p in params:
                if p.grad is None:
                    continue
                d = p.grad + wd * p
                buffers[p] = d.clone() if p not in buffers else momentum * buffers[p] + d
                p -= lr * buffers[p]
                p.grad = None


def ema(target: nn.Module, online: nn.Module, m: float) -> None:
    """models/moco.py and models/byol.py::_momentum_update_key_encoder."""
    with torch.no_grad():
        for pk, pq in zip(target.parameters(), online.parameters(), strict=True):
            pk.data = pk.data * m + pq.data * (1.0 - m)


def assert_same_parameters(ours: nn.Module, ref: nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=2e-6, msg=name)


def official_nt_xent(f1: torch.Tensor, f2: torch.Tensor, temperature: float, base_temperature: float):
    """losses/NT_Xent_dist.py (one process): masks, max-subtraction, loss x temperature / base_temperature."""
    n = f1.shape[0]
    features = F.normalize(torch.cat([f1, f2]), dim=1)
    logits = features @ features.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    neg_mask = ~torch.eye(2 * n, dtype=torch.bool)
    pos_mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    pos_mask[:n, n:] = torch.eye(n, dtype=torch.bool)
    pos_mask[n:, :n] = torch.eye(n, dtype=torch.bool)
    log_prob = logits[pos_mask] - torch.log(torch.exp(logits)[neg_mask].view(2 * n, -1).sum(1))
    return -(temperature / base_temperature) * log_prob.mean()


EPOCH = {"small": 250, "imagenet": 30}  # 0-based: mid-schedule, so the lr schedule is part of the check
BATCHES = [tuple(v.double() for v in views(seed, 32)) for seed in (1, 2)]  # 4 per split-BN group; two steps: the second uses the momentum buffers, the EMA target and the queue


def run_both(name: str):
    recipe, official = paper(name), OFFICIAL_SETTINGS[name]
    epoch = EPOCH["imagenet" if "imagenet" in name else "small"]
    ours = project_method(recipe)
    ref = copy.deepcopy(ours)
    project_steps(ours, recipe, BATCHES, epoch)
    lr = official_lr(official["lr_cfg"], official["lr"], official["epochs"], epoch + 1)
    return recipe, official, ours, ref, lr


def test_simclr_one_step_equals_official():
    recipe, official, ours, ref, lr = run_both("simclr_cifar10_ccrop")
    buffers: dict = {}
    for v1, v2 in BATCHES:  # DDP_simclr_ccrop.py::train: one forward of both views, NT_Xent_dist
        f1, f2 = ref.encoder(torch.cat([v1, v2])).chunk(2)
        official_nt_xent(f1, f2, official["temperature"], official["base_temperature"]).backward()
        official_sgd([(list(ref.parameters()), lr)], official["momentum"], official["weight_decay"], buffers)
    assert_same_parameters(ours, ref)
    # the scale matters: without it the step differs
    plain = project_method(recipe)
    plain.config.base_temperature = None
    project_steps(plain, recipe, BATCHES[:1], EPOCH["small"])
    assert not torch.allclose(plain.encoder.head[0].weight, ours.encoder.head[0].weight, atol=1e-4)


@pytest.mark.parametrize("name", ["moco_v2_cifar10_ccrop", "moco_v2_imagenet1k_ccrop", "moco_v1_imagenet1k_ccrop"])
def test_moco_one_step_equals_official(name):
    recipe, official, ours, ref, lr = run_both(name)
    queue, ptr, m, buffers = ref.queue.T.clone(), 0, official["ema"], {}  # official queue: [dim, K]
    for i, (v1, v2) in enumerate(BATCHES):  # models/moco.py::forward
        ema(ref.target, ref.online, m)  # the key encoder's update opens each forward
        torch.manual_seed(100 + i)
        q = F.normalize(ref.online(v1), dim=1)
        with torch.no_grad():  # single process: the batch shuffle of MoCo's single-GPU demo (split-BN groups)
            perm = torch.randperm(v2.shape[0])
            k = F.normalize(ref.target(v2[perm]), dim=1)[torch.argsort(perm)]
        logits = torch.cat([torch.einsum("nc,nc->n", q, k)[:, None], torch.einsum("nc,ck->nk", q, queue)], 1)
        F.cross_entropy(logits / official["temperature"], torch.zeros(len(q), dtype=torch.long)).backward()
        queue[:, ptr:ptr + len(k)] = k.T
        ptr = (ptr + len(k)) % queue.shape[1]
        official_sgd([(list(ref.online.parameters()), lr)], official["momentum"], official["weight_decay"], buffers)
    ema(ref.target, ref.online, m)  # the next forward's update: ours runs it right after the step
    assert_same_parameters(ours, ref)
    torch.testing.assert_close(ours.queue, queue.T)
    assert int(ours.queue_ptr) == ptr == sum(len(v1) for v1, _ in BATCHES)


def test_byol_one_step_equals_official():
    recipe, official, ours, ref, lr = run_both("byol_cifar10_ccrop")
    m, buffers = official["ema"], {}
    trained = list(ref.online.parameters()) + list(ref.predictor.parameters())
    for v1, v2 in BATCHES:  # models/byol.py::forward + DDP_byol_ccrop.py::train
        ema(ref.target, ref.online, m)
        p1, z2 = ref.predictor(ref.online(v1)), ref.target(v2).detach()
        p2, z1 = ref.predictor(ref.online(v2)), ref.target(v1).detach()
        loss = -2 * (F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean())
        loss.backward()
        official_sgd([(trained, lr)], official["momentum"], official["weight_decay"], buffers)
    ema(ref.target, ref.online, m)
    assert_same_parameters(ours, ref)


def test_simsiam_one_step_equals_official():
    recipe, official, ours, ref, lr = run_both("simsiam_cifar10_ccrop")
    buffers: dict = {}
    for v1, v2 in BATCHES:  # models/simsiam.py + DDP_simsiam_ccrop.py::train, adjust_lr_simsiam
        z1, z2 = ref.encoder(v1), ref.encoder(v2)
        p1, p2 = ref.predictor(z1), ref.predictor(z2)
        loss = -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=1).mean()
                       + F.cosine_similarity(p2, z1.detach(), dim=1).mean())
        loss.backward()
        groups = [(list(ref.encoder.parameters()), lr), (list(ref.predictor.parameters()), official["lr"])]
        official_sgd(groups, official["momentum"], official["weight_decay"], buffers)
    assert lr < official["lr"]  # mid-schedule: the predictor's fixed lr is really different
    assert_same_parameters(ours, ref)


# ------------------------------------------------------------------------------------- split-BN
def test_split_bn_normalizes_each_group_with_its_own_statistics():
    """MoCo's single-GPU demo (SplitBatchNorm): groups are rows g, g + G, ...; running stats the groups' mean."""
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(4, num_splits=4)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    x = torch.randn(16, 4, 5, 5) * 3 + 1
    out = bn(x)
    for g in range(4):
        rows = x[g::4]
        mean, var = rows.mean((0, 2, 3), keepdim=True), rows.var((0, 2, 3), unbiased=False, keepdim=True)
        expected = (rows - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out[g::4], expected, rtol=1e-4, atol=1e-5)
    group_means = torch.stack([x[g::4].mean((0, 2, 3)) for g in range(4)])
    torch.testing.assert_close(bn.running_mean, 0.1 * group_means.mean(0), rtol=1e-5, atol=1e-6)
    whole = nn.BatchNorm2d(4)
    whole.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn.eval()(x), whole.eval()(x))  # evaluation: plain BN, same state dict


def test_single_process_moco_uses_split_bn_by_default():
    recipe = paper("moco_v2_cifar10_ccrop")
    method = project_method(recipe)
    splits = [m.num_splits for m in method.modules() if isinstance(m, nn.BatchNorm2d)]
    assert splits and all(isinstance(m, SplitBatchNorm2d) for m in method.modules() if isinstance(m, nn.BatchNorm2d))
    assert set(splits) == {8}
    with pytest.raises(ValueError, match="multiple of method.options.split_bn"):
        method(*(v.double() for v in views(3, n=12)))
    with pytest.raises(ValueError, match="split_bn"):
        build_method("moco_v2", create_backbone("resnet_tiny_cifar"), split_bn=0)


# ------------------------------------------------------------------------------------- 2 processes
TWO_PROCESS_SETTINGS = [
    "--set", "model.name=resnet_tiny_cifar", "--set", "data.dataset=small_objects", "--set", "data.batch_size=64",
    "--set", "data.num_workers=0", "--set", "crop.mode=rcrop", "--set", "train.epochs=1", "--set", "train.knn_every=0",
    "--set", "train.mixed_precision=no",
    # A small step (x the recipe's loss scale 7.14): float-rounding differences between the two runs then
    # stay far below the update instead of being amplified from step to step.
    "--set", "optim.lr=0.0005",
]


@pytest.mark.slow
def test_two_processes_with_sync_bn_equal_one_process_at_the_same_global_batch(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 (CPU, gloo) with global batch 64 (2 x 32) and SyncBN
    trains the same weights as one process with batch 64 over 3 steps: the same images per step (seedable
    sampler; views seeded per image by _parity_worker.py), BN statistics, SimCLR negatives and the official
    loss scale over the global batch. Without SyncBN the 2-process run differs (the check can fail)."""
    from hub_ccrop.synthetic import small_objects_dir

    data = small_objects_dir(tmp_path / "data", train=192, test=32)  # 3 steps of 64
    worker = Path(__file__).with_name("_parity_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    common = [str(REPO / "recipes" / "simclr_cifar10_ccrop.yaml"), *TWO_PROCESS_SETTINGS, "--set", f"data.data_dir={data}"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker)]
    runs = {"one": ([sys.executable, str(worker)], {"PARITY_INIT": str(tmp_path / "init.safetensors")}),
            "two": (launch, {}), "two_without_sync_bn": (launch, {})}
    outputs = {}
    for key, (cmd, extra_env) in runs.items():
        sync = "false" if key == "two_without_sync_bn" else "true"
        result = subprocess.run([*cmd, *common, "--set", f"model.sync_bn={sync}", "--output-dir", str(tmp_path / key)],
                                env={**env, **extra_env}, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[key] = result.stdout + result.stderr
    assert "global batch 64 = 1 process x 64" in outputs["one"]
    assert "global batch 64 = 2 processes x 32" in outputs["two"]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (run["batch_size"], run["num_processes"], run["per_process_batch_size"]) == (64, 2, 32)
    init, one, two, no_sync = (load_file(tmp_path / f"{key}.safetensors") if key == "init" else
                               load_file(tmp_path / key / "backbone.safetensors")
                               for key in ("init", "one", "two", "two_without_sync_bn"))
    trained = {k for k in one if k.endswith(("weight", "bias"))}

    def disagreement(other: dict) -> dict[str, float]:
        """Per tensor: max |other - one| over max |one - init| (the update of the 1-process run)."""
        return {k: float((other[k] - one[k]).abs().max() / (one[k] - init[k]).abs().max()) for k in trained}

    assert min(float((one[k] - init[k]).abs().max()) for k in trained) > 1e-5  # every tensor trained
    assert max(disagreement(two).values()) < 0.05  # measured: 0.007 (float rounding, amplified over 3 steps)
    assert max(disagreement(no_sync).values()) > 0.2  # measured: 0.64 (per-process BN statistics)


# ------------------------------------------------------------------------------------- official box tables
def test_official_boxes_land_on_the_same_images_in_another_row_order():
    """Official rows follow torchvision's order; a Hub copy (or the shuffled local CIFAR-10) another one:
    matched by image hash, each official box lands on the project id of the same image."""
    from PIL import Image

    from hub_ccrop.boxes import BoxTable, image_key, official_id_map

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(20)]
    images.append(images[3].copy())  # an exact duplicate, as some datasets have
    official_order = rng.permutation(len(images))  # official row r shows images[official_order[r]]
    official = torch.rand(len(images), 4) * 0.5
    official[:, 2:] += 0.4  # (y0, x0, y1, x1) with y1 > y0
    ids = official_id_map([image_key(images[i]) for i in official_order], [image_key(im) for im in images])
    table = BoxTable.from_official(official, image_size=(8, 8), official_to_id=ids)
    plain = BoxTable.from_official(official, image_size=(8, 8))  # row r -> id r
    for row, image_index in enumerate(official_order):
        assert torch.equal(table.lookup([int(image_index)]), plain.lookup([row])) or image_index in (3, 20)
    assert sorted(ids.tolist()) == list(range(len(images)))
    with pytest.raises(KeyError, match="official row 0"):
        official_id_map(["missing"], [image_key(im) for im in images])
    with pytest.raises(ValueError, match="official_id_map"):
        BoxTable.from_official(official, image_size=(8, 8), official_to_id=torch.zeros(len(images), dtype=torch.long))


def test_imagefolder_order_is_torchvisions(tmp_path):
    from torchvision.datasets import ImageFolder

    from hub_ccrop.boxes import imagefolder_order

    files = ["n02/b.png", "n01/sub/a.png", "n01/z.png", "n01/sub-x/c.png", "n10/a.png", "n01/a.png"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    official = [str(Path(path).relative_to(tmp_path)) for path, _ in
                ImageFolder(str(tmp_path), loader=lambda _: None, is_valid_file=lambda _: True).samples]
    assert [files[i] for i in imagefolder_order(files)] == official


# ------------------------------------------------------------------------------------- linear protocol
def test_linear_protocol_per_dataset_follows_the_official_linear_configs():
    """configs/linear/{cifar10,cifar100,stl10,tiny200}_res18.py: lr 10, batch 512; {IN1K,IN200}_res50.py:
    lr 30, batch 256 (MoCo's protocol). Both: 100 epochs, x0.1 at 60 and 80, wd 0 (the CLI's defaults)."""
    import argparse

    from hub_ccrop.commands.evaluate import add_cli
    from hub_ccrop.evaluate import linear_protocol

    for name in ("cifar10", "cifar100", "stl10", "tiny_imagenet"):
        assert (linear_protocol(get_spec(name)).lr, linear_protocol(get_spec(name)).batch_size) == (10.0, 512)
    for name in ("imagenet1k", "imagenet200"):
        assert (linear_protocol(get_spec(name)).lr, linear_protocol(get_spec(name)).batch_size) == (30.0, 256)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "linear", "run", "--dataset", "cifar10"])
    assert (args.lr, args.batch_size, args.epochs, args.milestones) == (None, None, 100, [60, 80])
    if OFFICIAL.is_dir():
        for file, protocol in (("cifar10_res18.py", "cifar10"), ("IN1K_res50.py", "imagenet1k")):
            cfg = runpy.run_path(str(OFFICIAL / "configs" / "linear" / file))
            chosen = linear_protocol(get_spec(protocol))
            assert (cfg["lr"], cfg["batch_size"], cfg["epochs"]) == (chosen.lr, chosen.batch_size, 100)
            assert cfg["lr_cfg"]["decay_steps"] == [60, 80] and cfg["optimizer"]["weight_decay"] == 0


def test_bias_before_batchnorm_changes_nothing_in_training():
    """models/byol.py keeps the bias of the Linear layers followed by BatchNorm; ours drop it. In training
    mode BN subtracts the batch mean, so outputs and every other gradient are the same and the bias's own
    gradient is zero (only weight decay would move it)."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    official = copy.deepcopy(ours)
    official[0] = nn.Linear(6, 5)
    with torch.no_grad():
        official[0].weight.copy_(ours[0].weight)
        official[0].bias.uniform_(-1, 1)
    x = torch.randn(16, 6)
    out, out_official = ours(x), official(x)
    torch.testing.assert_close(out, out_official)
    out.square().sum().backward()
    out_official.square().sum().backward()
    torch.testing.assert_close(official[0].bias.grad, torch.zeros(5), atol=1e-5, rtol=0)
    for a, b in ((ours[0].weight, official[0].weight), (ours[1].weight, official[1].weight), (ours[3].weight, official[3].weight)):
        torch.testing.assert_close(a.grad, b.grad)

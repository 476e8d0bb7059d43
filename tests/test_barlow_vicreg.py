"""Barlow Twins and VICReg against the official code's math, in float64, and on two processes.

The ``official_*`` functions below are transcriptions of the official lines (file and function named at
each one; facebookresearch/barlowtwins ``main.py``, facebookresearch/vicreg ``main_vicreg.py``), written
in plain torch so that the tests run without a copy of the official repositories.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hub_ccrop.methods import barlow_twins_loss, build_method, method_config, off_diagonal, vicreg_loss
from hub_ccrop.models import create_backbone
from hub_ccrop.optim import LARS, build_optimizer, lr_at, set_step_schedule
from hub_ccrop.recipe import Recipe, load_recipe
from hub_ccrop.views import Views

sys.path.insert(0, str(Path(__file__).parent))
import _barlow_vicreg_worker as worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ official transcriptions
def official_off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """main.py::off_diagonal (main_vicreg.py has the same lines)."""
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def official_barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, batch_size: int, lambd: float) -> torch.Tensor:
    """main.py::BarlowTwins.forward after the projector, one process (``all_reduce`` is then the identity);
    ``self.bn = nn.BatchNorm1d(sizes[-1], affine=False)`` in training mode."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.dtype)
    c = bn(z1).T @ bn(z2)
    c = c / batch_size  # c.div_(self.args.batch_size)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()  # torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = official_off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def official_vicreg_loss(x: torch.Tensor, y: torch.Tensor, batch_size: int, sim_coeff: float = 25.0,
                         std_coeff: float = 25.0, cov_coeff: float = 1.0) -> torch.Tensor:
    """main_vicreg.py::VICReg.forward after the projector, one process (``FullGatherLayer`` is the identity)."""
    num_features = x.shape[1]
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = official_off_diagonal(cov_x).pow(2).sum().div(num_features) + \
        official_off_diagonal(cov_y).pow(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


class OfficialLARS(torch.optim.Optimizer):
    """main.py::LARS (main_vicreg.py::LARS is the same with the filters as functions), with the exclusions
    both scripts switch on: ``exclude_bias_and_norm(p) = p.ndim == 1`` from decay and from adaptation."""

    def __init__(self, params, lr, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:  # weight_decay_filter=True: "not exclude_bias_and_norm(p)"
                    dp = dp.add(p, alpha=g["weight_decay"])
                if p.ndim != 1:  # lars_adaptation_filter=True
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def official_lr(step: int, steps_per_epoch: int, epochs: int, batch_size: int, base: float) -> float:
    """main.py::adjust_learning_rate (the lr before the per-group factor; main_vicreg.py's is the same with
    ``base_lr = args.base_lr * args.batch_size / 256``): ``base`` = 1 for Barlow Twins, args.base_lr for VICReg."""
    max_steps = epochs * steps_per_epoch
    warmup_steps = 10 * steps_per_epoch
    base_lr = base * batch_size / 256
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step -= warmup_steps
        max_steps -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        end_lr = base_lr * 0.001
        lr = base_lr * q + end_lr * (1 - q)
    return lr


def embeddings(n: int = 32, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views' embeddings, float64, with an offset and uneven scales per feature."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    scale = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
    z1 = (base + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)) * scale + 5
    z2 = (base + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)) * scale - 2
    return z1.requires_grad_(), z2.requires_grad_()


# ------------------------------------------------------------------------------------------------ losses
def test_off_diagonal_is_every_entry_but_the_diagonal_in_row_order():
    x = torch.arange(25.0).view(5, 5)
    assert torch.equal(off_diagonal(x), x[~torch.eye(5, dtype=torch.bool)])
    assert torch.equal(off_diagonal(x), official_off_diagonal(x))
    with pytest.raises(ValueError, match="square"):
        off_diagonal(torch.zeros(2, 3))


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_loss_and_its_gradient_equal_the_official_float64(name):
    z1, z2 = embeddings()
    if name == "barlow_twins":
        ours, _ = barlow_twins_loss(z1, z2, lambd=0.0051)
        theirs = official_barlow_twins_loss(z1, z2, batch_size=32, lambd=0.0051)
    else:
        ours, _ = vicreg_loss(z1, z2)
        theirs = official_vicreg_loss(z1, z2, batch_size=32)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, (z1, z2))
    g_theirs = torch.autograd.grad(theirs, (z1, z2))
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def whitened(n: int, d: int) -> torch.Tensor:
    """Embeddings with zero mean, unit (biased) variance and zero correlation per feature, exactly."""
    x = torch.randn(n, d, dtype=torch.float64)
    x = x - x.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(x.T @ x / n)
    return x @ eigvecs @ torch.diag(eigvals.rsqrt()) @ eigvecs.T


def test_barlow_twins_is_zero_at_the_identity_and_counts_a_redundant_feature():
    """C = I (identical, whitened views) is the minimum, 0 (up to BatchNorm's eps); a duplicated feature
    adds its squared correlation 1 twice (C_ij and C_ji) to the off-diagonal sum, weighted by lambda."""
    torch.manual_seed(0)
    z = whitened(64, 8)
    loss, terms = barlow_twins_loss(z, z, lambd=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    redundant = torch.cat([z, z[:, :1]], dim=1)
    loss, terms = barlow_twins_loss(redundant, redundant, lambd=0.5)
    assert terms["off_diag"].item() == pytest.approx(2.0, rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * 2.0, rel=1e-4)


def test_vicreg_terms_at_collapse_and_at_the_optimum():
    collapsed = torch.ones(16, 8, dtype=torch.float64)
    _, terms = vicreg_loss(collapsed, collapsed)
    assert terms["invariance"] == 0 and terms["covariance"] == 0
    assert terms["variance"].item() == pytest.approx(1 - math.sqrt(1e-4))  # relu(1 - sqrt(0 + eps))
    torch.manual_seed(0)
    spread = whitened(64, 8) * 2  # std 2 > 1: no variance penalty; uncorrelated: no covariance penalty
    loss, terms = vicreg_loss(spread, spread)
    assert terms["invariance"] == 0 and terms["variance"] == 0 and loss.item() == pytest.approx(0.0, abs=1e-20)


def test_losses_are_float32_under_bf16_autocast():
    z1, z2 = (z.detach().float().bfloat16() for z in embeddings())
    for loss_fn in (barlow_twins_loss, vicreg_loss):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, terms = loss_fn(z1, z2)
        reference, _ = loss_fn(z1.float(), z2.float())
        assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


# -------------------------------------------------------------------------------------------------- LARS
def test_lars_equals_the_official_lars_with_its_exclusions():
    """optim.LARS (ndim <= 1: no decay, no adaptation) and main.py's LARS with weight_decay_filter and
    lars_adaptation_filter on, over three steps with momentum, two groups at different lrs, a parameter at
    zero (trust 1) and a large weight decay so that the decay's path is visible."""
    torch.manual_seed(0)
    shapes = [(6, 5), (6,), (3, 2, 3, 3), (4,), (5, 5)]
    ours = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        ours[4].zero_()
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]

    def groups(params):
        return [{"params": [params[0], params[2], params[4]], "lr": 0.7}, {"params": [params[1], params[3]], "lr": 0.05}]

    opt_ours = LARS(groups(ours), lr=0.0, momentum=0.9, weight_decay=0.1)
    opt_theirs = OfficialLARS(groups(theirs), lr=0.0, momentum=0.9, weight_decay=0.1, eta=0.001)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64) * 10 ** step
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert not torch.equal(ours[4], torch.zeros(5, 5))  # the zero parameter moved (trust 1 when |p| = 0)


# ------------------------------------------------------------------------------------------------ config
def test_defaults_are_the_official_ones_and_bad_options_are_named():
    barlow, vicreg = method_config("barlow_twins"), method_config("vicreg")
    assert barlow.projector == vicreg.projector == [8192, 8192, 8192]  # --projector / --mlp 8192-8192-8192
    assert barlow.lambd == 0.0051 and barlow.bias_lr_scale == pytest.approx(0.0048 / 0.2, rel=1e-12)
    assert (vicreg.sim_coeff, vicreg.std_coeff, vicreg.cov_coeff) == (25.0, 25.0, 1.0)
    with pytest.raises(ValueError, match="projector"):
        method_config("vicreg", projector=[64, 0])
    with pytest.raises(ValueError, match="projector"):
        method_config("barlow_twins", projector=[])
    with pytest.raises(ValueError, match="lambd"):
        method_config("barlow_twins", lambd=-1.0)
    with pytest.raises(ValueError, match="std_coeff"):
        method_config("vicreg", std_coeff="25")


# -------------------------------------------------------------------------------- recipes and one step
RECIPES = [f"{m}_{d}_{c}" for m in ("barlow_twins", "vicreg") for d in ("cifar10", "cifar100", "imagenet1k")
           for c in ("rcrop", "ccrop")]
STEPS_PER_EPOCH = 625  # ImageNet-1K's 1,281,167 images / 2048 (main.py: len(loader), drop_last False)


def paper(name: str) -> Recipe:
    return load_recipe(REPO / "recipes" / f"{name}.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_redundancy_recipes_carry_the_official_values(name):
    recipe = paper(name)
    method, imagenet = recipe.method.name, "imagenet1k" in name
    opts, o = recipe.method.options, recipe.optim
    assert recipe.model.name == ("resnet50" if imagenet else "resnet18_cifar")
    assert recipe.model.args["zero_init_last"] is True and recipe.model.sync_bn is True  # zero_init_residual, SyncBN
    assert opts["projector"] == [8192 if imagenet else 2048] * 3
    assert opts == {**method_config(method).__dict__, "projector": opts["projector"]}  # the other options: defaults
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.lr_scaling) == ("lars", 0.2, 0.9, 1e-6, "linear")
    assert (o.schedule, o.final_lr_ratio, o.warmup_epochs, o.per_step) == ("cosine", 0.001, 10, True)
    assert o.weight_decay_filter == "no_norm_bias"
    assert recipe.data.batch_size == (2048 if imagenet else 256) and recipe.train.epochs == 1000
    assert recipe.crop.mode == name.rsplit("_", 1)[1] and recipe.crop.heatmap_alignment == "official"
    assert (recipe.crop.warmup_epochs, recipe.crop.loc_interval) == (200, 200)  # 20% of the epochs, as the paper
    groups = recipe.view_groups(224 if imagenet else 32)
    assert sum(g.count for g in groups) == 2
    for g in groups:
        assert (g.jitter, g.jitter_p, g.gray_p, g.flip_p) == ([0.4, 0.4, 0.2, 0.1], 0.8, 0.2, 0.5)
    if imagenet:  # main.py::Transform, augmentations.py::TrainTransform
        assert [(g.scale, g.blur_p, g.solarize_p) for g in groups] == [([0.08, 1.0], 1.0, 0.0), ([0.08, 1.0], 0.1, 0.2)]
    elif method == "barlow_twins":  # solo-learn augmentations/asymmetric.yaml
        assert [(g.scale, g.blur_p, g.solarize_p) for g in groups] == [([0.08, 1.0], 0.0, 0.0), ([0.08, 1.0], 0.0, 0.2)]
    else:  # solo-learn vicreg.yaml
        assert [(g.scale, g.blur_p, g.solarize_p) for g in groups] == [([0.2, 1.0], 0.0, 0.1)]
    assert ("no published C-Crop number" in recipe.target) == name.endswith("ccrop")


@pytest.mark.parametrize("name", ["barlow_twins_imagenet1k_ccrop", "vicreg_imagenet1k_ccrop"])
def test_lr_schedule_equals_the_official_one_every_step(name):
    """optim.lr_at at position step / len(loader) (what the training loop passes), times each group's lr_scale,
    against adjust_learning_rate over the whole 1000-epoch schedule (every 97th step, and the warm-up's end)."""
    recipe = paper(name)
    base_lr = recipe.optim.lr * recipe.data.batch_size / 256  # the loop's lr_scaling: linear
    steps = sorted({*range(0, 1000 * STEPS_PER_EPOCH, 97), 6249, 6250, 6251, 1000 * STEPS_PER_EPOCH - 1})
    ours = [lr_at(recipe.optim, s / STEPS_PER_EPOCH, recipe.train.epochs, base_lr) for s in steps]
    base = 1.0 if name.startswith("barlow") else 0.2  # Barlow: x learning_rate_weights below
    theirs = [official_lr(s, STEPS_PER_EPOCH, 1000, 2048, base) * (0.2 if base == 1.0 else 1.0) for s in steps]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert ours[0] == 0.0 and max(ours) == pytest.approx(1.6)


def official_barlow_step_groups(model: nn.Module) -> list[dict]:
    """main.py::main_worker: ``param.ndim == 1`` -> param_biases, else param_weights."""
    weights = [p for p in model.parameters() if p.ndim != 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights}, {"params": biases}]


def small_method(recipe: Recipe) -> nn.Module:
    """The recipe's method and options on the tiny CIFAR-stem ResNet, with a small expander (the official
    math does not depend on its width)."""
    torch.manual_seed(0)
    options = {**recipe.method.options, "projector": [48, 48, 32]}
    return build_method(recipe.method.name, create_backbone("resnet_tiny_cifar", **recipe.model.args), **options)


def one_step_both(name: str, steps: tuple[int, ...]) -> tuple[nn.Module, nn.Module, list[float]]:
    """The project's method, optimizer and per-step schedule from recipe ``name`` (a small expander, float64),
    and the official update of an identical copy, over ``steps`` (global step indices of a 625-step epoch)."""
    recipe = paper(name)
    ours = small_method(recipe).double()
    ref = copy.deepcopy(ours)
    batch = recipe.data.batch_size  # the lr's batch; the images: 16 per step
    base_lr = recipe.optim.lr * batch / 256
    optimizer = build_optimizer(ours.param_groups(base_lr, recipe.optim.weight_decay), recipe.optim, base_lr, module=ours)
    barlow = recipe.method.name == "barlow_twins"
    official = OfficialLARS(official_barlow_step_groups(ref) if barlow else ref.parameters(), lr=0,
                            weight_decay=recipe.optim.weight_decay)
    ours.train()
    ref.train()
    lrs = []
    for i, step in enumerate(steps):
        g = torch.Generator().manual_seed(i)
        v1, v2 = (torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
        set_step_schedule(optimizer, recipe.optim, step / STEPS_PER_EPOCH, recipe.train.epochs, base_lr)
        loss, _ = ours(v1, v2)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # official: adjust_learning_rate, then forward (projector(backbone(y)) per view), LARS step
        if barlow:
            lr = official_lr(step, STEPS_PER_EPOCH, recipe.train.epochs, batch, 1.0)
            official.param_groups[0]["lr"], official.param_groups[1]["lr"] = lr * 0.2, lr * 0.0048
            official_barlow_twins_loss(ref.encoder(v1), ref.encoder(v2), 16, 0.0051).backward()
        else:
            lr = official_lr(step, STEPS_PER_EPOCH, recipe.train.epochs, batch, 0.2)
            official.param_groups[0]["lr"] = lr
            official_vicreg_loss(ref.encoder(v1), ref.encoder(v2), 16).backward()
        official.step()
        official.zero_grad(set_to_none=True)
        lrs.append(lr)
    return ours, ref, lrs


@pytest.mark.parametrize("name", ["barlow_twins_imagenet1k_ccrop", "vicreg_imagenet1k_ccrop"])
def test_one_step_equals_official(name):
    """Three LARS steps in float64, one in the warm-up and two on the cosine (the momentum buffers carry over),
    from the recipe's options, optimizer and schedule, against the official loss, LARS, param groups and
    adjust_learning_rate on an identical copy: every parameter equal."""
    ours, ref, lrs = one_step_both(name, (3 * STEPS_PER_EPOCH + 17, 400 * STEPS_PER_EPOCH, 400 * STEPS_PER_EPOCH + 1))
    assert 0 < lrs[0] < lrs[1]  # the warm-up's step is really smaller
    ref_params = dict(ref.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p, ref_params[key], rtol=1e-10, atol=1e-13, msg=key)
    init = dict(small_method(paper(name)).named_parameters())
    assert all(not torch.equal(p, init[k].double()) for k, p in ours.named_parameters())  # biases and BN moved too


def test_barlow_param_groups_and_the_bias_lr():
    """main.py's two groups: ndim == 1 (biases, BatchNorm) at 0.0048 / 0.2 of the weights' lr, via lr_scale."""
    torch.manual_seed(0)
    method = build_method("barlow_twins", create_backbone("resnet_tiny_cifar"), projector=[16, 16, 8])
    weights, biases = method.param_groups(0.4, 1e-6)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(method.parameters()))
    cfg = paper("barlow_twins_imagenet1k_rcrop").optim
    optimizer = build_optimizer([weights, biases], cfg, 0.4, module=method)
    set_step_schedule(optimizer, cfg, 500.0, 1000, 0.4)
    lrs = {len(g["params"]): g["lr"] for g in optimizer.param_groups}
    assert lrs[len(biases["params"])] == pytest.approx(lrs[len(weights["params"])] * 0.0048 / 0.2, rel=1e-12)


def test_multi_crop_averages_the_pair_losses():
    """2 global + 2 local crops: the mean of the pair loss over every global crop with every other crop."""
    torch.manual_seed(0)
    method = build_method("vicreg", create_backbone("resnet_tiny_cifar"), projector=[32, 32, 16]).double().train()
    g = torch.Generator().manual_seed(0)
    big, small = (torch.randn(2, 8, 3, s, s, generator=g, dtype=torch.float64) for s in (16, 8))
    views = Views([big, small], torch.arange(8), torch.zeros(8, dtype=torch.long))
    loss, logs = method(views)
    z = [method.encoder(c) for c in views.crops]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    expected = torch.stack([official_vicreg_loss(z[i], z[j], 8) for i, j in pairs]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    two, _ = method(big[0], big[1])
    torch.testing.assert_close(two, official_vicreg_loss(z[0], z[1], 8), rtol=1e-10, atol=0)
    assert {"invariance", "variance", "covariance", "pos_cosine"} <= set(logs)


# ------------------------------------------------------------------------------------------- 2 processes
def _rank(rank: int, port: int, workdir: str) -> None:
    """A forked process of the 2-process check (the worker's ``run`` over TCP on localhost)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    worker.run(Path(workdir), rank, 2, init_method=f"tcp://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """2 CPU processes (gloo) forked from this one run _barlow_vicreg_worker.py's checks (forking skips the
    interpreter starts and imports: seconds instead of tens); the single-process reference on the whole
    batch (float64, BatchNorm over the batch) is computed here. Returns both."""
    if not (dist.is_available() and dist.is_gloo_available()) or "fork" not in mp.get_all_start_methods():
        pytest.skip("torch.distributed with gloo and the fork start method are needed")
    workdir = tmp_path_factory.mktemp("barlow_vicreg")
    g = torch.Generator().manual_seed(1)
    inputs = {k: torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64) for k in ("v1", "v2")}
    torch.save(inputs, workdir / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    mp.start_processes(_rank, args=(port, str(workdir)), nprocs=2, start_method="fork")
    torch.set_num_threads(threads)
    reference = {}
    for name in worker.METHODS:
        method = worker.build(name).double()
        loss, logs = method(inputs["v1"], inputs["v2"])
        loss.backward()
        reference[name] = {"loss": loss.item(), "logs": {k: v.item() for k, v in logs.items()},
                           "grads": {k: p.grad.clone() for k, p in method.named_parameters()}}
    return {"reference": reference, "ranks": [torch.load(workdir / f"rank{r}.pt") for r in range(2)]}


def relative_error(grads: dict, reference: dict) -> float:
    """max over parameters of |g - ref| / |ref| (norms of the whole tensor)."""
    return max(float((grads[k] - ref).norm() / ref.norm()) for k, ref in reference.items())


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_two_processes_give_the_gradients_of_one_process_at_the_same_global_batch(two_processes, name):
    """DDP over 2 processes x 8 rows: every parameter's gradient (backbone, expander, BatchNorm) equals one
    process with the 16 rows, in float64, because the loss's reductions sum the gradients over processes."""
    reference = two_processes["reference"][name]
    ranks = [r[name] for r in two_processes["ranks"]]
    if name == "barlow_twins":  # every process computes the global loss
        assert [r["loss"] for r in ranks] == pytest.approx([reference["loss"]] * 2, rel=1e-12)
    else:  # the invariance term is each process's own rows; the mean over processes is the global loss
        assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(reference["loss"], rel=1e-12)
        assert reference["logs"]["variance"] > 0.1  # the variance term is active (its gradient is checked)
    for rank in ranks:
        assert rank["grads"].keys() == reference["grads"].keys()
        for key, grad in reference["grads"].items():
            assert grad.norm() > 0, key
            torch.testing.assert_close(rank["grads"][key], grad, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_reductions_without_backward_fail_the_two_process_check(two_processes, name):
    """The same run with a plain all_reduce / all_gather (no backward) in the loss: the gradients come out
    wrong (lightly issue 1977), so the check above catches that bug."""
    reference = two_processes["reference"][name]["grads"]
    for rank in two_processes["ranks"]:
        assert relative_error(rank[f"{name}_without_backward"]["grads"], reference) > 0.2


def test_official_barlow_twins_gradient_is_one_over_world_size(two_processes):
    """main.py's form (SyncBN standardization, then ``C`` summed with a plain all_reduce): under DDP every
    gradient is exactly 1 / world_size of the full batch's (docs/PARITY.md: why ours differs)."""
    reference = two_processes["reference"]["barlow_twins"]["grads"]
    for rank in two_processes["ranks"]:
        grads = rank["barlow_twins_official"]["grads"]
        for key, grad in reference.items():
            torch.testing.assert_close(grads[key], grad / 2, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["barlow_twins", "vicreg"])
def test_recipe_trains_on_two_processes(tmp_path, name):
    """``accelerate launch --multi_gpu --num_processes 2 -m hub_ccrop train`` of the CIFAR-10 recipe (official
    optimizer, per-step schedule, view groups, SyncBN) on a tiny small-objects set: the run splits the global
    batch, trains every step with a finite loss and writes its backbone."""
    from safetensors.torch import load_file

    from hub_ccrop.synthetic import small_objects_dir

    data = small_objects_dir(tmp_path / "data", train=64, test=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "hub_ccrop", "train", str(REPO / "recipes" / f"{name}_cifar10_rcrop.yaml"), "--output-dir", str(tmp_path / "run")]
    for item in ("model.name=resnet_tiny_cifar", "data.dataset=small_objects", f"data.data_dir={data}", "data.image_size=32",
                 "data.batch_size=32", "data.num_workers=0", "train.epochs=1", "train.knn_every=0", "train.show_images=0",
                 "train.mixed_precision=no", "method.options.projector=[64, 64, 64]"):
        cmd += ["--set", item]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 32 = 2 processes x 16" in result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    assert load_file(tmp_path / "run" / "backbone.safetensors")

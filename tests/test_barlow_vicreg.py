"""Barlow Twins and VICReg against the official code's math, in float64, and on two processes.

The ``official_*`` functions below are transcriptions of the official lines (file and function named at
each one; facebookresearch/barlowtwins ``main.py``, facebookresearch/vicreg ``main_vicreg.py``), written
in plain torch so that the tests run without a copy of the official repositories.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hub_ccrop.methods import barlow_twins_loss, method_config, off_diagonal, vicreg_loss
from hub_ccrop.methods.redundancy import crop_pairs
from hub_ccrop.optim import LARS

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


def test_crop_pairs_two_views_and_multi_crop():
    assert crop_pairs(2, 2) == [(0, 1)]
    assert crop_pairs(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # locals are never paired together
    assert crop_pairs(3, 1) == [(0, 1), (0, 2)]


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

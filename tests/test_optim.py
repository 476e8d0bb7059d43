"""The paper's LR schedule (cosine per epoch to lr * 0.1), SimSiam's fixed-lr group, and LARS."""

from __future__ import annotations

import math

import pytest
import torch

from hub_ccrop.optim import LARS, build_optimizer, lr_at_epoch, set_epoch_lr
from hub_ccrop.recipe import OptimConfig


def test_cosine_per_epoch_to_a_tenth():
    cfg = OptimConfig(lr=0.5, final_lr_ratio=0.1)
    lrs = [lr_at_epoch(cfg, e, 500, 0.5) for e in range(500)]
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[250] == pytest.approx(0.05 + 0.45 * 0.5)
    assert lrs[-1] == pytest.approx(0.05 + 0.45 * 0.5 * (1 + math.cos(math.pi * 499 / 500)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and min(lrs) > 0.05


def test_linear_warmup_then_cosine_and_constant():
    cfg = OptimConfig(lr=1.0, warmup_epochs=4, final_lr_ratio=0.0)
    assert [lr_at_epoch(cfg, e, 14, 1.0) for e in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at_epoch(cfg, 4, 14, 1.0) == pytest.approx(1.0)
    assert lr_at_epoch(OptimConfig(schedule="constant"), 99, 100, 0.3) == 0.3


def test_fixed_lr_group_keeps_its_rate():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": a.parameters()}, {"params": b.parameters(), "fix_lr": True}]
    cfg = OptimConfig(lr=0.5)
    opt = build_optimizer(groups, cfg, base_lr=0.5)
    lr = set_epoch_lr(opt, cfg, 400, 500, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    assert lr < 0.2
    assert opt.param_groups[1]["lr"] == 0.5


def test_lars_scales_steps_by_trust_ratio_and_skips_biases():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8) * 3)
    bias = torch.nn.Parameter(torch.randn(8))
    opt = LARS([w, bias], lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=0.01)
    w.grad, bias.grad = torch.randn(8, 8) * 100, torch.ones(8)
    w0, b0 = w.detach().clone(), bias.detach().clone()
    opt.step()
    step = (w0 - w.detach()).norm()
    assert step.item() == pytest.approx(0.01 * w0.norm().item(), rel=1e-5)  # |update| = trust * |w|, whatever |grad|
    assert torch.allclose(b0 - bias.detach(), torch.ones(8))  # biases: plain SGD


def test_lars_trains_a_linear_model():
    torch.manual_seed(0)
    x, w_true = torch.randn(256, 5), torch.randn(5, 1)
    y = x @ w_true
    model = torch.nn.Linear(5, 1, bias=False)  # LARS steps are trust * |w| long: a fixed fraction of w
    cfg = OptimConfig(name="lars", momentum=0.0, weight_decay=0.0)
    opt = build_optimizer([{"params": model.parameters()}], cfg, 20.0)
    first = None
    for _ in range(200):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first

"""SSL methods: losses against reference computations, gradient plumbing, configs, interface, training."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hub_ccrop.methods import (
    METHOD_DEFAULTS,
    METHODS,
    SSLMethod,
    build_method,
    byol_loss,
    info_nce_loss,
    mean_cosine,
    method_config,
    mlp_head,
    momentum_at,
    momentum_update,
    negative_cosine,
    nt_xent_loss,
)
from hub_ccrop.models import create_backbone, prepare_model
from hub_ccrop.optim import build_optimizer, set_epoch_lr
from hub_ccrop.recipe import OptimConfig

ALL_METHODS = list(METHODS)


pytestmark = pytest.mark.usefixtures("one_thread")


class FakeBackbone(nn.Module):
    """A timm-like backbone of a given feature width (flatten + linear), for head-width tests."""

    def __init__(self, num_features: int, in_features: int = 3 * 4 * 4) -> None:
        super().__init__()
        self.num_features = num_features
        self.fc = nn.Linear(in_features, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def tiny(name: str, seed: int = 0, **cfg) -> SSLMethod:
    torch.manual_seed(seed)
    if name in ("moco_v1", "moco_v2"):
        cfg.setdefault("queue_size", 64)
    if name == "dino":
        cfg.setdefault("out_dim", 256)
    if name in ("barlow_twins", "vicreg"):
        cfg.setdefault("projector", [128, 128, 128])  # the default 8192-wide expander takes minutes on a CPU
    return build_method(name, create_backbone("resnet_tiny_cifar"), **cfg)


def views(n: int = 8, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def trainable(method: nn.Module) -> set[int]:
    return {id(p) for p in method.parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ losses
def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = [float(z[i] @ z[k]) / t for k in range(n2)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n2


@pytest.mark.parametrize("temperature", [0.5, 0.2])
def test_nt_xent_matches_reference(temperature: float) -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    loss = nt_xent_loss(z1, z2, temperature)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_nt_xent(z1, z2, temperature), rel=1e-5)


def test_nt_xent_of_random_features_is_log_2n_minus_1() -> None:
    torch.manual_seed(0)
    n = 64
    z1, z2 = torch.randn(n, 4096), torch.randn(n, 4096)  # nearly orthogonal: every logit ~ 0
    assert nt_xent_loss(z1, z2, 0.5).item() == pytest.approx(math.log(2 * n - 1), abs=0.02)
    # aligned views are much better than chance
    assert nt_xent_loss(z1, z1 + 0.01 * torch.randn_like(z1), 0.5).item() < math.log(2 * n - 1) - 1.0


def reference_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j].double()) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_info_nce_with_queue_matches_reference() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(4, 6), torch.randn(4, 6)
    queue = F.normalize(torch.randn(7, 6), dim=1)
    for t in (0.07, 0.2):
        assert info_nce_loss(q, k, queue, t).item() == pytest.approx(
            reference_info_nce(q, k, queue, t), rel=1e-5
        )


def test_cosine_losses_match_reference_and_limits() -> None:
    torch.manual_seed(0)
    p, z = torch.randn(6, 5), torch.randn(6, 5)
    cos = torch.stack([torch.dot(p[i], z[i]) / (p[i].norm() * z[i].norm()) for i in range(6)])
    assert negative_cosine(p, z).item() == pytest.approx(-cos.mean().item(), abs=1e-6)
    expected_byol = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean()
    assert byol_loss(p, z).item() == pytest.approx(expected_byol.item(), abs=1e-5)
    assert mean_cosine(p, z).item() == pytest.approx(cos.mean().item(), abs=1e-6)
    # identical (or scaled) views: the minimum of each loss
    assert negative_cosine(p, 3 * p).item() == pytest.approx(-1.0, abs=1e-6)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert negative_cosine(p, -p).item() == pytest.approx(1.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-5)


def test_losses_stop_gradient_on_targets() -> None:
    torch.manual_seed(0)
    p, z = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    for loss_fn in (negative_cosine, byol_loss):
        p.grad = z.grad = None
        loss_fn(p, z).backward()
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert z.grad is None
    q, k = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    info_nce_loss(q, k, F.normalize(torch.randn(3, 5), dim=1), 0.2).backward()
    assert q.grad is not None and k.grad is None


def test_losses_are_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    queue = F.normalize(torch.randn(10, 16), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [
            nt_xent_loss(z1, z2, 0.5),
            info_nce_loss(z1, z2, queue, 0.2),
            negative_cosine(z1, z2),
            byol_loss(z1, z2),
        ]
    reference = [
        nt_xent_loss(z1.float(), z2.float(), 0.5),
        info_nce_loss(z1.float(), z2.float(), queue, 0.2),
        negative_cosine(z1.float(), z2.float()),
        byol_loss(z1.float(), z2.float()),
    ]
    for loss, ref in zip(losses, reference, strict=True):
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------- heads
def test_mlp_head_layout() -> None:
    head = mlp_head((512, 512, 512, 512), batch_norm=True, last_bn=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Linear",
        "BatchNorm1d",
    ]
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
    assert not head[-1].affine
    plain = mlp_head((512, 512, 128))
    assert [type(m).__name__ for m in plain] == ["Linear", "ReLU", "Linear"]
    assert all(m.bias is not None for m in plain if isinstance(m, nn.Linear))
    assert [type(m).__name__ for m in mlp_head((512, 128))] == ["Linear"]


def linear_dims(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("width", [512, 2048])
def test_head_widths_follow_the_backbone(width: int) -> None:
    def build(name: str, **cfg) -> nn.Module:
        return build_method(name, FakeBackbone(width), **cfg)

    assert linear_dims(build("simclr").encoder.head) == [(width, width), (width, 128)]
    assert linear_dims(build("moco_v1", queue_size=16).online.head) == [(width, 128)]
    assert linear_dims(build("moco_v2", queue_size=16).online.head) == [(width, width), (width, 128)]
    byol = build("byol")
    assert linear_dims(byol.online.head) == [(width, width), (width, 128)]
    assert linear_dims(byol.predictor) == [(128, width), (width, 128)]
    simsiam = build("simsiam")
    assert linear_dims(simsiam.encoder.head) == [(width, width)] * 3
    assert linear_dims(simsiam.predictor) == [(width, width // 4), (width // 4, width)]
    # explicit widths win
    custom = build("simsiam", hidden_dim=64, out_dim=32, pred_hidden_dim=8)
    assert linear_dims(custom.encoder.head) == [(width, 64), (64, 64), (64, 32)]
    assert linear_dims(custom.predictor) == [(32, 8), (8, 32)]


# ------------------------------------------------------------------------------------------------ config
def test_method_defaults_follow_design() -> None:
    assert METHOD_DEFAULTS["simclr"] == {"temperature": 0.5, "base_temperature": None, "hidden_dim": None, "out_dim": 128}
    v1, v2 = METHOD_DEFAULTS["moco_v1"], METHOD_DEFAULTS["moco_v2"]
    assert (v1["temperature"], v1["mlp_head"]) == (0.07, False)
    assert (v2["temperature"], v2["mlp_head"]) == (0.2, True)
    for cfg in (v1, v2):
        assert cfg["momentum"] == 0.999 and cfg["queue_size"] == 65536 and cfg["out_dim"] == 128
    assert METHOD_DEFAULTS["byol"]["momentum"] == 0.996 and METHOD_DEFAULTS["byol"]["out_dim"] == 128
    assert METHOD_DEFAULTS["simsiam"]["fix_pred_lr"] is True
    dino, v3 = METHOD_DEFAULTS["dino"], METHOD_DEFAULTS["moco_v3"]  # main_dino.py / main_moco.py defaults
    assert (dino["out_dim"], dino["momentum"], dino["student_temperature"], dino["teacher_temperature"]) == (65536, 0.996, 0.1, 0.04)
    assert (v3["out_dim"], v3["hidden_dim"], v3["momentum"], v3["temperature"]) == (256, 4096, 0.99, 1.0)
    assert set(METHOD_DEFAULTS) == {"simclr", "moco_v1", "moco_v2", "byol", "simsiam", "dino", "moco_v3", "barlow_twins",
                                    "vicreg"}


def test_unknown_option_names_the_key_and_the_accepted_ones() -> None:
    with pytest.raises(ValueError) as info:
        build_method("simclr", FakeBackbone(32), temprature=0.2)
    message = str(info.value)
    assert "'temprature'" in message and "temperature" in message and "out_dim" in message
    with pytest.raises(ValueError, match="queue_size"):
        method_config("byol", queue_size=10)


def test_unknown_method_and_bad_values() -> None:
    with pytest.raises(ValueError, match="simclr"):
        build_method("barlow", FakeBackbone(32))
    assert method_config("MoCo-v2").temperature == 0.2
    with pytest.raises(ValueError, match="temperature"):
        method_config("simclr", temperature="0.5")
    with pytest.raises(ValueError, match="temperature"):
        method_config("simclr", temperature=0.0)
    with pytest.raises(ValueError, match="queue_size"):
        method_config("moco_v2", queue_size=True)
    with pytest.raises(ValueError, match="momentum"):
        method_config("byol", momentum=1.5)
    with pytest.raises(ValueError, match="momentum_schedule"):
        method_config("byol", momentum_schedule="linear")
    assert method_config("simclr", temperature=1).temperature == 1  # ints are fine for floats


# --------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name", ALL_METHODS)
def test_interface(name: str) -> None:
    method = tiny(name)
    v1, v2 = views()
    loss, logs = method(v1, v2)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.requires_grad
    assert {"loss", "pos_cosine"} <= set(logs)
    # detached scalars left on the loss's device: the loop reads them only at log steps (no sync per step)
    assert all(v.shape == () and v.dtype == torch.float32 and not v.requires_grad and v.device == loss.device
               for v in logs.values())
    assert logs["loss"].item() == pytest.approx(loss.item())
    assert -1.0 <= logs["pos_cosine"] <= 1.0
    backbone = method.localization_encoder
    assert hasattr(backbone, "forward_features") and backbone.num_classes == 0
    assert backbone.forward_features(v1).shape == (8, 128, 2, 2)
    # param groups: every trainable parameter exactly once, no momentum target
    groups = method.param_groups(0.1, 1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == trainable(method)
    assert all(g["lr"] == 0.1 and g["weight_decay"] == 1e-4 for g in groups)
    if hasattr(method, "target"):
        assert not {id(p) for p in method.target.parameters()} & set(ids)
    # after_optimizer_step: target = m * target + (1 - m) * online for momentum methods, else nothing changes
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) if p.requires_grad else 0.0)  # online != target, as after a step
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_optimizer_step(0, 2)
    after = method.state_dict()
    if hasattr(method, "target"):
        m = method.current_momentum
        assert 0.0 < m < 1.0
        for name, t in method.target.state_dict().items():
            if t.is_floating_point() and "running" not in name:
                expected = m * before[f"target.{name}"] + (1 - m) * before[f"online.{name}"]
                torch.testing.assert_close(t, expected, msg=name)
    else:
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_simsiam_fixed_lr_predictor_group() -> None:
    method = tiny("simsiam")
    groups = method.param_groups(0.5, 1e-4)
    fixed = [g for g in groups if g.get("fix_lr")]
    assert len(fixed) == 1 and {id(p) for p in fixed[0]["params"]} == {
        id(p) for p in method.predictor.parameters()
    }
    schedule = OptimConfig(schedule="step", milestones=[1], step_factor=0.1)  # lr x 0.1 from epoch 1
    optimizer = build_optimizer(groups, schedule, base_lr=0.5)
    set_epoch_lr(optimizer, schedule, epoch=1, epochs=2, base_lr=0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.5])
    assert len(tiny("simsiam", fix_pred_lr=False).param_groups(0.5, 0.0)) == 1


@pytest.mark.parametrize("name", ALL_METHODS)
def test_bf16_autocast_forward_backward(name: str) -> None:
    method = tiny(name)
    v1, v2 = views()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = method(v1, v2)
    assert loss.dtype == torch.float32 and math.isfinite(logs["loss"])
    loss.backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_runs_with_sync_bn_and_channels_last() -> None:
    """One step with SyncBN (one process: plain BatchNorm) and channels_last equals the plain model's step."""
    reference = tiny("byol")
    method = prepare_model(tiny("byol"), sync_bn=True, channels_last=True)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in method.target.modules())
    v1, v2 = views()
    losses = []
    for model, inputs in ((reference, (v1, v2)), (method, (v.to(memory_format=torch.channels_last) for v in (v1, v2)))):
        loss, _ = model(*inputs)
        loss.backward()
        torch.optim.SGD(model.param_groups(0.1, 0.0), lr=0.1).step()
        model.after_optimizer_step(0, 10)
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    expected = reference.target.state_dict()
    for name, value in method.target.state_dict().items():  # the momentum update saw the same online step
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(expected["backbone.conv1.weight"], tiny("byol").target.state_dict()["backbone.conv1.weight"])


# ------------------------------------------------------------------------------------ gradient plumbing
def test_byol_target_is_a_copy_without_gradients() -> None:
    method = tiny("byol")
    online, target = method.online.state_dict(), method.target.state_dict()
    assert online.keys() == target.keys() and all(torch.equal(online[k], target[k]) for k in online)
    assert all(not p.requires_grad for p in method.target.parameters())
    loss, _ = method(*views())
    loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert all(p.grad is not None for p in method.online.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())


def test_moco_key_encoder_gets_no_gradient() -> None:
    method = tiny("moco_v2")
    loss, _ = method(*views())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    assert all(p.grad is not None for p in method.online.parameters())
    assert not method.queue.requires_grad


def test_simsiam_stop_gradient() -> None:
    method = tiny("simsiam")
    v1, v2 = views()
    torch.manual_seed(5)
    loss, _ = method(v1, v2)
    loss.backward()
    got = [p.grad.clone() for p in method.parameters()]

    def manual_grads(detach: bool) -> list[torch.Tensor]:
        method.zero_grad(set_to_none=True)
        z1, z2 = method.encoder(v1), method.encoder(v2)
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        cos = F.cosine_similarity
        (-0.5 * (cos(p1, t2).mean() + cos(p2, t1).mean())).backward()
        return [p.grad.clone() for p in method.parameters()]

    with_stop = manual_grads(detach=True)
    without_stop = manual_grads(detach=False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, with_stop, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, without_stop, strict=True))


def test_identical_views_give_the_minimal_loss() -> None:
    # with an identity predictor and the target equal to the online network (as at the start), identical
    # views make predictions equal to targets: the minimum of BYOL's and SimSiam's losses
    v, _ = views()
    byol = tiny("byol").eval()
    byol.predictor = nn.Identity()
    assert byol(v, v)[0].item() == pytest.approx(0.0, abs=1e-5)
    simsiam = tiny("simsiam").eval()
    simsiam.predictor = nn.Identity()
    loss, logs = simsiam(v, v)
    assert loss.item() == pytest.approx(-1.0, abs=1e-5) and logs["pos_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_momentum_schedules() -> None:
    assert momentum_at(0.0, 0.996) == momentum_at(1.0, 0.996) == 0.996
    assert momentum_at(0.0, 0.996, "cosine") == pytest.approx(0.996)
    assert momentum_at(0.5, 0.996, "cosine") == pytest.approx(0.998)
    assert momentum_at(1.0, 0.996, "cosine") == pytest.approx(1.0)
    values = [momentum_at(i / 10, 0.99, "cosine") for i in range(11)]
    assert values == sorted(values)


def perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


@pytest.mark.parametrize(
    ("name", "cfg", "step", "expected_m"),
    [  # after step `step` of 10: BYOL/MoCo at progress (step + 1) / 10, DINO at step / 10
        ("moco_v2", {}, 2, 0.999),
        ("byol", {}, 2, 0.996),
        ("byol", {"momentum_schedule": "cosine"}, 4, 0.998),
        ("byol", {"momentum_schedule": "cosine"}, 9, 1.0),
        ("dino", {}, 5, 0.998),
    ],
)
def test_momentum_update_moves_target_by_the_right_amount(name, cfg, step, expected_m) -> None:
    method = tiny(name, **cfg)
    perturb(method.online)  # as after optimizer steps
    before = [p.clone() for p in method.target.parameters()]
    buffers = [b.clone() for b in method.target.buffers()]
    method.after_optimizer_step(step, 10)
    assert method.current_momentum == pytest.approx(expected_m)
    for t0, t1, o in zip(before, method.target.parameters(), method.online.parameters(), strict=True):
        assert torch.allclose(t1, expected_m * t0 + (1 - expected_m) * o, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(buffers, method.target.buffers(), strict=True))


def test_momentum_update_helper() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [0.9 * t + 0.1 * o for t, o in zip(target.parameters(), online.parameters(), strict=True)]
    momentum_update(target, online, 0.9)
    assert all(torch.allclose(a, b) for a, b in zip(target.parameters(), expected, strict=True))
    with pytest.raises(ValueError):
        momentum_update(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 0.9)


# ------------------------------------------------------------------------------------------------- queue
def test_moco_queue_enqueues_and_dequeues() -> None:
    method = tiny("moco_v2", queue_size=10).eval()  # eval: keys depend on each image only
    initial = method.queue.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(10))
    keys = []
    for step in range(3):
        v1, v2 = views(4, seed=10 + step)
        k = F.normalize(method.target(v2), dim=1)
        q = method.online(v1)
        queue_before = method.queue.clone()
        loss, logs = method(v1, v2)
        # the loss uses the queue as it was before this batch was enqueued
        assert loss.item() == pytest.approx(info_nce_loss(q, k, queue_before, 0.2).item(), abs=1e-5)
        keys.append(k)
    assert int(method.queue_ptr) == (3 * 4) % 10
    queue = method.queue
    assert torch.allclose(queue[0:2], keys[2][2:4], atol=1e-6)  # wrapped around
    assert torch.allclose(queue[2:4], keys[0][2:4], atol=1e-6)  # oldest survivors
    assert torch.allclose(queue[4:8], keys[1], atol=1e-6)
    assert torch.allclose(queue[8:10], keys[2][0:2], atol=1e-6)


def test_moco_queue_smaller_than_batch_raises() -> None:
    method = tiny("moco_v1", queue_size=4)
    with pytest.raises(ValueError, match="queue_size"):
        method(*views(8))


def test_moco_warns_when_queue_is_longer_than_dataset() -> None:
    with pytest.warns(UserWarning, match="larger than the dataset"):
        tiny("moco_v2", queue_size=128).check_dataset_size(100)  # the training loop's call
    assert tiny("simclr").check_dataset_size(1) is True  # methods without a size requirement
    method = tiny("moco_v2", queue_size=64)
    with pytest.warns(UserWarning, match="65536|64"):
        assert method.check_dataset_size(50) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert method.check_dataset_size(50_000) is True


def test_moco_initial_queue_is_deterministic() -> None:
    a, b = tiny("moco_v2", seed=1), tiny("moco_v2", seed=2)
    assert torch.equal(a.queue, b.queue)  # same on every process without a broadcast
    assert a._ddp_params_and_buffers_to_ignore == ["queue", "queue_ptr"]


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ALL_METHODS)
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(name: str) -> None:
    # DINO's centre flattens the teacher's targets step by step (its loss rises on a fixed batch): fixed here
    method = tiny(name, **({"center_momentum": 1.0} if name == "dino" else {}))
    v1, v2 = views(16)
    optimizer = torch.optim.SGD(method.param_groups(0.05, 0.0), lr=0.05, momentum=0.9)
    initial_queue = None
    if hasattr(method, "queue"):  # negatives: keys of other images (random unit vectors are too easy)
        with torch.no_grad():
            initial_queue = F.normalize(method.target(views(64, seed=7)[0]), dim=1)
    losses = []
    for step in range(10):
        if initial_queue is not None:  # the same negatives every step: isolate the optimization
            method.queue.copy_(initial_queue)
            method.queue_ptr.zero_()
        loss, _ = method(v1, v2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step, 10)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - max(0.05 * abs(losses[0]), 0.02), losses

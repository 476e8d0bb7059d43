"""DINO against the official code (facebookresearch/dino), in float64.

The official pieces are transcribed below from the file and function named at each one (no import of
the official repository): DINOHead, DINOLoss (loss and centre update), the teacher-temperature schedule,
utils.clip_gradients / cancel_gradients_last_layer / cosine_scheduler / get_params_groups, and the
training step of main_dino.py::train_one_epoch.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hub_ccrop.methods.base import momentum_at
from hub_ccrop.methods.dino import (
    DINO,
    DINOConfig,
    DINOHead,
    cancel_last_layer_gradients,
    clip_gradients,
    dino_loss,
    teacher_temperature_at,
    update_center,
)
from hub_ccrop.optim import build_optimizer, lr_at, set_step_schedule, weight_decay_at
from hub_ccrop.recipe import Recipe, load_recipe
from hub_ccrop.views import Views

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ official, transcribed
class OfficialDINOHead(nn.Module):
    """vision_transformer.py::DINOHead (nlayers=3, use_bn=False branch and the BN branch)."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        for _ in range(nlayers - 2):
            layers.append(nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x


class OfficialDINOLoss(nn.Module):
    """main_dino.py::DINOLoss, one process (dist.all_reduce of a single process is the identity)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / (len(teacher_output) * 1)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def official_clip_gradients(model, clip):
    """utils.py::clip_gradients."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def official_cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """utils.py::cancel_gradients_last_layer."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """utils.py::cosine_scheduler."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def official_params_groups(model):
    """utils.py::get_params_groups: no weight decay on biases and 1-D parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class OfficialMultiCropWrapper(nn.Module):
    """utils.py::MultiCropWrapper: one backbone pass per run of same-resolution crops, the head on all."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        idx_crops = torch.cumsum(torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]),
                                                          return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0])
        for end_idx in idx_crops:
            output = torch.cat((output, self.backbone(torch.cat(x[start_idx:end_idx]))))
            start_idx = end_idx
        return self.head(output)


# ------------------------------------------------------------------------------------------------ head
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the official head's weight_norm
@pytest.mark.parametrize(("norm_last_layer", "use_bn"), [(True, False), (False, False), (False, True)])
def test_head_equals_the_official_head(norm_last_layer, use_bn):
    torch.manual_seed(0)
    ours = DINOHead(24, 64, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=32, bottleneck_dim=16).double()
    official = OfficialDINOHead(24, 64, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=32,
                                bottleneck_dim=16).double()
    official.load_state_dict(ours.state_dict())  # same names and shapes: official checkpoints load
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in official.named_parameters()}
    x = torch.randn(10, 24, dtype=torch.float64)
    out, ref = ours(x), official(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (out ** 2).sum().backward()
    (ref ** 2).sum().backward()
    grads = {n: p.grad for n, p in official.named_parameters()}
    for name, p in ours.named_parameters():
        assert (p.grad is None) == (grads[name] is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_head_initialization():
    """DINOHead._init_weights: trunc_normal_(std=.02) (bounds +-2 absolute: untruncated at this std) and zero
    biases in the MLP; the last layer keeps nn.Linear's default init for v, g = 1: rows of norm 1."""
    torch.manual_seed(0)
    head = DINOHead(384, 4096)
    weights = torch.cat([m.weight.flatten() for m in head.mlp if isinstance(m, nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.01)
    assert weights.abs().max() <= 2.0 and all(m.bias.abs().max() == 0 for m in head.mlp if isinstance(m, nn.Linear))
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [2048, 2048, 256]
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) of nn.Linear(256, 4096)
    v = head.last_layer.weight_v
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    assert torch.equal(head.last_layer.weight_g, torch.ones(4096, 1)) and not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(4096))


# ------------------------------------------------------------------------------------------------ loss
def crops(batch: int, dim: int, n_crops: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student outputs of every crop and teacher outputs of the 2 global crops, crop-major as the official
    MultiCropWrapper concatenates them."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n_crops * batch, dim, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(2 * batch, dim, generator=g, dtype=torch.float64) * 3
    return student, teacher


@pytest.mark.parametrize("n_local", [0, 1, 6])
def test_loss_and_centre_update_equal_the_official_over_steps(n_local):
    """Three steps over 2 global + n_local crops, epochs inside and after a teacher-temperature warm-up:
    the loss, its gradient with respect to every student output and the centre equal the official ones."""
    n_crops, batch, dim, epochs = 2 + n_local, 5, 32, 4
    config = DINOConfig(out_dim=dim, warmup_teacher_temperature=0.04, teacher_temperature=0.07,
                        warmup_teacher_temperature_epochs=3)
    official = OfficialDINOLoss(dim, n_crops, 0.04, 0.07, 3, epochs).double()
    center = torch.zeros(1, dim, dtype=torch.float64)
    for step, epoch in enumerate((0, 1, 3)):
        student, teacher = crops(batch, dim, n_crops, seed=step)
        student.requires_grad_(True)
        ours = dino_loss(student.chunk(n_crops), teacher.chunk(2), center, config.student_temperature,
                         teacher_temperature_at(epoch, config))
        update_center(center, teacher, config.center_momentum)
        (grad,) = torch.autograd.grad(ours, student)
        ref_student = student.detach().clone().requires_grad_(True)
        ref = official(ref_student, teacher, epoch)
        ref.backward()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(grad, ref_student.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(center, official.center, rtol=1e-12, atol=1e-15)
    assert center.abs().sum() > 0


def test_loss_skips_only_the_same_view():
    """Pairs (teacher i, student v) with v == i are left out: a student copying its own global crop's
    teacher gains nothing on that pair, every other pair counts."""
    dim = 8
    t = torch.randn(2, 3, dim, dtype=torch.float64)
    s = [t[0] * 0.4 / 0.04, t[1] * 0.4 / 0.04, torch.zeros(3, dim, dtype=torch.float64)]
    center = torch.zeros(1, dim, dtype=torch.float64)
    loss = dino_loss(s, list(t), center, 0.1, 0.04)
    q = [F.softmax(ti / 0.04, dim=-1) for ti in t]
    ce = [[-(q[i] * F.log_softmax(s[v] / 0.1, dim=-1)).sum(-1).mean() for v in range(3)] for i in range(2)]
    assert loss.item() == pytest.approx(float((ce[0][1] + ce[0][2] + ce[1][0] + ce[1][2]) / 4), rel=1e-12)


def test_teacher_temperature_schedule_equals_the_official_one():
    for warm, final, warm_epochs, epochs in ((0.04, 0.07, 30, 300), (0.04, 0.04, 0, 100), (0.02, 0.05, 1, 5)):
        config = DINOConfig(warmup_teacher_temperature=warm, teacher_temperature=final,
                            warmup_teacher_temperature_epochs=warm_epochs)
        official = OfficialDINOLoss(4, 2, warm, final, warm_epochs, epochs).teacher_temp_schedule
        ours = [teacher_temperature_at(e, config) for e in range(epochs)]
        assert ours == pytest.approx(official.tolist(), rel=1e-15, abs=0)


def test_loss_under_bf16_autocast_is_float32():
    student, teacher = crops(4, 16, 4, seed=0)
    center = torch.zeros(1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss([s.bfloat16() for s in student.chunk(4)], [t.bfloat16() for t in teacher.chunk(2)],
                         center, 0.1, 0.04)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


# ------------------------------------------------------------------------------------ gradient handling
def test_clipping_and_last_layer_cancelling_equal_the_official_ones():
    torch.manual_seed(0)
    model = nn.ModuleDict({"backbone": nn.Linear(6, 8), "head": DINOHead(8, 16, norm_last_layer=False,
                                                                           hidden_dim=12, bottleneck_dim=4)}).double()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    for m in (model, ref):
        (m["head"](m["backbone"](x)).pow(2).sum() * 0.1).backward()
    norms = clip_gradients(model.parameters(), 3.0)
    ref_norms = official_clip_gradients(ref, 3.0)
    assert [n.item() for n in norms] == pytest.approx(ref_norms, rel=1e-12)
    assert min(ref_norms) < 3.0 < max(ref_norms)  # some clipped, some left alone
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, msg=name)
    cancel_last_layer_gradients(model["head"])
    official_cancel_gradients_last_layer(0, ref, freeze_last_layer=1)
    assert [n for n, p in model.named_parameters() if p.grad is None] == \
        [n for n, p in ref.named_parameters() if p.grad is None] == ["head.last_layer.weight_v", "head.last_layer.weight_g"]


def test_ema_momentum_equals_the_official_cosine_scheduler():
    """main_dino.py: momentum_schedule = cosine_scheduler(0.996, 1, epochs, niter); step ``it`` updates the
    teacher with momentum_schedule[it] = momentum_at(it / total)."""
    epochs, niter = 7, 13
    official = official_cosine_scheduler(0.996, 1, epochs, niter)
    ours = [momentum_at(it / (epochs * niter), 0.996, "cosine") for it in range(epochs * niter)]
    assert ours == pytest.approx(official.tolist(), rel=1e-15, abs=1e-15)


# ---------------------------------------------------------------------------------------- training step
def tiny_vit(drop_path_rate: float = 0.0) -> VisionTransformer:
    """A 2-block ViT on 16 px global / 8 px local crops (position embedding resampled per size)."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=0,
                             dynamic_img_size=True, drop_path_rate=drop_path_rate)


def multi_crop(seed: int, batch: int = 4, n_local: int = 4) -> Views:
    """2 global crops of 16 px and ``n_local`` local crops of 8 px per image."""
    g = torch.Generator().manual_seed(seed)
    return Views.of(*torch.randn(2, batch, 3, 16, 16, generator=g, dtype=torch.float64),
                    *torch.randn(n_local, batch, 3, 8, 8, generator=g, dtype=torch.float64))


TINY_HEAD = ("method.options.out_dim=64", "method.options.hidden_dim=32", "method.options.bottleneck_dim=16")


def paper(name: str, *overrides: str) -> Recipe:
    return load_recipe(REPO / "recipes" / f"{name}.yaml", list(overrides))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_training_steps_equal_the_official_ones():
    """Four steps over two epochs with the ViT-S recipe's optimizer (AdamW from optim.py, no decay on biases
    and norms, per-step cosine lr and weight decay 0.04 -> 0.4; warm-up off here, see the schedule test),
    the last layer frozen in the first epoch, the teacher temperature warming up, clipping at 3.0 and the
    EMA per step: the student, the teacher and the centre equal main_dino.py::train_one_epoch's."""
    epochs, niter, batch = 2, 2, 4
    recipe = paper("dino_vit_small_imagenet1k_rcrop", "train.epochs=2", "optim.warmup_epochs=0",
                   f"data.batch_size={batch}", "method.options.warmup_teacher_temperature_epochs=2", *TINY_HEAD)
    config = DINOConfig(**recipe.method.options)
    method = DINO(tiny_vit(), config).double()
    student = OfficialMultiCropWrapper(copy.deepcopy(method.online.backbone),
                                       OfficialDINOHead(24, 64, norm_last_layer=False, hidden_dim=32, bottleneck_dim=16))
    teacher = OfficialMultiCropWrapper(copy.deepcopy(method.target.backbone),
                                       OfficialDINOHead(24, 64, hidden_dim=32, bottleneck_dim=16))
    student.head.load_state_dict(method.online.head.state_dict())
    teacher.head.load_state_dict(method.target.head.state_dict())
    student, teacher = student.double(), teacher.double().requires_grad_(False)
    official_loss = OfficialDINOLoss(64, 6, 0.04, 0.07, 2, epochs).double()
    base_lr = recipe.optim.lr * batch / 256  # optim.lr_scaling: linear, as the training loop applies it
    lr_schedule = official_cosine_scheduler(base_lr, base_lr * recipe.optim.final_lr_ratio, epochs, niter)
    wd_schedule = official_cosine_scheduler(0.04, 0.4, epochs, niter)
    momentum_schedule = official_cosine_scheduler(0.996, 1, epochs, niter)
    ref_opt = torch.optim.AdamW(official_params_groups(student))
    our_opt = build_optimizer(method.param_groups(base_lr, recipe.optim.weight_decay), recipe.optim, base_lr, module=method)

    for it in range(epochs * niter):
        epoch, views = it // niter, multi_crop(seed=it)
        images = views.crops
        # main_dino.py::train_one_epoch
        for i, param_group in enumerate(ref_opt.param_groups):
            param_group["lr"] = lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = wd_schedule[it]
        teacher_output = teacher(images[:2])
        loss = official_loss(student(images), teacher_output, epoch)
        ref_opt.zero_grad()
        loss.backward()
        official_clip_gradients(student, 3.0)
        official_cancel_gradients_last_layer(epoch, student, 1)
        ref_opt.step()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        # the project's method and optimizer, as the training loop drives them
        if it % niter == 0:
            method.start_epoch(epoch, epochs)
        set_step_schedule(our_opt, recipe.optim, it / niter, epochs, base_lr)
        ours, logs = method(views)
        our_opt.zero_grad()
        ours.backward()
        method.before_optimizer_step()
        assert (method.online.head.last_layer.weight_v.grad is None) == (epoch == 0)
        our_opt.step()
        method.after_optimizer_step(it, epochs * niter)  # the loop's call: the teacher takes momentum_schedule[it]
        assert ours.item() == pytest.approx(loss.item(), rel=1e-10)
        assert logs["loss"].item() == pytest.approx(loss.item(), rel=1e-6)  # logs are float32
    assert [g["weight_decay"] for g in our_opt.param_groups] == [wd_schedule[-1], 0.0]

    # atol: the key bias has a zero gradient in exact arithmetic; Adam turns its ~1e-17 rounding noise into
    # ~1e-12 steps (on both sides, differently), so those entries sit near 0 at different 1e-12 values
    for ours_net, ref_net in ((method.online, student), (method.target, teacher)):
        ref = dict(ref_net.named_parameters())
        for name, p in ours_net.named_parameters():
            torch.testing.assert_close(p, ref[name], rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(method.center, official_loss.center, rtol=1e-10, atol=1e-14)
    assert method.teacher_temperature == official_loss.teacher_temp_schedule[1]


def test_teacher_has_no_stochastic_depth_and_gives_the_boxes():
    method = DINO(tiny_vit(drop_path_rate=0.1), DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16))
    assert any(isinstance(m, DropPath) for m in method.online.modules())
    assert not any(isinstance(m, DropPath) for m in method.target.modules())
    assert method.online.state_dict().keys() == method.target.state_dict().keys()
    assert method.localization_encoder is method.target.backbone
    assert all(not p.requires_grad for p in method.target.parameters())
    groups = method.param_groups(0.1, 0.0)
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert id(method.online.head.last_layer.weight_g) not in trainable  # norm_last_layer (the default)
    # the teacher stays the student's EMA: a forward in training mode is deterministic for it
    x = multi_crop(seed=0).groups[0].flatten(0, 1).float()
    with torch.no_grad():
        torch.testing.assert_close(method.target(x), method.target(x))


def test_options_are_checked():
    with pytest.raises(ValueError, match="center_momentum"):
        DINOConfig(center_momentum=1.5)
    with pytest.raises(ValueError, match="student_temperature"):
        DINOConfig(student_temperature=0.0)
    with pytest.raises(ValueError, match="freeze_last_layer"):
        DINOConfig(freeze_last_layer=-1)


# ----------------------------------------------------------------------------------------------- recipes
# The official settings, transcribed from main_dino.py's argument defaults and the README commands named.
DINO_DEFAULTS = dict(out_dim=65536, use_bn_in_head=False, momentum_teacher=0.996, warmup_teacher_temp=0.04,
                     clip_grad=3.0, batch_size_per_gpu=64, freeze_last_layer=1, lr=0.0005, warmup_epochs=10,
                     min_lr=1e-6, local_crops_number=8, drop_path_rate=0.1, student_temp=0.1, center_momentum=0.9)
OFFICIAL = {
    # README "Boosting DINO performance", full command: run_with_submitit.py (--nodes 2 --ngpus 8 defaults)
    "dino_vit_small_imagenet1k": dict(DINO_DEFAULTS, arch="vit_small", patch_size=16, gpus=16, epochs=300,
                                      teacher_temp=0.07, warmup_teacher_temp_epochs=30, norm_last_layer=False,
                                      optimizer="adamw", weight_decay=0.04, weight_decay_end=0.4,
                                      global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4)),
    # README "ResNet-50 and other convnets trainings": 8 GPUs, defaults otherwise
    "dino_resnet50_imagenet1k": dict(DINO_DEFAULTS, arch="resnet50", gpus=8, epochs=100, teacher_temp=0.04,
                                     warmup_teacher_temp_epochs=0, norm_last_layer=True, optimizer="sgd", lr=0.03,
                                     weight_decay=1e-4, weight_decay_end=1e-4, global_crops_scale=(0.14, 1.0),
                                     local_crops_scale=(0.05, 0.14)),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("crop", ["ccrop", "rcrop"])
def test_recipe_settings_equal_the_official_ones(name, crop):
    official, recipe = OFFICIAL[name], paper(f"{name}_{crop}")
    opts = DINOConfig(**recipe.method.options)
    assert recipe.method.name == "dino" and recipe.crop.mode == crop
    assert (opts.out_dim, opts.use_bn_in_head, opts.norm_last_layer, opts.momentum) == (
        official["out_dim"], official["use_bn_in_head"], official["norm_last_layer"], official["momentum_teacher"])
    assert (opts.warmup_teacher_temperature, opts.teacher_temperature, opts.warmup_teacher_temperature_epochs) == (
        official["warmup_teacher_temp"], official["teacher_temp"], official["warmup_teacher_temp_epochs"])
    assert (opts.student_temperature, opts.center_momentum, opts.clip_grad, opts.freeze_last_layer) == (
        official["student_temp"], official["center_momentum"], official["clip_grad"], official["freeze_last_layer"])
    assert (opts.hidden_dim, opts.bottleneck_dim, opts.global_crops) == (2048, 256, 2)  # DINOHead, images[:2]
    o = recipe.optim
    assert recipe.data.batch_size == official["batch_size_per_gpu"] * official["gpus"]
    assert (o.name, o.lr, o.lr_scaling, o.warmup_epochs, o.per_step) == (
        official["optimizer"], official["lr"], "linear", official["warmup_epochs"], True)
    base_lr = o.lr * recipe.data.batch_size / 256
    assert base_lr * o.final_lr_ratio == pytest.approx(official["min_lr"], rel=1e-12)
    assert o.weight_decay == official["weight_decay"]
    assert (o.weight_decay_end or o.weight_decay) == official["weight_decay_end"]
    assert o.weight_decay_filter == "no_norm_bias"  # utils.get_params_groups
    if o.name == "sgd":
        assert o.momentum == 0.9  # torch.optim.SGD(params_groups, lr=0, momentum=0.9)
    else:
        assert o.betas == [0.9, 0.999]  # torch.optim.AdamW's defaults
    assert recipe.train.epochs == official["epochs"]
    # DataAugmentationDINO: 2 global crops at 224 (blur p 1.0; blur p 0.1 + solarization 0.2), locals at 96
    groups = recipe.view_groups(224, dataset_blur=True)
    assert [(g.count, g.size, tuple(g.scale), g.blur_p, g.solarize_p) for g in groups] == [
        (1, 224, official["global_crops_scale"], 1.0, 0.0), (1, 224, official["global_crops_scale"], 0.1, 0.2),
        (official["local_crops_number"], 96, official["local_crops_scale"], 0.5, 0.0)]
    for g in groups:  # flip_and_color_jitter
        assert (g.flip_p, g.jitter, g.jitter_p, g.gray_p, tuple(g.ratio)) == (
            0.5, [0.4, 0.4, 0.2, 0.1], 0.8, 0.2, (3 / 4, 4 / 3))
    if official["arch"] == "resnet50":
        assert recipe.model.name == "resnet50" and recipe.model.sync_bn  # has_batchnorms -> SyncBatchNorm
        assert recipe.model.args["zero_init_last"] is False  # torchvision's resnet50 default
    else:
        assert recipe.model.name == "vit_small_patch16_224"
        assert recipe.model.args == {"drop_path_rate": official["drop_path_rate"], "dynamic_img_size": True}


def test_timm_vit_small_is_dinos_vit_small():
    """vision_transformer.py::vit_small: patch 16, width 384, depth 12, 6 heads, MLP ratio 4, qkv bias,
    LayerNorm eps 1e-6, the class token's final-norm output as the feature."""
    recipe = paper("dino_vit_small_imagenet1k_ccrop")
    vit = timm.create_model(recipe.model.name, num_classes=0, **recipe.model.args)
    assert (vit.patch_embed.patch_size, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == ((16, 16), 384, 12, 6)
    assert vit.blocks[0].mlp.fc1.out_features == 4 * 384 and vit.blocks[0].attn.qkv.bias is not None
    assert vit.norm.eps == 1e-6 and vit.global_pool == "token"
    assert [round(b.drop_path1.drop_prob, 6) if isinstance(b.drop_path1, DropPath) else 0.0 for b in vit.blocks] == [
        round(x, 6) for x in torch.linspace(0, 0.1, 12).tolist()]  # drop_path_rate 0.1, linear over depth


@pytest.mark.parametrize("name", ["dino_vit_small_imagenet1k_ccrop", "dino_resnet50_imagenet1k_ccrop"])
def test_lr_and_weight_decay_follow_the_official_schedules_every_step(name):
    """utils.cosine_scheduler, evaluated by the training loop at epoch + step / steps: after the warm-up the
    lr and, always, the weight decay equal the official values; the warm-up differs by less than one step
    of it (np.linspace(0, lr, W) reaches lr at step W - 1, ours at step W)."""
    recipe, niter = paper(name), 7
    o, epochs = recipe.optim, recipe.train.epochs
    base_lr = o.lr * recipe.data.batch_size / 256
    lr = official_cosine_scheduler(base_lr, base_lr * o.final_lr_ratio, epochs, niter, warmup_epochs=o.warmup_epochs)
    wd = official_cosine_scheduler(o.weight_decay, o.weight_decay_end or o.weight_decay, epochs, niter)
    ours_lr = np.array([lr_at(o, it / niter, epochs, base_lr) for it in range(epochs * niter)])
    ours_wd = np.array([weight_decay_at(o, it / niter, epochs) for it in range(epochs * niter)])
    warm = o.warmup_epochs * niter
    np.testing.assert_allclose(ours_lr[warm:], lr[warm:], rtol=1e-12, atol=0)
    assert np.abs(ours_lr[:warm] - lr[:warm]).max() <= base_lr / warm * (1 + 1e-9)  # reached at the last warm-up step
    np.testing.assert_allclose(ours_wd, wd, rtol=1e-12, atol=0)


def test_teacher_update_after_step_it_takes_momentum_schedule_it():
    """main_dino.py updates the teacher after step ``it`` with momentum_schedule[it]; the loop's
    after_optimizer_step(it, total) gives DINO exactly that (BYOL and MoCo v3 take the next point, theirs)."""
    epochs, niter = 3, 5
    official = official_cosine_scheduler(0.996, 1, epochs, niter)
    method = DINO(tiny_vit(), DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, global_crops=2))
    for it in range(epochs * niter):
        method.after_optimizer_step(it, epochs * niter)
        assert method.current_momentum == pytest.approx(float(official[it]), rel=1e-15, abs=1e-15)


def test_too_few_crops_is_one_clear_error():
    method = DINO(tiny_vit(), DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, global_crops=2))
    with pytest.raises(ValueError, match=r"first 2 crops .* has 1 \(views: \[1\]\): add crops to the recipe's views"):
        method(torch.randn(2, 3, 16, 16))

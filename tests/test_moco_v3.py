"""MoCo v3 against the official code (facebookresearch/moco-v3), in float64.

The official pieces are transcribed below from the file and function named at each one (no import of
the official repository): VisionTransformerMoCo's construction (vits.py), MoCo._build_mlp,
contrastive_loss and forward (moco/builder.py), LARS (moco/optimizer.py), adjust_learning_rate and
adjust_moco_momentum (main_moco.py). The last test runs DINO and MoCo v3 in two processes (gloo) and
compares them with one process at the same global batch.
"""

from __future__ import annotations

import copy
import math
from functools import reduce
from operator import mul
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hub_ccrop.methods.base import momentum_at
from hub_ccrop.methods.moco_v3 import MoCoV3, MoCoV3Config, init_mocov3_vit, mocov3_loss, mocov3_mlp
from hub_ccrop.models import create_backbone
from hub_ccrop.optim import LARS, build_optimizer, lr_at, set_step_schedule
from hub_ccrop.recipe import Recipe, load_recipe
from hub_ccrop.views import Views

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def paper(name: str, *overrides: str) -> Recipe:
    return load_recipe(REPO / "recipes" / f"{name}.yaml", list(overrides))


# ------------------------------------------------------------------------------ official, transcribed
class OfficialVisionTransformerMoCo(VisionTransformer):
    """vits.py::VisionTransformerMoCo on today's timm VisionTransformer (``num_tokens`` is timm 1.x's
    ``num_prefix_tokens``; meshgrid's default indexing written out)."""

    def __init__(self, stop_grad_conv1=False, **kwargs):
        super().__init__(**kwargs)
        self.build_2d_sincos_position_embedding()
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.patch_embed, PatchEmbed):
            val = math.sqrt(6.0 / float(3 * reduce(mul, self.patch_embed.patch_size, 1) + self.embed_dim))
            nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
            nn.init.zeros_(self.patch_embed.proj.bias)
            if stop_grad_conv1:
                self.patch_embed.proj.weight.requires_grad = False
                self.patch_embed.proj.bias.requires_grad = False

    def build_2d_sincos_position_embedding(self, temperature=10000.0):
        h, w = self.patch_embed.grid_size
        grid_w = torch.arange(w, dtype=torch.float32)
        grid_h = torch.arange(h, dtype=torch.float32)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
        pos_dim = self.embed_dim // 4
        omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
        omega = 1.0 / (temperature ** omega)
        out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
        out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
        pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None, :, :]
        assert self.num_prefix_tokens == 1
        pe_token = torch.zeros([1, 1, self.embed_dim], dtype=torch.float32)
        self.pos_embed = nn.Parameter(torch.cat([pe_token, pos_emb], dim=1))
        self.pos_embed.requires_grad = False


def official_build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """moco/builder.py::MoCo._build_mlp."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def official_contrastive_loss(q, k, T):
    """moco/builder.py::MoCo.contrastive_loss, one process (concat_all_gather is the identity, rank 0)."""
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", [q, k]) / T
    N = logits.shape[0]
    labels = torch.arange(N, dtype=torch.long) + N * 0
    return nn.CrossEntropyLoss()(logits, labels) * (2 * T)


class OfficialLARS(torch.optim.Optimizer):
    """moco/optimizer.py::LARS."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, (g["trust_coefficient"]
                                                                                     * param_norm / update_norm), one), one)
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def official_lr(epoch, lr, warmup_epochs, epochs):
    """main_moco.py::adjust_learning_rate (``epoch`` fractional: epoch + i / iters_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def official_momentum(epoch, moco_m, epochs):
    """main_moco.py::adjust_moco_momentum."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


# ---------------------------------------------------------------------------------------------- the ViT
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True, num_classes=0)


def test_vit_construction_equals_the_official_one():
    """Same seed, same timm model: init_mocov3_vit draws what VisionTransformerMoCo.__init__ draws, in the
    same order, so every tensor is equal; the position embedding is the official sin-cos table."""
    torch.manual_seed(0)
    official = OfficialVisionTransformerMoCo(stop_grad_conv1=True, **VIT)
    torch.manual_seed(0)
    ours = init_mocov3_vit(VisionTransformer(**VIT), stop_grad_conv1=True)
    ref = official.state_dict()
    assert ours.state_dict().keys() == ref.keys()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, ref[name]), name
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in official.named_parameters()}
    assert [n for n, p in ours.named_parameters() if not p.requires_grad] == [
        "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    # the ViT-S/16 table at 224 px: rows [0, sin(r w), cos(r w), sin(c w), cos(c w)]
    small = init_mocov3_vit(VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=1, num_heads=12))
    torch.manual_seed(0)
    assert torch.equal(small.pos_embed, OfficialVisionTransformerMoCo(img_size=224, patch_size=16, embed_dim=384,
                                                                      depth=1, num_heads=12).pos_embed)
    omega = 1.0 / 10000 ** (torch.arange(96) / 96)
    r, c = 3, 11  # token 1 + 14 r + c
    expected = torch.cat([torch.sin(r * omega), torch.cos(r * omega), torch.sin(c * omega), torch.cos(c * omega)])
    torch.testing.assert_close(small.pos_embed[0, 1 + 14 * r + c], expected)
    assert small.pos_embed[0, 0].abs().sum() == 0


def test_vit_init_distributions():
    torch.manual_seed(0)
    vit = init_mocov3_vit(VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=2, num_heads=12))
    qkv = vit.blocks[0].attn.qkv.weight  # [3 * 384, 384]: q, k, v as three 384 x 384 xavier matrices
    assert qkv.abs().max() <= math.sqrt(6 / 768) and qkv.abs().max() > 0.99 * math.sqrt(6 / 768)
    fc1 = vit.blocks[0].mlp.fc1.weight  # [1536, 384]
    assert fc1.abs().max() <= math.sqrt(6 / (1536 + 384)) and fc1.abs().max() > 0.99 * math.sqrt(6 / 1920)
    patch = vit.patch_embed.proj.weight
    assert patch.abs().max() <= math.sqrt(6 / (3 * 256 + 384)) and patch.abs().max() > 0.99 * math.sqrt(6 / 1152)
    assert all(m.bias.abs().max() == 0 for m in vit.modules() if isinstance(m, nn.Linear))
    assert vit.cls_token.std().item() == pytest.approx(1e-6, rel=0.2)


def test_moco_vit_exports_load_with_plain_timm():
    """The trained backbone is timm's architecture with its own arguments (num_heads 12 for MoCo v3's
    ViT-S): a fresh plain timm model loads its state dict (strict) and computes the same features."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch16_224", num_heads=12, img_size=64, depth=1)
    method = MoCoV3(backbone, MoCoV3Config(hidden_dim=32, out_dim=16, temperature=0.2))
    assert not method.online.backbone.patch_embed.proj.weight.requires_grad
    plain = timm.create_model("vit_small_patch16_224", num_heads=12, img_size=64, depth=1, num_classes=0).eval()
    plain.load_state_dict(method.localization_encoder.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(plain(x), method.localization_encoder.eval()(x))


# ----------------------------------------------------------------------------------------- heads, loss
@pytest.mark.parametrize(("num_layers", "last_bn"), [(3, True), (2, True), (2, False)])
def test_mlps_equal_the_official_build_mlp(num_layers, last_bn):
    torch.manual_seed(0)
    ours = mocov3_mlp(num_layers, 12, 20, 8, last_bn=last_bn).double()
    torch.manual_seed(0)
    official = official_build_mlp(num_layers, 12, 20, 8, last_bn).double()
    assert [type(m) for m in ours] == [type(m) for m in official]
    ref = official.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in ours.state_dict().items()) and ours.state_dict().keys() == ref.keys()
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(ours(x), official(x), rtol=0, atol=0)


def test_heads_follow_the_backbone_as_in_the_official_builders():
    """MoCo_ViT: 3-layer projector, predictor with the last BN; MoCo_ResNet: 2 layers, predictor without it."""
    vit = MoCoV3(VisionTransformer(**VIT), MoCoV3Config(hidden_dim=32, out_dim=16))
    resnet = MoCoV3(create_backbone("resnet_tiny_cifar"), MoCoV3Config(hidden_dim=32, out_dim=16))
    linears = lambda m: [(x.in_features, x.out_features) for x in m if isinstance(x, nn.Linear)]  # noqa: E731
    assert linears(vit.online.head) == [(48, 32), (32, 32), (32, 16)] and linears(resnet.online.head) == [(128, 32), (32, 16)]
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d) and not vit.predictor[-1].affine
    assert isinstance(resnet.predictor[-1], nn.Linear) and resnet.predictor[-1].bias is None
    assert vit.localization_encoder is vit.target.backbone


def test_loss_equals_the_official_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    for t in (0.2, 1.0):
        q = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
        ours = mocov3_loss(q, k, t)
        (grad,) = torch.autograd.grad(ours, q)
        ref_q = q.detach().clone().requires_grad_(True)
        ref = official_contrastive_loss(ref_q, k.detach(), t)
        ref.backward()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-13)
        torch.testing.assert_close(grad, ref_q.grad, rtol=1e-12, atol=1e-15)
        assert ours.grad_fn is not None and k.grad is None


def test_momentum_schedule_equals_adjust_moco_momentum():
    """main_moco.py updates the momentum encoder at the start of iteration ``it`` with
    adjust_moco_momentum(it / iters); the loop calls after_optimizer_step(it - 1, total) after the step
    before it, which takes the schedule at it / total: the same momentum for the same update."""
    epochs, iters = 5, 7
    for it in range(1, epochs * iters):
        official = official_momentum(it / iters, 0.99, epochs)
        assert momentum_at(it / (epochs * iters), 0.99, "cosine") == pytest.approx(official, rel=1e-15)


# ---------------------------------------------------------------------------------------- training step
def two_views(seed: int, n: int = 8, size: int = 16) -> Views:
    g = torch.Generator().manual_seed(seed)
    return Views.of(*(torch.randn(n, 3, size, size, generator=g, dtype=torch.float64) for _ in range(2)))


def official_steps(base, momentum_encoder, predictor, optimizer, batches, *, lr, warmup, epochs, iters, moco_m, t):
    """main_moco.py::train with moco/builder.py::MoCo.forward, one process."""
    for it, views in enumerate(batches):
        epoch = it // iters
        for group in optimizer.param_groups:
            group["lr"] = official_lr(epoch + (it % iters) / iters, lr, warmup, epochs)
        m = official_momentum(epoch + (it % iters) / iters, moco_m, epochs)
        x1, x2 = views.crops
        q1, q2 = predictor(base(x1)), predictor(base(x2))
        with torch.no_grad():
            for param_b, param_m in zip(base.parameters(), momentum_encoder.parameters(), strict=True):
                param_m.data = param_m.data * m + param_b.data * (1.0 - m)
            k1, k2 = momentum_encoder(x1), momentum_encoder(x2)
        loss = official_contrastive_loss(q1, k2, t) + official_contrastive_loss(q2, k1, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def project_steps(method, optimizer, recipe, batches, *, base_lr, iters):
    """The method and the recipe's optimizer as the training loop drives them (per-step schedule)."""
    epochs = recipe.train.epochs
    for it, views in enumerate(batches):
        set_step_schedule(optimizer, recipe.optim, it / iters, epochs, base_lr)
        loss, _ = method(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(it, epochs * iters)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_training_steps_equal_the_official_ones(arch):
    """Four steps with the ImageNet recipe's method options and optimizer (optim.py): the ViT with AdamW (wd
    0.1 on every parameter, the frozen patch projection untouched), the ResNet with LARS; warm-up then
    cosine lr per step, cosine momentum: every parameter and BN statistic equals the official training's."""
    name = f"mocov3_{'vit_small' if arch == 'vit' else 'resnet50'}_imagenet1k_rcrop"
    recipe = paper(name, "train.epochs=2", "optim.warmup_epochs=1", "data.batch_size=8",
                   "method.options.hidden_dim=32", "method.options.out_dim=16")
    torch.manual_seed(0)
    if arch == "vit":
        backbone = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=0)
    else:
        backbone = create_backbone("resnet_tiny_cifar")
    config = MoCoV3Config(**recipe.method.options)
    method = MoCoV3(backbone, config).double()
    base, momentum_encoder, predictor = (copy.deepcopy(m) for m in (method.online, method.target, method.predictor))
    o = recipe.optim
    base_lr = o.lr * recipe.data.batch_size / 256
    if arch == "vit":  # main_moco.py: AdamW(model.parameters(), lr, weight_decay)
        ref_opt = torch.optim.AdamW([*base.parameters(), *predictor.parameters()], base_lr, weight_decay=o.weight_decay)
    else:  # moco.optimizer.LARS(model.parameters(), lr, weight_decay, momentum)
        ref_opt = OfficialLARS([*base.parameters(), *predictor.parameters()], base_lr, weight_decay=o.weight_decay,
                               momentum=o.momentum)
    our_opt = build_optimizer(method.param_groups(base_lr, o.weight_decay), o, base_lr, module=method)
    assert isinstance(our_opt, torch.optim.AdamW if arch == "vit" else LARS)
    batches = [two_views(seed) for seed in range(4)]
    initial = copy.deepcopy(method.online.state_dict())
    official_steps(base, momentum_encoder, predictor, ref_opt, batches, lr=base_lr, warmup=1, epochs=2, iters=2,
                   moco_m=0.99, t=config.temperature)
    project_steps(method, our_opt, recipe, batches, base_lr=base_lr, iters=2)
    for ours, ref in ((method.online, base), (method.target, momentum_encoder), (method.predictor, predictor)):
        theirs = ref.state_dict()
        for name, value in ours.state_dict().items():
            torch.testing.assert_close(value, theirs[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")
    frozen = {f"backbone.{n}" for n, p in method.online.backbone.named_parameters() if not p.requires_grad}
    for name, p in method.online.named_parameters():
        assert torch.equal(p, initial[name]) == (name in frozen), name  # trained, except the frozen ones
    assert frozen == ({"backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"}
                      if arch == "vit" else set())


# ------------------------------------------------------------------------------------------ 2 processes
def _tiny_methods() -> dict[str, nn.Module]:
    """DINO and MoCo v3 on a 2-block ViT, float64, the same weights in every process."""
    from hub_ccrop.methods.dino import DINO, DINOConfig

    def vit():
        return VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=0,
                                 dynamic_img_size=True)

    torch.manual_seed(0)
    dino = DINO(vit(), DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)).double()
    mocov3 = MoCoV3(vit(), MoCoV3Config(hidden_dim=32, out_dim=16, temperature=0.2)).double()
    return {"dino": dino, "mocov3": mocov3}


def _global_batch() -> dict[str, Views]:
    g = torch.Generator().manual_seed(7)
    dino = Views.of(*torch.randn(2, 8, 3, 16, 16, generator=g, dtype=torch.float64),
                    *torch.randn(3, 8, 3, 8, 8, generator=g, dtype=torch.float64))
    return {"dino": dino, "mocov3": Views.of(*torch.randn(2, 8, 3, 16, 16, generator=g, dtype=torch.float64))}


def _shard(views: Views, rank: int, world: int) -> Views:
    part = slice(rank * views.batch_size // world, (rank + 1) * views.batch_size // world)
    return Views([g[:, part] for g in views.groups], views.ids[part], views.labels[part])


def _step(method: nn.Module, views: Views) -> dict:
    """One forward/backward; with several processes the gradients are averaged over them (DDP's reduction)."""
    import torch.distributed as dist

    from hub_ccrop.distributed import get_world_size

    loss, _ = method(views)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    for grad in grads.values():
        if get_world_size() > 1:
            dist.all_reduce(grad)
            grad /= get_world_size()
    return {"loss": loss.detach(), "grads": grads, "center": getattr(method, "center", torch.zeros(())).clone()}


def _two_process_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from hub_ccrop.models import prepare_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results, batch = {}, _global_batch()
        for name, method in _tiny_methods().items():
            method = prepare_model(method, sync_bn=True, device_type="cpu").double()  # main_moco.py: SyncBN
            results[name] = _step(method, _shard(batch[name], rank, world))
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters: ~15 s on a busy 2-core machine
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    """Global batch 8 as 2 x 4 (gloo; SyncBN in the MoCo v3 heads, as main_moco.py): the mean of the
    per-process losses, the process-averaged gradients and DINO's all-reduced centre equal one process on
    the 8 images; MoCo v3's keys come from both processes (with local keys only, the loss differs)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batch = _global_batch()
    for name, method in _tiny_methods().items():
        single = _step(method, batch[name])
        mean_loss = (ranks[0][name]["loss"] + ranks[1][name]["loss"]) / 2
        assert mean_loss.item() == pytest.approx(single["loss"].item(), rel=1e-10), name
        assert single["grads"].keys() == ranks[0][name]["grads"].keys()
        for param, grad in single["grads"].items():
            # timm resamples the position embedding for the 8 px crops in float32: its gradient is float32-exact
            rtol = 1e-6 if "pos_embed" in param else 1e-8
            for r in range(2):
                torch.testing.assert_close(ranks[r][name]["grads"][param], grad, rtol=rtol, atol=1e-12,
                                           msg=lambda m, p=param, n=name: f"{n} {p}: {m}")
        for r in range(2):
            torch.testing.assert_close(ranks[r][name]["center"], single["center"], rtol=1e-12, atol=1e-15)
    assert single["center"].abs().sum() == 0  # (MoCo v3 has no centre; DINO's is checked in the loop above)
    local_only = _tiny_methods()["mocov3"]
    part = _shard(batch["mocov3"], 0, 2)
    assert local_only(part)[0].item() != pytest.approx(ranks[0]["mocov3"]["loss"].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- recipes
# main_moco.py's argument defaults, and the CONFIG.md commands named (transcribed)
MOCO_DEFAULTS = dict(batch_size=4096, lr=0.6, momentum=0.9, weight_decay=1e-6, moco_dim=256, moco_mlp_dim=4096,
                     moco_m=0.99, moco_t=1.0, optimizer="lars", warmup_epochs=10, crop_min=0.08, epochs=100)
OFFICIAL = {
    # "ViT-Small, 4-node (32-GPU) pre-training" (the ViT table's batch 4096)
    "mocov3_vit_small_imagenet1k": dict(MOCO_DEFAULTS, arch="vit_small", optimizer="adamw", lr=1.5e-4,
                                         weight_decay=0.1, epochs=300, warmup_epochs=40, stop_grad_conv1=True,
                                         moco_m_cos=True, moco_t=0.2),
    # "ResNet-50, 100-epoch pre-training"
    "mocov3_resnet50_imagenet1k": dict(MOCO_DEFAULTS, arch="resnet50", moco_m_cos=True, crop_min=0.2),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("crop", ["ccrop", "rcrop"])
def test_recipe_settings_equal_the_official_ones(name, crop):
    official, recipe = OFFICIAL[name], paper(f"{name}_{crop}")
    opts = MoCoV3Config(**recipe.method.options)
    assert recipe.method.name == "mocov3" and recipe.crop.mode == crop
    assert (opts.temperature, opts.out_dim, opts.hidden_dim, opts.momentum) == (
        official["moco_t"], official["moco_dim"], official["moco_mlp_dim"], official["moco_m"])
    assert opts.momentum_schedule == ("cosine" if official["moco_m_cos"] else "constant")
    o = recipe.optim
    assert recipe.data.batch_size == official["batch_size"] and recipe.train.epochs == official["epochs"]
    assert (o.name, o.lr, o.lr_scaling, o.weight_decay, o.warmup_epochs) == (
        official["optimizer"], official["lr"], "linear", official["weight_decay"], official["warmup_epochs"])
    assert (o.schedule, o.final_lr_ratio, o.per_step, o.weight_decay_end) == ("cosine", 0.0, True, None)
    assert o.weight_decay_filter == "all"  # model.parameters() in one group (LARS skips ndim <= 1 itself)
    if o.name == "lars":
        assert o.momentum == official["momentum"]
    else:
        assert o.betas == [0.9, 0.999]
    assert recipe.model.sync_bn  # main_moco.py: convert_sync_batchnorm
    # augmentation1 / augmentation2: blur p 1.0 / 0.1, solarize p 0 / 0.2; crop scale (crop_min, 1)
    groups = recipe.view_groups(224, dataset_blur=True)
    assert [(g.count, g.size, tuple(g.scale), g.blur_p, g.solarize_p) for g in groups] == [
        (1, 224, (official["crop_min"], 1.0), 1.0, 0.0), (1, 224, (official["crop_min"], 1.0), 0.1, 0.2)]
    assert all((g.flip_p, g.jitter, g.jitter_p, g.gray_p) == (0.5, [0.4, 0.4, 0.2, 0.1], 0.8, 0.2) for g in groups)
    if official["arch"] == "vit_small":  # vits.py::vit_small: 12 heads (timm's vit_small_patch16_224 has 6)
        assert (recipe.model.name, recipe.model.args) == ("vit_small_patch16_224", {"num_heads": 12})
        assert opts.vit_init and opts.stop_grad_conv1 == official["stop_grad_conv1"]
    else:  # torchvision resnet50(zero_init_residual=True)
        assert (recipe.model.name, recipe.model.args) == ("resnet50", {"zero_init_last": True})


def test_timm_vit_small_with_12_heads_is_mocov3s_vit_small():
    vit = create_backbone(**{"name": "vit_small_patch16_224", **paper("mocov3_vit_small_imagenet1k_ccrop").model.args})
    assert (vit.patch_embed.patch_size, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == ((16, 16), 384, 12, 12)
    assert vit.blocks[0].mlp.fc1.out_features == 4 * 384 and vit.blocks[0].attn.qkv.bias is not None
    assert vit.norm.eps == 1e-6 and vit.global_pool == "token"


@pytest.mark.parametrize("name", ["mocov3_vit_small_imagenet1k_ccrop", "mocov3_resnet50_imagenet1k_ccrop"])
def test_lr_and_momentum_follow_the_official_schedules_every_step(name):
    """adjust_learning_rate(epoch + i / iters) and adjust_moco_momentum: the loop's per-step lr at the same
    fractional epoch, and the momentum it passes after the step before, equal them at every step."""
    recipe, iters = paper(name), 7
    o, epochs = recipe.optim, recipe.train.epochs
    base_lr = o.lr * recipe.data.batch_size / 256  # main_moco.py: args.lr * args.batch_size / 256
    opts = MoCoV3Config(**recipe.method.options)
    for it in range(epochs * iters):
        epoch = it / iters
        assert lr_at(o, epoch, epochs, base_lr) == pytest.approx(
            official_lr(epoch, base_lr, o.warmup_epochs, epochs), rel=1e-12, abs=1e-18)
        assert momentum_at(it / (epochs * iters), opts.momentum, opts.momentum_schedule) == pytest.approx(
            official_momentum(epoch, 0.99, epochs), rel=1e-15)


@pytest.mark.parametrize("name", ["mocov3", "MoCo-v3", "moco_v3"])
def test_mocov3_is_the_same_method_by_any_of_its_names(name):
    """The moco-v3 repository's spelling ("mocov3") names the same method in a recipe and in build_method."""
    from hub_ccrop.methods import MoCoV3Config, canonical_method, method_config
    from hub_ccrop.recipe import load_recipe

    assert canonical_method(name) == "moco_v3" and isinstance(method_config(name), MoCoV3Config)
    recipe = load_recipe("recipes/mocov3_vit_tiny_cifar10_ccrop.yaml", [f"method.name={name}"])
    assert recipe.method.name == name  # kept as written; the registry resolves it
    with pytest.raises(ValueError, match="unknown SSL method 'mocov4'"):
        method_config("mocov4")

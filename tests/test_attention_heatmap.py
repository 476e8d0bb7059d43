"""ViT heatmaps from the class token's attention (hub_ccrop/attention.py): a planted patch gets the peak and
the box, patch cells are centred, registers are left out, and the map equals timm's own attention matrix."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hub_ccrop.attention import cls_attention_maps, heatmap_source, supports_cls_attention
from hub_ccrop.localize import heatmaps, localize_boxes, model_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, PATCH, DIM, HEADS = 32, 4, 16, 2
GRID = SIZE // PATCH


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE, "patch_size": PATCH, "embed_dim": DIM, "depth": 2, "num_heads": HEADS,
              "num_classes": 0, **kwargs}
    return VisionTransformer(**kwargs).eval()


@torch.no_grad()
def planted_patch_vit(reg_tokens: int = 0, register_pull: float = 0.0) -> VisionTransformer:
    """A ViT whose last block's head 0 sends the class token's attention to bright patches, head 1 spreads
    it uniformly. Tokens: channel 0 carries the patch's brightness (nothing else, no position embedding);
    every block is the identity (zero attention and MLP outputs); in the last block's attention LayerNorm
    maps a bright token to a fixed vector with u_0 = sqrt(D - 1) and a dark one to 0, head 0's query is a
    constant along channel 0 and its key reads u_0, so a bright patch has logit ~22 and the rest 0.
    ``register_pull`` > 0 makes the registers bright too (keys as large as the patch's)."""
    model = tiny_vit(reg_tokens=reg_tokens, no_embed_class=reg_tokens > 0)
    for param in model.parameters():
        param.zero_()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
    model.patch_embed.proj.weight[0].fill_(1.0 / (3 * PATCH * PATCH))
    if reg_tokens:
        model.reg_token[..., 0] = register_pull
    qkv = model.blocks[-1].attn.qkv
    qkv.bias[0] = 4.0  # head 0's query, channel 0 (q occupies rows [0, D), head h rows [h*D/H, (h+1)*D/H))
    qkv.weight[DIM, 0] = 4.0  # head 0's key, channel 0, reads the token's normed channel 0
    return model


def planted_images() -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One image per patch cell: black, with that 4x4 patch white."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    images = torch.zeros(len(cells), 3, SIZE, SIZE)
    for i, (r, c) in enumerate(cells):
        images[i, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 1.0
    return images, cells


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_planted_patch_gets_the_peak_and_a_box_centred_on_it(reg_tokens):
    model = planted_patch_vit(reg_tokens)
    assert model.num_prefix_tokens == 1 + reg_tokens
    images, cells = planted_images()
    maps = cls_attention_maps(model, images)
    assert maps.shape == (len(cells), GRID, GRID) and maps.dtype == torch.float32
    peaks = maps.flatten(1).argmax(dim=1)
    assert peaks.tolist() == [r * GRID + c for r, c in cells]
    # head 0 puts ~all its mass on the patch, head 1 spreads 1/N over all N tokens (prefix tokens included)
    tokens = GRID * GRID + 1 + reg_tokens
    assert maps.flatten(1).max(dim=1).values == pytest.approx(torch.full((len(cells),), (1 + 1 / tokens) / 2), abs=1e-6)
    assert maps.sum(dim=(1, 2)) == pytest.approx(torch.full((len(cells),), (1 + GRID * GRID / tokens) / 2), abs=1e-6)
    for k in (0.1, 0.5):
        boxes = model_boxes(model, maps, (SIZE, SIZE), k=k)  # each patch cell on its patch's centre
        centres = torch.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], dim=1) / 2 * SIZE
        truth = torch.tensor([[c * PATCH + PATCH / 2, r * PATCH + PATCH / 2] for r, c in cells])
        inner = (centres[:, 0] > PATCH) & (centres[:, 0] < SIZE - PATCH)  # a box at the border is clipped
        inner &= (centres[:, 1] > PATCH) & (centres[:, 1] < SIZE - PATCH)
        assert (centres - truth)[inner].abs().max() <= 1e-5
        patch = truth / SIZE + torch.tensor([[-0.5, -0.5], [0.5, 0.5]])[:, None].mul(PATCH / SIZE)  # [2, n, 2]
        assert (boxes[:, :2] <= patch[0] + 1e-6).all() and (boxes[:, 2:] >= patch[1] - 1e-6).all()
        assert (boxes[:, 2:] - boxes[:, :2]).max() <= 2 * PATCH / SIZE  # and not much more than the patch


def test_registers_are_not_part_of_the_map():
    """Registers that take a share of the attention (as trained ones do) lower the patch values but never
    show up as cells; the planted patch keeps the peak."""
    model = planted_patch_vit(reg_tokens=4, register_pull=1.0)
    images, cells = planted_images()
    maps = cls_attention_maps(model, images)
    assert maps.shape == (len(cells), GRID, GRID)
    assert maps.flatten(1).argmax(dim=1).tolist() == [r * GRID + c for r, c in cells]
    assert maps.flatten(1).max(dim=1).values.max() < 0.5 * (1 + 1 / 69) / 2  # 5 bright tokens share head 0


def reference_cls_attention(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """timm's own attention matrix (its non-fused path, captured at attn_drop), class-token row, patch columns."""
    model = copy.deepcopy(model)
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        model.forward_features(images)
    return seen[0][:, :, 0, model.num_prefix_tokens:].mean(dim=1)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4, "no_embed_class": True}, {"qk_norm": True},
                                    {"dynamic_img_size": True}])
def test_map_equals_timms_attention_matrix_with_fused_attention_left_on(kwargs):
    model = tiny_vit(**kwargs)
    with torch.no_grad():  # a random model has nearly uniform attention: make it peaky
        model.blocks[-1].attn.qkv.weight.mul_(8.0)
    size = 24 if kwargs.get("dynamic_img_size") else SIZE
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    fused = model.blocks[-1].attn.fused_attn
    maps = cls_attention_maps(model, images)
    grid = size // PATCH
    assert maps.shape == (3, grid, grid)
    torch.testing.assert_close(maps.flatten(1), reference_cls_attention(model, images), rtol=1e-5, atol=1e-6)
    assert maps.flatten(1).std(dim=1).min() > 1e-3  # not a uniform map
    assert model.blocks[-1].attn.fused_attn == fused  # training keeps its attention kernel
    assert not model.blocks[-1].attn._forward_pre_hooks  # the capture hook is gone


def test_bf16_autocast_map_is_float32_and_close():
    model = tiny_vit()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = cls_attention_maps(model, images)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, cls_attention_maps(model, images), rtol=0.05, atol=2e-3)


def test_source_selection():
    vit, resnet = tiny_vit(), timm.create_model("resnet18", num_classes=0)
    pooled = tiny_vit(class_token=False, global_pool="avg")
    assert supports_cls_attention(vit) and not supports_cls_attention(resnet) and not supports_cls_attention(pooled)
    assert heatmap_source(vit) == "cls_attention" and heatmap_source(resnet) == "feature_norm"
    assert heatmap_source(pooled, "auto") == "feature_norm" and heatmap_source(vit, "feature_norm") == "feature_norm"
    with pytest.raises(ValueError, match="'cls_attention' needs a ViT with a class token.*use 'feature_norm'"):
        heatmap_source(resnet, "cls_attention")
    with pytest.raises(ValueError, match="auto, cls_attention, feature_norm"):
        heatmap_source(vit, "attention")


def test_localize_heatmaps_selects_the_source():
    model = planted_patch_vit()
    images, _ = planted_images()
    torch.testing.assert_close(heatmaps(model, images, "cls_attention"), cls_attention_maps(model, images))
    torch.testing.assert_close(heatmaps(model, images, "auto"), cls_attention_maps(model, images))
    norms = heatmaps(model, images, "feature_norm")  # the token norms: the planted patch too, here
    assert norms.shape == (len(images), GRID, GRID)
    assert not torch.allclose(norms, cls_attention_maps(model, images))


def test_localization_pass_boxes_from_attention():
    """localize_boxes(heatmap=...) over a loader: attention boxes sit on the planted patches."""
    model = planted_patch_vit(reg_tokens=4)
    images, cells = planted_images()
    ids = torch.arange(len(images))
    loader = [(images[i:i + 16], ids[i:i + 16], ids[i:i + 16]) for i in range(0, len(images), 16)]
    out_ids, boxes = localize_boxes(model, loader, k=0.5, heatmap="auto", progress=False)
    assert torch.equal(out_ids, ids)
    truth = torch.tensor([[c, r, c + 1, r + 1] for r, c in cells], dtype=torch.float32) * PATCH / SIZE
    torch.testing.assert_close(boxes, truth)  # k = 0.5: exactly the patch


@pytest.mark.parametrize(("heatmap", "expected"), [("auto", "cls_attention"), ("feature_norm", "feature_norm")])
def test_recipe_heatmap_source_reaches_the_pass_and_the_box_table(heatmap, expected, tmp_path, one_thread):
    """crop.heatmap: the DINO ViT recipe's passes use the teacher's attention (auto) or its token norms,
    and the box table's metadata says which."""
    import contextlib
    import io

    from hub_ccrop.boxes import BoxTable
    from hub_ccrop.recipe import load_recipe
    from hub_ccrop.synthetic import small_objects_dir
    from hub_ccrop.training import train

    data = small_objects_dir(tmp_path / "data", train=32, test=8)
    recipe = load_recipe("recipes/dino_vit_tiny_cifar10_ccrop.yaml", [
        "data.dataset=small_objects", f"data.data_dir={data}", "data.batch_size=16", "data.num_workers=0",
        "data.image_size=32", "method.options.out_dim=64", "train.epochs=2", "train.knn_every=0",
        "train.show_images=0", "crop.warmup_epochs=1", "crop.loc_interval=1", f"crop.heatmap={heatmap}"])
    with contextlib.redirect_stdout(io.StringIO()):
        train(recipe, tmp_path / "run")
    table = BoxTable.load(tmp_path / "run" / "boxes.parquet")
    assert table.metadata["heatmap_source"] == expected and table.metadata["backbone"] == "vit_tiny_patch16_224"
    assert table.metadata["localizer_network"] == "vit_tiny_patch16_224"  # the teacher, a ViT of that architecture

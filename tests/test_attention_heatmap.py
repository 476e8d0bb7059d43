"""ViT heatmaps from the class token's attention (hub_ccrop/attention.py): a planted patch gets the peak and
the box, patch cells are centred, registers are left out, and the map equals timm's own attention matrix."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from hub_ccrop.attention import (
    VIT_HEATMAPS,
    cls_attention_maps,
    heatmap_candidates,
    heatmap_source,
    supports_cls_attention,
    vit_heatmaps,
)
from hub_ccrop.box_follow import FOLLOWS, FollowCheck
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
    # what a pass with the follow check chooses between
    assert heatmap_candidates(vit) == VIT_HEATMAPS == ("cls_attention", "feature_norm")
    assert heatmap_candidates(resnet) == heatmap_candidates(pooled) == ("feature_norm",)
    assert heatmap_candidates(vit, "feature_norm") == ("feature_norm",)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4, "no_embed_class": True}, {"dynamic_img_size": True}])
def test_one_forward_pass_gives_both_vit_maps(kwargs):
    """vit_heatmaps reads the attention and the token norm of the same forward pass; each equals the map of
    its own source (the token norm: timm's forward_intermediates, the feature map of token models)."""
    model = tiny_vit(**kwargs)
    size = 24 if kwargs.get("dynamic_img_size") else SIZE
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    both = vit_heatmaps(model, images)
    torch.testing.assert_close(both["feature_norm"], heatmaps(model, images, "feature_norm"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both["cls_attention"].flatten(1), reference_cls_attention(model, images),
                               rtol=1e-5, atol=1e-6)
    assert not model.blocks[-1]._forward_hooks and not model.blocks[-1].attn._forward_pre_hooks


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


@pytest.mark.parametrize(("heatmap", "follow_images", "expected"), [
    ("auto", 512, None), ("auto", 0, "cls_attention"), ("feature_norm", 512, "feature_norm")])
def test_recipe_heatmap_source_reaches_the_pass_and_the_box_table(heatmap, follow_images, expected, tmp_path, one_thread):
    """crop.heatmap: the DINO ViT recipe's passes use the teacher's token norms, or with auto the one of its
    attention and token norms that the follow check prefers (the attention when the check is off), and the
    box table's metadata says which, with the scores it was chosen by."""
    import contextlib
    import io
    import json

    from hub_ccrop.boxes import BoxTable
    from hub_ccrop.recipe import load_recipe
    from hub_ccrop.synthetic import small_objects_dir
    from hub_ccrop.training import train

    data = small_objects_dir(tmp_path / "data", train=32, test=8)
    recipe = load_recipe("recipes/dino_vit_tiny_cifar10_ccrop.yaml", [
        "data.dataset=small_objects", f"data.data_dir={data}", "data.batch_size=16", "data.num_workers=0",
        "data.image_size=32", "method.options.out_dim=64", "train.epochs=2", "train.knn_every=0",
        "train.show_images=0", "crop.warmup_epochs=1", "crop.loc_interval=1", f"crop.heatmap={heatmap}",
        f"crop.follow_images={follow_images}"])
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        train(recipe, tmp_path / "run")
    table = BoxTable.load(tmp_path / "run" / "boxes.parquet")
    scores = table.metadata.get("heatmap_follow")
    record = [r for r in json.loads((tmp_path / "run" / "metrics.json").read_text())["history"] if "loc_images" in r][-1]
    if expected is None:  # chosen by the follow check
        assert set(scores) == set(VIT_HEATMAPS)
        keep = scores["cls_attention"] >= FOLLOWS  # the attention while its boxes follow, else the better follower
        expected = "cls_attention" if keep else max(VIT_HEATMAPS, key=lambda s: (scores[s], s == "cls_attention"))
        assert record["box_follow"] == pytest.approx(scores[expected], abs=1e-4)
        assert {name: record[f"box_follow_of_{name}"] for name in VIT_HEATMAPS} == pytest.approx(scores, abs=1e-4)
        assert (f"heatmap {expected} (chosen by the follow check: cls_attention "
                f"{scores['cls_attention']:.2f}, feature_norm {scores['feature_norm']:.2f})") in printed.getvalue()
    else:
        assert scores is None and not any(key.startswith("box_follow_of_") for key in record)
        assert "chosen by the follow check" not in printed.getvalue()
    assert record["heatmap_source"] == expected
    assert table.metadata["heatmap_source"] == expected and table.metadata["backbone"] == "vit_tiny_patch16_224"
    assert table.metadata["localizer_network"] == "vit_tiny_patch16_224"  # the teacher, a ViT of that architecture


@torch.no_grad()
def positional_vit(follows: str) -> VisionTransformer:
    """The planted-patch ViT with a bump on cell (0, 0) of the position embedding (channel 5), in every image.
    ``follows="cls_attention"``: a tall bump that dominates the token norm, while the attention keeps reading
    the brightness, so only the attention follows the content. ``follows="feature_norm"``: a low bump that the
    attention's key reads instead, so only the token norm follows the content."""
    model = planted_patch_vit()
    bump_channel, key = 5, model.blocks[-1].attn.qkv.weight
    model.pos_embed[0, 1, bump_channel] = 5.0 if follows == "cls_attention" else 0.3  # token 0 is the class token
    if follows == "feature_norm":
        key[DIM, 0], key[DIM, bump_channel] = 0.0, 4.0
    return model


@pytest.mark.parametrize("follows", VIT_HEATMAPS)
def test_auto_pass_keeps_the_vit_map_whose_boxes_follow_the_content(follows):
    """With the follow check, heatmap="auto" on a ViT checks both maps in one pass and keeps the boxes of the
    one that follows the content: its score and boxes are those of a pass with that source alone."""
    model = positional_vit(follows)
    images, cells = planted_images()
    inner = [i for i, (r, c) in enumerate(cells) if 2 <= r < GRID - 2 and 2 <= c < GRID - 2]  # in both windows
    images = images[inner]
    ids = torch.arange(len(images))
    loader = [(images[i:i + 8], ids[i:i + 8]) for i in range(0, len(images), 8)]
    alone = {}
    for source in VIT_HEATMAPS:
        check = FollowCheck(images=len(images))
        _, boxes = localize_boxes(model, loader, k=0.5, heatmap=source, progress=False, follow=check)
        alone[source] = (check.score(), boxes)
    assert alone[follows][0] > 0.9 and max(score for score, _ in alone.values() if score != alone[follows][0]) < 0.2
    check = FollowCheck(images=len(images))
    _, boxes = localize_boxes(model, loader, k=0.5, heatmap="auto", progress=False, follow=check)
    assert check.sources == VIT_HEATMAPS and check.source == follows
    torch.testing.assert_close(check.scores(), torch.tensor([alone[s][0] for s in VIT_HEATMAPS], dtype=torch.float64))
    assert check.score() == pytest.approx(alone[follows][0])
    assert torch.equal(boxes, alone[follows][1])
    # without the check there is nothing to choose by: the attention, as before
    _, unchecked = localize_boxes(model, loader, k=0.5, heatmap="auto", progress=False)
    assert torch.equal(unchecked, localize_boxes(model, loader, k=0.5, heatmap="cls_attention", progress=False)[1])


def test_show_says_which_vit_map_drew_the_boxes(tmp_path, capsys):
    """hub-ccrop show on a ViT chooses between its two maps as a pass does, and says which and why."""
    from PIL import Image
    from test_hub import make_run

    from hub_ccrop.show import show

    run, _ = make_run(tmp_path / "run", model_name="vit_tiny_patch16_224", image_size=224)
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        image = Image.new("RGB", (80, 64), (30, 30, 30))
        image.paste((250, 200, 40), (10 + 20 * k, 12, 40 + 20 * k, 44))
        image.save(photos / f"p{k}.png")
    show(str(run), inputs=[str(photos)], out=tmp_path / "show.png")
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("heatmap "))
    chosen = line.split()[1]
    scores = {name: float(score) for name, score in re.findall(r"(cls_attention|feature_norm) (-?\d+\.\d\d)", line)}
    assert set(scores) == set(VIT_HEATMAPS) and scores[chosen] == max(scores.values())
    assert f"boxes follow the content {scores[chosen]:.2f}" in out

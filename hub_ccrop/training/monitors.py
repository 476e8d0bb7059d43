"""End-of-epoch work on the backbone: the localization pass (new boxes, gathered by id, pictures) and the
kNN monitor, over un-augmented batches of every process's share."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from hub_ccrop.attention import heatmap_source
from hub_ccrop.box_follow import FollowCheck
from hub_ccrop.box_quality import FOLLOW_OF, box_centres, box_quality
from hub_ccrop.distributed import default_autocast_dtype
from hub_ccrop.evaluate import extract_features, knn_accuracy
from hub_ccrop.inference import evaluating, model_device
from hub_ccrop.localize import input_heatmaps, localize_boxes
from hub_ccrop.localizer import Localizer, box_settings, pass_localizer, table_metadata
from hub_ccrop.recipe import Recipe
from hub_ccrop.training.data_source import RunData, eval_loader, eval_source, is_streaming
from hub_ccrop.training.state import TrainState
from hub_ccrop.views import (
    EvalCollate,
)
from hub_ccrop.viz import draw_localization_grid, to_uint8


def knn_monitor(accelerator: Accelerator, backbone, run_data: RunData, recipe: Recipe) -> dict[str, float]:
    """The kNN monitor: features of the labeled train split vs the test split (k, T from the recipe)."""
    collate = EvalCollate(run_data.spec, purpose="classify")
    dtype = default_autocast_dtype(accelerator.device)
    feats = [extract_features(backbone, eval_loader(accelerator, eval_source(accelerator, run_data, name), collate,
                                                     recipe), accelerator=accelerator,
                              autocast_dtype=dtype, channels_last=recipe.model.channels_last)
             for name in ("knn_train", "knn_test")]
    (_, train_feats, train_labels), (_, test_feats, test_labels) = feats
    return knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes=run_data.spec.num_classes,
                        k=recipe.train.knn_k, temperature=recipe.train.knn_temperature)


def localization_pass(accelerator: Accelerator, encoder, run_data: RunData, state: TrainState, recipe: Recipe,
                       out: Path) -> dict[str, float]:
    """Localize every pretraining image, gather by id, write the shared table, save it and a picture."""
    collate = EvalCollate(run_data.spec, purpose="localize")
    collate.skipped = state.skipped  # the training views' ids: each bad image is reported once per run
    start = time.perf_counter()
    source = eval_source(accelerator, run_data, "pretrain")
    localizer = pass_localizer(recipe.crop.localizer, encoder, run_data.spec.mean, run_data.spec.std, accelerator.device)
    # ceil: each process's share of the images checked (crop.follow_images 0: no check)
    follow = FollowCheck(-(-recipe.crop.follow_images // accelerator.num_processes)) if recipe.crop.follow_images else None
    ids, boxes = localize_boxes(localizer.model, eval_loader(accelerator, source, collate, recipe),
                                **box_settings(recipe.crop), prepare=localizer.prepare,
                                autocast_dtype=default_autocast_dtype(accelerator.device),
                                channels_last=recipe.model.channels_last, accelerator=accelerator,
                                heatmap=recipe.crop.heatmap, follow=follow)
    seconds = time.perf_counter() - start
    state.boxes.update(ids, boxes)
    choice = heatmap_choice(follow, localizer, recipe.crop.heatmap)
    state.boxes.metadata.update(epoch=state.epoch, **table_metadata(recipe.crop, localizer), **choice)
    check_same_on_every_process(accelerator, state.boxes.boxes)
    gt = run_data.gt_boxes[ids] if run_data.gt_boxes is not None else None
    stats = {"loc_seconds": seconds, "loc_images": len(ids), "localizer": localizer.source,
             "heatmap_source": choice["heatmap_source"],
             **{f"{FOLLOW_OF}{name}": score for name, score in choice.get("heatmap_follow", {}).items()}}
    stats |= box_quality(boxes, gt, follow=follow.score() if follow is not None else None).metrics()
    if accelerator.is_main_process:
        for suffix in (".parquet", ".safetensors"):
            state.boxes.save(out / "boxes" / f"epoch_{state.epoch:04d}{suffix}")
            state.boxes.save(out / f"boxes{suffix}")
        draw_picture(localizer, run_data, collate, state, recipe, out / "pictures" / f"localization_epoch_{state.epoch:04d}.png")
    accelerator.wait_for_everyone()
    return stats


def heatmap_choice(follow: FollowCheck | None, localizer: Localizer, heatmap: str) -> dict[str, object]:
    """What a box table records about its heatmap: the source the pass used and, when the follow check chose
    it among several (``crop.heatmap: auto`` on a ViT), every candidate's follow score."""
    scores = follow.source_scores() if follow is not None else {}
    if len(scores) < 2:  # no choice was made: the recipe's source
        return {"heatmap_source": heatmap_source(localizer.model, heatmap)}
    return {"heatmap_source": follow.source, "heatmap_follow": {name: round(score, 4) for name, score in scores.items()}}


def sync_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BN statistics): DDP leaves each process's own running
    statistics from the last step until the next forward, so passes would differ between ranks."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def check_same_on_every_process(accelerator: Accelerator, boxes: torch.Tensor) -> None:
    """Every process must train on the same box table: compare two checksums across processes."""
    if accelerator.num_processes == 1:
        return
    b = boxes.double()
    weights = torch.arange(1, len(b) + 1, dtype=torch.float64)[:, None]
    digest = torch.stack([b.sum(), (b * weights).sum()])[None].to(accelerator.device)
    every = accelerator.gather(digest)
    if not torch.equal(every.min(dim=0).values, every.max(dim=0).values):
        raise RuntimeError("the box tables differ between processes after the localization pass")


@torch.no_grad()
def draw_picture(localizer: Localizer, run_data: RunData, collate: EvalCollate, state: TrainState, recipe: Recipe,
                 path: Path) -> None:
    """Heatmaps, boxes and crop pairs of a few fixed training images (the same ones at every pass)."""
    n = recipe.train.show_images
    if not n:
        return
    if is_streaming(run_data.pretrain):
        rows = list(itertools.islice(run_data.pretrain, n))
    else:
        positions = torch.linspace(0, len(run_data.pretrain) - 1, min(n, len(run_data.pretrain))).long()
        rows = [run_data.pretrain[int(i)] for i in positions]
    images, ids, _ = collate(rows)
    with evaluating(localizer.model) as encoder:
        maps = input_heatmaps(encoder, localizer.prepare(images.to(model_device(encoder))),
                              recipe.crop.heatmap_alignment, recipe.crop.heatmap_flip,
                              state.boxes.metadata.get("heatmap_source", recipe.crop.heatmap))[0].cpu()  # the pass's
    gt = run_data.gt_boxes[ids] if run_data.gt_boxes is not None else None
    draw_localization_grid(to_uint8(images, run_data.spec.mean, run_data.spec.std), maps, state.boxes.lookup(ids),
                           path, alpha=recipe.crop.alpha, scale=recipe.crop.scale, ratio=recipe.crop.ratio,
                           gt_boxes=gt, ids=ids.tolist(), title=f"{recipe.name}: boxes after epoch {state.epoch}",
                           groups=recipe.view_groups(run_data.spec.image_size) if recipe.views else None,
                           centre=box_centres(state.boxes.boxes).mean(dim=0).tolist())

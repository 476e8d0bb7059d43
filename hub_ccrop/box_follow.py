"""Do the boxes follow the image content? A check of a localization pass that needs no ground truth.

Every image is localized twice more, through two windows of it shifted against each other by ``shift`` of
its side (the top-left and the bottom-right window, each resized to the input size), and both boxes are
mapped back onto the image. Boxes that sit on what the image shows land in the same place whichever window
they were found through; boxes that sit where the *frame* puts them (a fixed or centred box, the whole
image, a positional prior, noise) move with the window. Per image and axis the offset is the move of the
box centre between the two windows in units of the shift, and the score is ``1 - mean offset``: **1** when
the boxes stay on the content, **0** when they move with the frame, as the centred box and the whole image
do by construction. On data with ground-truth boxes the score tracks the IoU gain over the centred box of
the same size (``benchmarks/README.md``); on a user's own photos, which have none, it is the only sign.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hub_ccrop.boxes import box_centres

__all__ = ["DOES_NOT_FOLLOW", "FOLLOWS", "FOLLOW_SHIFT", "FollowCheck", "follow_offsets", "window_boxes"]

FOLLOW_SHIFT = 0.25  # the windows' shift, as a fraction of the image side (each window: 1 - shift of the side)
# box_follow measured (benchmarks/README.md): 0.60-0.77 where boxes beat the centred box by 0.2-0.5, at most
# 0.17 where they did not
FOLLOWS, DOES_NOT_FOLLOW = 0.5, 0.2

BoxFn = Callable[[Tensor], Tensor]  # images [B, 3, H, W] -> boxes [B, 4] as fractions of the image


def window_boxes(box_fn: BoxFn, images: Tensor, shift: float = FOLLOW_SHIFT) -> tuple[Tensor, Tensor, Tensor]:
    """The boxes of the top-left and the bottom-right windows of ``images``, each window resized to the input
    size for ``box_fn``, mapped back to fractions of the whole image; and the windows' shift ``(x, y)``
    as fractions of the image (``shift`` rounded to whole pixels)."""
    height, width = images.shape[-2:]
    dy, dx = max(1, round(shift * height)), max(1, round(shift * width))
    wh, ww = height - dy, width - dx
    size = torch.tensor([ww / width, wh / height, ww / width, wh / height], device=images.device)
    out = []
    for y0, x0 in ((0, 0), (dy, dx)):
        window = images[..., y0:y0 + wh, x0:x0 + ww]
        boxes = box_fn(F.interpolate(window, size=(height, width), mode="bilinear", align_corners=False))
        origin = torch.tensor([x0 / width, y0 / height] * 2, device=images.device)
        out.append(boxes.float() * size + origin)
    return out[0], out[1], torch.tensor([dx / width, dy / height], device=images.device)


def follow_offsets(box_fn: BoxFn, images: Tensor, shift: float = FOLLOW_SHIFT) -> Tensor:
    """``[B, 2]`` per image and axis ``(x, y)``: how far the box centre moves between the two windows of
    :func:`window_boxes`, in units of their shift (0: it stays on the content; 1: it moves with the frame).
    A ``box_fn`` that gives several heatmap sources' boxes ``[B, S, 4]`` gets ``[B, S, 2]``."""
    first, second, moved = window_boxes(box_fn, images, shift)
    return (box_centres(second) - box_centres(first)) / moved


class FollowCheck:
    """The check of one pass: :meth:`offsets` for the first ``images`` images each process sees (NaN rows
    after them), then :meth:`record` of the offsets gathered by sample id over the processes (so images a
    sharded loader repeats count once), and :meth:`score`. When the pass compared several heatmap sources
    (``[N, S, 2]`` offsets, the preferred source first), :attr:`best` is the one it keeps and :meth:`score`
    its score."""

    def __init__(self, images: int, shift: float = FOLLOW_SHIFT) -> None:
        if images < 0 or not 0 < shift < 1:
            raise ValueError(f"FollowCheck: images must be >= 0 and shift in (0, 1), got {images}, {shift}")
        self.images, self.shift = images, shift
        self.count = 0  # images checked by this process so far
        self.gathered: Tensor | None = None  # [N, S, 2]
        self.sources: tuple[str, ...] = ()
        self._offset_shape: tuple[int, ...] = (2,)  # of one image: (2,) or (S, 2)

    def offsets(self, box_fn: BoxFn, images: Tensor) -> Tensor:
        """:func:`follow_offsets` of the batch's first images until ``images`` were checked; NaN rows after."""
        take = min(self.images - self.count, len(images))
        if take <= 0:
            return torch.full((len(images), *self._offset_shape), float("nan"), device=images.device)
        checked = follow_offsets(box_fn, images[:take], self.shift).float()
        self.count += take
        self._offset_shape = tuple(checked.shape[1:])
        return torch.cat([checked, checked.new_full((len(images) - take, *self._offset_shape), float("nan"))])

    def record(self, offsets: Tensor, sources: tuple[str, ...] = ()) -> None:
        """Keep the pass's offsets ``[N, 2]`` (or ``[N, S, 2]`` for the heatmap ``sources``), one row per image
        (gathered over the processes, by id)."""
        offsets = offsets.double().cpu()
        self.gathered = offsets[:, None] if offsets.dim() == 2 else offsets
        self.sources = tuple(sources)

    def scores(self) -> Tensor | None:
        """``1 - mean offset`` ``[S]`` per heatmap source over the checked images and both axes; None when no image was checked."""
        if self.gathered is None:
            return None
        checked = self.gathered[~self.gathered.isnan().flatten(1).any(dim=1)]
        return None if not len(checked) else 1.0 - checked.mean(dim=(0, 2))

    @property
    def best(self) -> int:
        """The index of the source the pass keeps: the first (preferred) one while its boxes follow the content
        (score >= ``FOLLOWS``), else the one whose boxes follow it best (the first on ties); 0 without a score.

        A high score is a necessary sign of boxes on the objects, not a sufficient one (a map of local contrast
        follows the content too), so the score only overrules the preferred map when that map fails the check.
        """
        scores = self.scores()
        if scores is None or scores[0] >= FOLLOWS:
            return 0
        return int(torch.argmax(scores))

    @property
    def source(self) -> str | None:
        """The name of :attr:`best` when :meth:`record` was given the sources."""
        return self.sources[self.best] if self.sources else None

    def source_scores(self) -> dict[str, float]:
        """``{source: score}`` of the named sources (empty without names or scores)."""
        scores = self.scores()
        if scores is None or not self.sources:
            return {}
        return {name: float(score) for name, score in zip(self.sources, scores, strict=True)}

    def score(self) -> float | None:
        """The score of :attr:`best`; None when no image was checked."""
        scores = self.scores()
        return None if scores is None else float(scores[self.best])

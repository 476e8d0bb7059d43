"""One eval transform (views.eval_image): localization passes, the kNN monitor, the kNN CLI and
``hub-ccrop show`` see the same pixels; ``show`` never overwrites a picture; the model card's picture
is the last localization pass's."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from hub_ccrop.boxes import BoxTable
from hub_ccrop.data import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec
from hub_ccrop.evaluate.transforms import _LabeledRows, classification_transform
from hub_ccrop.hub.export import _table_picture
from hub_ccrop.show import localization_batch, next_picture_path
from hub_ccrop.views import EvalCollate, eval_image

SMALL = DatasetSpec("small", hub_id="org/small", image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))  # 64 px data eval at 32
IMAGENET = DatasetSpec("inet", hub_id="org/inet", image_size=224, eval_resize=(256, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)


def rows_of(sizes: list[tuple[int, int]], fmt: str = "PNG") -> list[dict]:
    """Noise images of the given (width, height), encoded as the datasets store them."""
    g = torch.Generator().manual_seed(len(sizes))
    rows = []
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        rows.append({"id": i, "image": {"bytes": buffer.getvalue(), "path": None}, "label": i % 3})
    return rows


def run_data_config(spec: DatasetSpec) -> dict:
    """What a run's backbone carries (train._run_info -> RunInfo.data_config)."""
    return {"input_size": (3, spec.image_size, spec.image_size), "mean": spec.mean, "std": spec.std,
            "crop_pct": 1.0 if spec.eval_resize is None else 0.875}


@pytest.mark.parametrize(("spec", "sizes", "fmt"), [
    (SMALL, [(64, 64), (64, 64), (32, 32)], "PNG"),
    (IMAGENET, [(300, 260), (180, 400), (700, 500)], "JPEG"),  # 700 px: shrunk at decode (max_side) in both
])
def test_knn_cli_sees_the_monitors_pixels(spec, sizes, fmt):
    rows = rows_of(sizes, fmt)
    monitor, ids, labels = EvalCollate(spec, purpose="classify")(rows)
    cli = _LabeledRows(rows, classification_transform(run_data_config(spec), train=False),
                       max_side=640 if spec.eval_resize else None, as_tensor=True)
    items = [cli[i] for i in range(len(rows))]
    assert torch.equal(torch.stack([x for x, _, _ in items]), monitor)
    assert [i for _, i, _ in items] == ids.tolist() and [lab for _, _, lab in items] == labels.tolist()


@pytest.mark.parametrize(("spec", "sizes"), [(SMALL, [(64, 64), (48, 64)]), (IMAGENET, [(300, 260), (180, 400)])])
def test_show_sees_the_localization_pass_pixels(spec, sizes):
    rows = rows_of(sizes)
    passes, _, _ = EvalCollate(spec, purpose="localize")(rows)
    from hub_ccrop.data import decode_to_tensor

    images = [decode_to_tensor(r["image"], r["id"]) for r in rows]
    assert torch.equal(localization_batch(images, run_data_config(spec)), passes)
    assert passes.shape[-2:] == (spec.image_size, spec.image_size)  # the whole image, never centre-cropped


def test_eval_image_resize_and_crop():
    img = torch.arange(3 * 40 * 80, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 40, 80)
    assert eval_image(img, 40, None).shape == (3, 40, 40)  # whole image squeezed to the square
    assert torch.equal(eval_image(img[:, :, :40], 40), img[:, :, :40])  # native size passes through
    cropped = eval_image(img, 20, resize=20)  # shorter side 40 -> 20 (80 -> 40), centre 20 x 20
    assert torch.equal(cropped, eval_image(img, (20, 40), resize=20)[:, :, 10:30])


def test_show_picture_names_never_overwrite(tmp_path):
    pictures = tmp_path / "pictures"
    assert next_picture_path(pictures) == pictures / "show_0001.png"
    pictures.mkdir()
    for name in ("show_0001.png", "show_0003.png", "localization_epoch_0005.png", "show_notes.png"):
        (pictures / name).write_bytes(b"png")
    assert next_picture_path(pictures) == pictures / "show_0004.png"


def test_model_card_picture_is_the_pass_that_made_the_table(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    table = BoxTable(4, {"epoch": 3})
    assert _table_picture(tmp_path, table) is None  # no picture drawn yet
    for name in ("localization_epoch_0003.png", "localization_epoch_0010.png", "show_0001.png"):
        (pictures / name).write_bytes(b"png")
    assert _table_picture(tmp_path, table) == pictures / "localization_epoch_0003.png"
    assert _table_picture(tmp_path, BoxTable(4)) is None  # e.g. crop.init_boxes, never re-localized

"""Own data (issue 24): folders with and without class subfolders, parquet with any image column, strided
hold-outs that keep ids, the user's ground-truth boxes, and one clear line for every input mistake."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from hub_ccrop.boxes import pairwise_box_iou
from hub_ccrop.data import (
    DataError,
    DatasetSpec,
    Rows,
    clear_cache,
    get_spec,
    ground_truth_boxes,
    load_images,
    mean_matched_iou,
    min_rows_per_process,
    num_ids,
    num_rows,
    single_objects,
)
from hub_ccrop.data.resolve import resolve_on_main, resolve_spec


def image_bytes(value: int, size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value % 256, 40, 90)).save(buf, fmt)
    return buf.getvalue()


def write_images(root: Path, names: list[str], size: tuple[int, int] = (12, 10)) -> Path:
    for k, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(k, size, "JPEG" if name.endswith(".jpg") else "PNG"))
    return root


def write_table(path: Path, columns: dict, row_group: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group)
    return path


@pytest.fixture(autouse=True)
def _fresh_listings():
    clear_cache()
    yield
    clear_cache()


# -- split names: strided selections and their complements keep row ids ------------------------------


def test_rows_select_like_python_slices():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(0, 30)
        start, stop = (rng.choice([None, rng.randint(-35, 35)]) for _ in range(2))
        step, exclude = rng.choice([1, 2, 3, 10]), rng.random() < 0.5
        rows = Rows(start, stop, step, exclude)
        chosen = set(range(n)[slice(start, stop, step)])
        expected = sorted(set(range(n)) - chosen if exclude else chosen)
        assert list(map(int, rows.positions(n))) == expected
        lo = rng.randint(0, n)
        hi = rng.randint(lo, n)
        assert rows.count(n, lo, hi) == sum(lo <= p < hi for p in expected)
        assert list(np.flatnonzero(rows.mask(np.arange(n), n))) == expected


def test_strided_split_and_its_complement_partition_the_ids(tmp_path):
    """``train[3::5]`` and ``train[!3::5]``: disjoint, together every row, each row under its own id, the same
    rows map-style and streamed (one shard per row group, each counted exactly)."""
    n = 23
    write_table(tmp_path / "train-0.parquet", {"image": [image_bytes(k) for k in range(n)], "label": list(range(n))},
                row_group=4)
    spec = DatasetSpec(name="toy", data_dir=str(tmp_path), test_split=None)
    held, rest = "train[3::5]", "train[!3::5]"
    assert (num_rows(spec, held), num_rows(spec, rest)) == (4, 19)
    assert num_ids(spec, [rest]) == n and num_ids(spec, [held]) == 19
    for streaming in (False, True):
        ids = {s: [int(r["id"]) for r in load_images(spec, s, streaming=streaming)] for s in (held, rest)}
        assert sorted(ids[held]) == [3, 8, 13, 18]
        assert sorted(ids[held] + ids[rest]) == list(range(n))
        labels = {int(r["id"]): int(r["label"]) for r in load_images(spec, rest, streaming=streaming)}
        assert all(labels[i] == i for i in labels)  # the id is the row's position: label k was written in row k
    assert min_rows_per_process(spec, 1, [rest]) == 19


# -- folders -----------------------------------------------------------------------------------------


def test_unlabeled_flat_and_nested_folders(tmp_path):
    """No class subfolders (flat, or nested at different depths): no labels, no kNN split, one start line."""
    flat = write_images(tmp_path / "flat", [f"{k:02d}.png" for k in range(6)])
    nested = write_images(tmp_path / "nested", ["a.jpg", "2023/b.jpg", "2023/may/c.png", "2024/d.png"])
    for root, count in ((flat, 6), (nested, 4)):
        spec, note = resolve_spec(get_spec(str(root)))
        assert spec.label_column is None and spec.test_split is None
        assert note.startswith(f"data {root}: {count} images without labels (no class subfolders)")
        assert "kNN monitor is off" in note and len(note.splitlines()) == 1
        rows = load_images(spec)
        assert len(rows) == count and set(rows["label"]) == {-1}


def test_class_subfolders_give_labels_and_a_spread_holdout(tmp_path):
    """Class-sorted rows: every 10th row is the test split, so each class has test rows; the rest pretrain."""
    names = [f"{cls}/{k:02d}.png" for cls in ("cat", "dog", "emu") for k in range(20)]
    spec, note = resolve_spec(get_spec(str(write_images(tmp_path / "own", names))))
    assert (spec.label_column, spec.num_classes) == ("label", 3)
    assert (spec.test_split, spec.train_split, spec.pretrain_splits) == ("train[9::10]", "train[!9::10]",
                                                                         ("train[!9::10]",))
    assert "3 classes from the class subfolders (cat, dog, emu" in note
    assert "every 10th image (6 images, train[9::10])" in note and "left out of pretraining (54 images)" in note
    test, pretrain = load_images(spec, spec.test_split), load_images(spec)
    assert sorted(test["label"]) == [0, 0, 1, 1, 2, 2]
    assert not set(test["id"]) & set(pretrain["id"]) and len(pretrain) == 54
    assert num_ids(spec) == 59  # the box table ends at the last pretraining id (row 59 is held out)
    assert resolve_spec(get_spec(str(tmp_path / "own"), label_column="none"))[0].label_column is None


def test_own_test_split_is_kept_and_validation_is_used(tmp_path):
    write_images(tmp_path / "split", [f"{s}/{c}/{k}.png" for s in ("train", "test") for c in "ab" for k in range(3)])
    spec, note = resolve_spec(get_spec(str(tmp_path / "split")))
    assert (spec.test_split, spec.num_classes, note) == ("test", 2, f"data {tmp_path / 'split'}: 6 images, "
                                                         "2 classes from the class subfolders (a, b; not classes? "
                                                         "data.label_column=none)")
    write_table(tmp_path / "val" / "train-0.parquet", {"image": [image_bytes(k) for k in range(4)], "label": [0, 1, 2, 0]})
    write_table(tmp_path / "val" / "validation-0.parquet", {"image": [image_bytes(9)], "label": [1]})
    spec, _ = resolve_spec(get_spec(str(tmp_path / "val")))
    assert (spec.test_split, spec.num_classes) == ("validation", 3)  # max label + 1 without a ClassLabel
    with pytest.raises(DataError, match="has no split 'holdout'.*set data.test_split"):
        resolve_spec(get_spec(str(tmp_path / "val"), test_split="holdout"))
    assert resolve_spec(get_spec(str(tmp_path / "val")), knn=False)[0].test_split == "test"  # untouched


def test_parquet_image_column_found_by_itself(tmp_path):
    """Any single image column (a {bytes, path} struct or binary), no label column: unlabeled rows."""
    photos = [{"bytes": image_bytes(k), "path": f"p{k}.png"} for k in range(5)]
    write_table(tmp_path / "one" / "train.parquet", {"photo": photos, "caption": list("abcde")})
    spec, note = resolve_spec(get_spec(str(tmp_path / "one")))
    assert (spec.image_column, spec.label_column) == ("photo", None)
    assert "without labels (no label column (columns: photo, caption))" in note
    assert [r["image"]["path"] for r in load_images(spec)] == [f"p{k}.png" for k in range(5)]
    assert len(list(load_images(spec, streaming=True))) == 5
    write_table(tmp_path / "two" / "train.parquet", {"a": [image_bytes(1)], "b": [image_bytes(2)]})
    with pytest.raises(DataError, match=r"several image columns \(a, b\): set data.image_column"):
        resolve_spec(get_spec(str(tmp_path / "two")))
    assert resolve_spec(get_spec(str(tmp_path / "two"), image_column="b"))[0].image_column == "b"
    write_table(tmp_path / "none" / "train.parquet", {"caption": ["x"]})
    with pytest.raises(DataError, match=r"no image column \(columns: caption\)"):
        resolve_spec(get_spec(str(tmp_path / "none")))


def test_resolution_happens_on_the_main_process_only(tmp_path):
    write_images(tmp_path / "flat", ["a.png", "b.png"])
    sent, said = [], []
    main = resolve_on_main(get_spec(str(tmp_path / "flat")), knn=True, broadcast=lambda x: sent.append(x) or x,
                           say=said.append)
    other = resolve_on_main(get_spec(str(tmp_path / "flat")), knn=True, is_main=False, broadcast=lambda x: sent[0],
                            say=said.append)
    assert other == main and len(said) == 1  # the main process says the start line, once
    failing = [("error", DataError("dataset 'x' has no split 'train'"))]
    with pytest.raises(DataError, match="no split 'train'"):  # a mistake stops every process, not only the main
        resolve_on_main(main, knn=True, is_main=False, broadcast=lambda x: failing)


# -- ground-truth boxes ------------------------------------------------------------------------------


def boxes_rows(tmp_path: Path, boxes: list, size: tuple[int, int] = (40, 20)):
    """Map-style rows of images ``size`` (W, H) with a ``boxes`` column."""
    write_table(tmp_path / "b" / "train.parquet", {
        "image": [{"bytes": image_bytes(k, size), "path": f"img{k}.png"} for k in range(len(boxes))],
        "boxes": boxes,
    })
    return load_images(DatasetSpec(name="b", data_dir=str(tmp_path / "b"), extra_columns=("boxes",)))


def test_box_formats_become_normalized_xyxy(tmp_path):
    rows = boxes_rows(tmp_path, [[[4, 2, 20, 10]], [[4, 2, 20, 10], [0, 0, 40, 20]], []])
    gt = ground_truth_boxes(rows, 3, "boxes", "xyxy")
    assert gt.shape == (3, 2, 4) and gt[2].isnan().all() and gt[0, 1].isnan().all()
    torch.testing.assert_close(gt[0, 0], torch.tensor([0.1, 0.1, 0.5, 0.5]))
    torch.testing.assert_close(gt[1, 1], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    xywh = ground_truth_boxes(boxes_rows(tmp_path, [[4, 2, 16, 8]]), 1, "boxes", "xywh")
    cxcywh = ground_truth_boxes(boxes_rows(tmp_path, [[0.3, 0.3, 0.4, 0.4]]), 1, "boxes", "cxcywh_normalized")
    torch.testing.assert_close(xywh[0, 0], torch.tensor([0.1, 0.1, 0.5, 0.5]))
    torch.testing.assert_close(cxcywh[0, 0], torch.tensor([0.1, 0.1, 0.5, 0.5]))


@pytest.mark.parametrize(("boxes", "box_format", "message"), [
    ([[4, 2, 20, 10], [20, 2, 4, 10]], "xyxy", r"row 1 \(img1.png\): box \[20, 2, 4, 10\] has no area"),
    ([[0.1, 0.1, 0.5, 0.5]], "xyxy", "less than a pixel wide: normalized coordinates\\? set data.box_format=xyxy_normalized"),
    ([[4, 2, 20, 10]], "xyxy_normalized", "lies outside \\[0, 1\\]: pixel coordinates\\? set data.box_format=xyxy"),
    ([[4, 2, 60, 10]], "xyxy", "lies outside the 40x20 image"),
    ([[1, 2, 3]], "xyxy", r"row 0 \(img0.png\): \[1, 2, 3\] is not a box"),
    ([None], "xyxy", "no row has a box"),
])
def test_bad_boxes_name_the_row(tmp_path, boxes, box_format, message):
    with pytest.raises(DataError, match=message):
        ground_truth_boxes(boxes_rows(tmp_path, boxes), len(boxes), "boxes", box_format)


def test_learned_boxes_are_scored_against_the_best_matching_box():
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
                       [[0.0, 0.0, 1.0, 1.0], [float("nan")] * 4],
                       [[float("nan")] * 4] * 2])
    learned = torch.tensor([[0.5, 0.5, 1.0, 0.9], [0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0]])
    expected = (0.2 / 0.25 + 0.5) / 2  # image 0: its second box; image 1: the only one; image 2: none, left out
    assert mean_matched_iou(learned, gt) == pytest.approx(expected)
    single = gt[:2, 0]  # one box per image: the plain pairwise IoU, as for the built-in set
    assert mean_matched_iou(learned[:2], single) == pytest.approx(float(pairwise_box_iou(learned[:2], single).mean()))
    rows, objects = single_objects(gt)
    assert rows.tolist() == [1] and objects.tolist() == [[0.0, 0.0, 1.0, 1.0]]


# -- input mistakes ------------------------------------------------------------------------------------


def test_mistakes_in_the_data_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    """Through the CLI: a missing folder (with and without ./) never reaches the Hub; an empty folder, one
    with nothing decodable and a bad box column are one line each, exit code 2, no run folder."""
    from hub_ccrop import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "notes", ["a.txt"])
    (tmp_path / "broken").mkdir()
    for k in range(3):
        (tmp_path / "broken" / f"{k}.jpg").write_bytes(b"not a jpeg")
    write_table(tmp_path / "pq" / "train.parquet", {"img": [image_bytes(k) for k in range(3)],
                                                    "boxes": [[1, 1, 4, 4], [3, 3, 2, 2], [0, 0, 5, 5]]})
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    cases = [
        (["data.dataset=./no_such_dir"], "data.dataset: folder ./no_such_dir does not exist"),
        (["data.dataset=no_such_dir"], "data.dataset: unknown dataset 'no_such_dir'"),
        (["data.dataset=empty"], "holds no images and no parquet files"),
        (["data.dataset=notes"], "has neither parquet files nor images (found a.txt)"),
        (["data.dataset=./broken"], "none of the 3 images of dataset 'broken' can be read"),
        (["data.dataset=./pq", "data.box_column=nope"], "data.box_column: dataset 'pq' has no column 'nope'"),
        (["data.dataset=./pq", "data.box_column=boxes"], "data.box_column 'boxes', row 1: box [3, 3, 2, 2] has no area"),
        (["data.dataset=./pq", "data.box_format=yolo"], "data.box_format: 'yolo' is not one of xyxy"),
    ]
    for overrides, message in cases:
        argv = ["train", str(recipe), "--output-dir", str(tmp_path / "run")]
        code = cli.main([*argv, *(a for o in overrides for a in ("--set", o))])
        err = capsys.readouterr().err.strip()  # (the box check follows datasets' own progress bar)
        lines = [line for line in err.splitlines() if not line.startswith("Generating train split")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (overrides, err)
        assert "Traceback" not in err and not (tmp_path / "run").exists()


# -- training on own data ------------------------------------------------------------------------------


def own_recipe(dataset: Path, *overrides: str):
    """The quickstart recipe on a folder, shrunk to a few 16 px steps (the README's CPU command)."""
    from hub_ccrop.recipe import load_recipe

    small = ["data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=2", "train.knn_k=5",
             "crop.warmup_epochs=1", "crop.loc_interval=1", "train.show_images=2", "train.log_every=1"]
    return load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml",
                       [f"data.dataset={dataset}", *small, *overrides])


def test_unlabeled_folder_trains_a_couple_of_steps(tmp_path, capsys):
    """A flat folder of mixed-size photos: the start line says the kNN monitor is off; training, a pass
    and its picture, the backbone and the boxes all happen, and no kNN number is made up."""
    from hub_ccrop.training import train

    photos = write_images(tmp_path / "photos", [f"{k:02d}.jpg" for k in range(12)], size=(40, 30))
    write_images(photos, [f"{k:02d}.png" for k in range(12, 16)], size=(24, 36))
    metrics = train(own_recipe(photos, "train.max_steps=3"), tmp_path / "run")
    out = capsys.readouterr().out
    assert f"data {photos}: 16 images without labels (no class subfolders): the kNN monitor is off" in out
    assert metrics == {"stopped_at_step": 3}  # epoch 1 (2 steps), then a pass; stopped inside epoch 2
    assert (tmp_path / "run" / "boxes.parquet").is_file() and list((tmp_path / "run" / "pictures").glob("*.png"))


def test_chance_level_keeps_its_digits():
    from hub_ccrop.recipe import load_recipe
    from hub_ccrop.training.report import summary

    metrics = {"wall_seconds": 60, "train_images_per_s": 10, "knn_top1": 3.0, "knn_chance": 100 / 200,
               "skipped_images": 0}
    assert "(chance 0.5%)" in summary(load_recipe({}), metrics, Path("run"))
    assert "(chance 10%)" in summary(load_recipe({}), {**metrics, "knn_chance": 10.0}, Path("run"))


@pytest.mark.slow
def test_own_folder_end_to_end_to_a_timm_export(tmp_path, capsys):
    """96 unlabeled images to an export that loads in timm; class subfolders with the user's boxes report
    kNN (on the automatic hold-out) and the boxes' IoU."""
    import timm

    from hub_ccrop.hub import export_run
    from hub_ccrop.training import train

    photos = write_images(tmp_path / "photos", [f"{k:03d}.jpg" for k in range(96)], size=(40, 30))
    metrics = train(own_recipe(photos, "data.batch_size=16"), tmp_path / "run")
    assert "knn_top1" not in metrics and metrics["epochs"] == 2
    model = timm.create_model(f"local-dir:{export_run(tmp_path / 'run', tmp_path / 'export')}", pretrained=True)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 128)

    labeled = tmp_path / "labeled"
    for cls in ("a", "b"):
        write_images(labeled, [f"{cls}/{k:02d}.png" for k in range(20)], size=(40, 30))
    names = sorted(str(p.relative_to(labeled)) for p in labeled.rglob("*.png"))
    write_table(tmp_path / "pq" / "train.parquet", {
        "image": [{"bytes": (labeled / n).read_bytes(), "path": n} for n in names],
        "label": [int(n.startswith("b")) for n in names],
        "boxes": [[[4, 3, 30, 20], [0, 0, 10, 10]] if k % 2 else [[4, 3, 30, 20]] for k in range(len(names))],
    })
    metrics = train(own_recipe(tmp_path / "pq", "data.box_column=boxes"), tmp_path / "run2")
    out = capsys.readouterr().out
    assert "every 10th image (4 images, train[9::10])" in out and metrics["knn_chance"] == 50
    assert 0 <= metrics["box_iou"] <= 1 and "learned boxes vs ground truth" in out


@pytest.mark.slow  # an interpreter start and the loopback Hub
def test_hub_dataset_without_labels(tmp_path):
    """``ORG/NAME`` on the (loopback) Hub with one image column named anything and no label column."""
    import os
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_server import FakeHub

    buf = io.BytesIO()
    pq.write_table(pa.table({"picture": [{"bytes": image_bytes(k), "path": None} for k in range(6)],
                             "caption": list("abcdef")}), buf)
    script = ("from hub_ccrop.data import get_spec, load_images\nfrom hub_ccrop.data.resolve import resolve_spec\n"
              "spec, note = resolve_spec(get_spec('test-user/photos'))\n"
              "print(spec.image_column, spec.label_column, len(load_images(spec)))\nprint(note)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with FakeHub() as hub:
        hub.add_files("test-user/photos", {"data/train-00000-of-00001.parquet": buf.getvalue()})
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found, note = result.stdout.strip().splitlines()[-2:]
    assert found == "picture None 6"
    assert note.startswith("data test-user/photos: 6 images without labels (no label column (columns: picture, caption))")

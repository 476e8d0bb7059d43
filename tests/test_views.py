"""The collate stage: per-image vs batched distributions, bad inputs, persistent workers, eval, device-resident."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hub_ccrop.boxes import BoxTable
from hub_ccrop.data import BadImageError, BadImageWarning, DatasetSpec, get_spec, load_images
from hub_ccrop.synthetic import small_objects_dir
from hub_ccrop.views import (
    BatchedViewAugment,
    CropSampler,
    DeviceResidentImages,
    EncodedBatch,
    EvalCollate,
    RawBatch,
    ViewCollate,
)

NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
NO_COLOR = {"flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0}
P_MIN = 1e-3  # fixed seeds: these tests are deterministic; the threshold only says "same distribution"


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def rows_of(data: bytes, n: int, start: int = 0) -> list[dict]:
    return [{"id": start + k, "image": {"bytes": data, "path": None}, "label": k % 3} for k in range(n)]


def ramp_image(width: int = 64, height: int = 48) -> bytes:
    """R encodes the column (4 per pixel), G the row (5 per pixel): a view's mean tells where it was cut."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = (np.arange(width) * 4)[None]
    arr[..., 1] = (np.arange(height) * 5)[:, None]
    arr[..., 2] = 60
    return encode(Image.fromarray(arr))


def both_paths(box_table=None, **kw) -> dict[str, ViewCollate]:
    return {
        "per_image": ViewCollate(box_table, batched=False, **kw),
        "batched": ViewCollate(box_table, batched=True, **kw),
    }


def run_views(collate: ViewCollate, rows: list[dict], seed: int, batch: int = 250) -> torch.Tensor:
    torch.manual_seed(seed)
    out = []
    for k in range(0, len(rows), batch):
        v1, v2 = collate(rows[k : k + batch]).crops
        out += [v1, v2]
    return torch.cat(out)


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import stats  # imported where used: 1.5 s that a test worker without these tests saves

    return stats.ks_2samp(a.numpy(), b.numpy()).pvalue


def quantize(x: torch.Tensor) -> torch.Tensor:
    """The per-image path ends in uint8 PIL images: compare at that resolution."""
    return torch.round(x * 255) / 255


# -- basics ----------------------------------------------------------------------------------------


def random_jpeg(seed: int, size=(32, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize("batched", [False, True])
def test_two_views_shapes_ids_labels(batched):
    rows = [{"id": 100 + k, "image": {"bytes": random_jpeg(k), "path": None}, "label": k} for k in range(10)]
    c = ViewCollate(None, size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), batched=batched)
    views = c(rows)
    (v1, v2), ids, labels = views.crops, views.ids, views.labels
    assert v1.shape == v2.shape == (10, 3, 24, 24) and v1.dtype == torch.float32
    assert ids.tolist() == list(range(100, 110)) and labels.tolist() == list(range(10))
    assert torch.isfinite(v1).all() and not torch.equal(v1, v2)
    assert -3.0 < float(v1.mean()) < 3.0


def test_raw_batch_then_augment_on_the_device_side():
    rows = [{"id": k, "image": {"bytes": random_jpeg(k), "path": None}, "label": 0} for k in range(6)]
    c = ViewCollate(None, size=16, raw=True, **NO_NORM)
    raw = c(rows)
    assert isinstance(raw, RawBatch) and raw.images.dtype == torch.uint8 and raw.images.shape == (6, 3, 32, 32)
    assert raw.crops.shape == (2, 6, 4) and raw.sizes.tolist() == [[32, 32]] * 6
    moved = raw.to("cpu")
    assert isinstance(moved, RawBatch)
    v1, v2 = c.augment(moved, torch.Generator().manual_seed(0))[0]
    w1, w2 = c.augment(moved, torch.Generator().manual_seed(0))[0]
    assert v1.shape == (6, 3, 16, 16) and torch.equal(v1, w1) and torch.equal(v2, w2)


def test_from_spec_and_modes():
    spec = get_spec("imagenet1k")
    c = ViewCollate.from_spec(spec, None, batched=True)
    assert c.groups[0].size == 224 and c.augment.groups[0].blur and c.augment.groups[0].kernel_size == 23 and c.max_side == 640
    small = ViewCollate.from_spec(get_spec("cifar10"), BoxTable(4), alpha=0.1)
    assert small.groups[0].size == 32 and not small.augment.groups[0].blur and small.max_side is None and small.mode == "rcrop"
    small.mode = "ccrop"
    assert small.crops.mode == "ccrop"
    with pytest.raises(ValueError, match="mode must be"):
        small.mode = "random"
    with pytest.raises(ValueError, match="needs a box table"):
        c.mode = "ccrop"


# -- same distributions on both paths -------------------------------------------------------------


def test_crop_geometry_is_exact_on_both_paths():
    """Each view's mean of the ramp image is the center of its crop rectangle (both paths)."""
    rows = rows_of(ramp_image(), 40)
    table = BoxTable(40)
    table.update(torch.arange(40), torch.tensor([[0.1, 0.2, 0.5, 0.9]]).repeat(40, 1))
    for name, c in both_paths(table, size=16, alpha=0.5, mode="ccrop", **NO_NORM, **NO_COLOR).items():
        torch.manual_seed(5)
        sizes = torch.tensor([[48, 64]]).repeat(40, 1)
        crops = c.crops(torch.arange(40), sizes)  # the draws the collate makes first
        torch.manual_seed(5)
        v1, v2 = c(rows).crops
        views = torch.cat([v1, v2])
        i, j, h, w = crops.reshape(-1, 4).to(torch.float64).unbind(1)
        exp_x = (j + w / 2 - 0.5) * 4 / 255
        exp_y = (i + h / 2 - 0.5) * 5 / 255
        # per image: uint8 rounding + PIL edge handling; batched: the uint8 resize rounds each pixel
        tol = 2.5 / 255 if name == "per_image" else 0.5 / 255 + 1e-4
        assert torch.allclose(views[:, 0].mean((1, 2)).double(), exp_x, atol=tol), name
        assert torch.allclose(views[:, 1].mean((1, 2)).double(), exp_y, atol=tol), name


def test_crop_position_and_size_distributions_match():
    rows = rows_of(ramp_image(), 750)
    table = BoxTable(750)
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(750, 2, generator=g) * 0.6
    table.update(torch.arange(750), torch.cat([lo, lo + 0.1 + 0.3 * torch.rand(750, 2, generator=g)], 1))
    views = {name: run_views(c, rows, seed=k) for k, (name, c) in enumerate(
        both_paths(table, size=16, alpha=0.3, mode="ccrop", **NO_NORM, **NO_COLOR).items())}  # fmt: skip
    a, b = views["per_image"], views["batched"]
    for channel in (0, 1):  # crop center x, y
        assert ks(a[:, channel].mean((1, 2)), b[:, channel].mean((1, 2))) > P_MIN
    for channel in (0, 1):  # crop extent (spread of the ramp inside the view)
        assert ks(a[:, channel].std((1, 2)), b[:, channel].std((1, 2))) > P_MIN


def test_flip_and_grayscale_rates_match():
    from scipy import stats

    rows = rows_of(ramp_image(), 1000)
    kw = {"size": 16, **NO_NORM, "jitter_p": 0.0}
    counts = {}
    for k, (name, c) in enumerate(both_paths(**kw).items()):
        v = run_views(c, rows, seed=10 + k)
        gray = (v[:, 0] - v[:, 1]).abs().amax((1, 2)) < 1e-6
        color = v[~gray]
        flipped = (color[:, 0, :, -1] - color[:, 0, :, 0]).mean(1) < 0  # red ramp runs right to left
        counts[name] = (int(gray.sum()), len(v), int(flipped.sum()), len(color))
        assert stats.binomtest(counts[name][0], len(v), 0.2).pvalue > P_MIN, name
        assert stats.binomtest(counts[name][2], len(color), 0.5).pvalue > P_MIN, name
    (g1, n1, f1, m1), (g2, n2, f2, m2) = counts.values()
    assert stats.fisher_exact([[g1, n1 - g1], [g2, n2 - g2]]).pvalue > P_MIN
    assert stats.fisher_exact([[f1, m1 - f1], [f2, m2 - f2]]).pvalue > P_MIN


def test_color_jitter_distribution_is_torchvisions():
    """The batched path draws ColorJitter exactly like torchvision's per-image transform (tensor images)."""
    from scipy import stats
    from torchvision import transforms as T

    color = torch.tensor([200, 100, 50]).view(3, 1, 1) / 255
    rows = rows_of(encode(Image.new("RGB", (32, 32), (200, 100, 50))), 1000)
    batched = ViewCollate(None, size=16, batched=True, **NO_NORM, flip_p=0.0, gray_p=0.0)
    ours = run_views(batched, rows, seed=20).mean((2, 3))
    jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    torch.manual_seed(21)
    reference = torch.stack([jitter(color.expand(3, 16, 16).clone()).mean((1, 2)) for _ in range(2000)])
    for channel in range(3):
        assert ks(ours[:, channel], reference[:, channel]) > P_MIN, channel
    for v in (ours, reference):  # RandomApply(p=0.8): about 20% of the views keep the color
        kept = int(((v - color.view(3)).abs() < 0.5 / 255).all(1).sum())
        assert stats.binomtest(kept, len(v), 0.2).pvalue > P_MIN


def test_per_image_pil_jitter_is_within_pil_rounding():
    """PIL works in uint8 between ops (and in 256 hue steps): torchvision's own PIL and tensor
    ColorJitter differ by ~4 levels on average (up to ~13). The per-image (PIL) path stays that close."""
    rows = rows_of(encode(Image.new("RGB", (32, 32), (200, 100, 50))), 1000)
    kw = {"size": 16, **NO_NORM, "flip_p": 0.0, "gray_p": 0.0}
    means = {name: run_views(c, rows, seed=22 + k).mean((2, 3)) for k, (name, c) in enumerate(
        both_paths(**kw).items())}  # fmt: skip
    a, b = means["per_image"], means["batched"]
    deciles = np.linspace(0.1, 0.9, 9)
    for channel in range(3):
        gap = np.abs(np.quantile(a[:, channel], deciles) - np.quantile(b[:, channel], deciles))
        assert gap.max() < 12 / 255, (channel, gap * 255)
        assert abs(float(a[:, channel].std() - b[:, channel].std())) < 4 / 255


def test_batched_jitter_ops_are_torchvisions_tensor_ops():
    from torchvision.transforms import functional as TF

    from hub_ccrop.views import ops as V

    x = torch.rand(8, 3, 12, 12)
    x[0] = 0.5  # gray pixels: hue undefined
    x[1, :, :3] = torch.tensor([0.2, 0.7, 0.7]).view(3, 1, 1)  # ties between channels
    f = torch.linspace(0.6, 1.4, 8)
    h = torch.linspace(-0.5, 0.5, 8)
    pairs = [(V.adjust_brightness, TF.adjust_brightness, f), (V.adjust_contrast, TF.adjust_contrast, f),
             (V.adjust_saturation, TF.adjust_saturation, f), (V.adjust_hue, TF.adjust_hue, h)]  # fmt: skip
    for ours, theirs, factors in pairs:
        expected = torch.stack([theirs(x[k], float(factors[k])) for k in range(8)])
        assert torch.allclose(ours(x.clone(), factors), expected, atol=1e-4), ours.__name__
    sigma = torch.linspace(0.1, 2.0, 8)
    expected = torch.stack([TF.gaussian_blur(x[k], [5, 5], [float(sigma[k])] * 2) for k in range(8)])
    assert torch.allclose(V.gaussian_blur(x, sigma, 5), expected, atol=1e-5)
    assert torch.allclose(V.gray(x), TF.rgb_to_grayscale(x), atol=1e-6)
    assert torch.equal(V.solarize(x), TF.solarize(x, 0.5))


def test_blur_has_no_denormal_taps_and_matches_torchvision():
    """An impulse's blur is the kernel: taps that would be denormal (sigma 0.3-0.8 at 23 taps; ~10x slower
    products on x86) are zero, every other value is torchvision's."""
    from torchvision.transforms import functional as TF

    from hub_ccrop.views import ops as V

    impulse = torch.zeros(4, 1, 33, 33)
    impulse[:, :, 16, 16] = 1.0
    sigma = torch.tensor([0.3, 0.45, 0.6, 0.8])
    ours = V.gaussian_blur(impulse, sigma, 23)
    theirs = torch.stack([TF.gaussian_blur(impulse[k], [23, 23], [float(sigma[k])] * 2) for k in range(4)])
    assert (theirs[theirs != 0].abs() < torch.finfo(torch.float32).tiny).any()  # torchvision's are there
    assert not ((ours != 0) & (ours.abs() < torch.finfo(torch.float32).tiny)).any()
    kept = ours != 0
    assert torch.allclose(ours[kept], theirs[kept], rtol=1e-5, atol=1e-9)
    assert (theirs[~kept].abs() < V.NEGLIGIBLE_TAP).all()


def test_per_image_blur_draws_and_rounds_like_torchvision():
    """GaussianBlurPIL: torchvision's sigma draw (the RNG ends where torchvision's does) and its uint8
    result, up to a rounding tie."""
    from torchvision import transforms as T

    from hub_ccrop.views.collate import GaussianBlurPIL

    rng = np.random.default_rng(0)
    for seed in range(6):
        img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        expected = np.asarray(T.GaussianBlur(5, (0.1, 2.0))(img)).astype(int)
        after_theirs = torch.rand(1)
        torch.manual_seed(seed)
        got = np.asarray(GaussianBlurPIL(5, (0.1, 2.0))(img)).astype(int)
        assert torch.equal(torch.rand(1), after_theirs)
        assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 0.01


def test_blur_distributions_match():
    board = np.indices((32, 32)).sum(0) % 2 * 255
    rows = rows_of(encode(Image.fromarray(np.stack([board] * 3, -1).astype(np.uint8))), 600)
    kw = {"size": 32, **NO_NORM, **NO_COLOR, "blur": True, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    spread = {name: quantize(run_views(c, rows, seed=30 + k)).std((1, 2, 3)) for k, (name, c) in enumerate(
        both_paths(**kw).items())}  # fmt: skip
    assert ks(spread["per_image"], spread["batched"]) > P_MIN
    for s in spread.values():  # p=0.5 blur (a sigma near 0.1 barely changes the board)
        blurred = int((s < 0.45).sum())
        assert 0.35 < blurred / len(s) < 0.55


def test_cpu_grouped_ops_equal_the_accelerator_masked_ops():
    aug = BatchedViewAugment(16, **NO_NORM, blur=True)
    x = torch.rand(80, 3, 16, 16)
    p = aug.sample(80, x.device, torch.Generator().manual_seed(1))
    masked = aug._color_masked(x.clone(), p)
    order, bounds = aug._grouping(p)
    grouped = aug._color_grouped(x.index_select(0, order), {k: v[order] for k, v in p.items()}, bounds)
    assert torch.allclose(grouped.index_select(0, torch.argsort(order)), masked, atol=1e-5)


# -- bad input -------------------------------------------------------------------------------------


def bad_and_odd_rows() -> tuple[list[dict], set[int]]:
    good = random_jpeg(0)
    rgb = Image.new("RGB", (40, 30), (200, 100, 50))
    values = {
        0: good,
        1: good[: len(good) // 2],  # truncated
        2: bytes(np.random.default_rng(3).integers(0, 255, 300, dtype=np.uint8)),  # not an image
        3: encode(rgb.convert("L")),
        4: encode(rgb.convert("LA")),
        5: encode(rgb.convert("RGBA")),
        6: encode(rgb.convert("P")),
        7: encode(Image.fromarray(np.full((30, 40), 40000, np.uint16))),  # 16-bit
        8: encode(Image.new("RGB", (8, 8), "red")),  # smaller than the view
        9: encode(Image.new("RGB", (1000, 10), "blue")),  # extreme aspect ratios
        10: encode(Image.new("RGB", (10, 1000), "green")),
    }
    return [{"id": k, "image": {"bytes": v, "path": f"img_{k}.png"}, "label": k} for k, v in values.items()], {1, 2}


@pytest.mark.parametrize("path", ["per_image", "batched", "raw"])
def test_bad_images_are_skipped_named_and_counted(path):
    rows, bad = bad_and_odd_rows()
    c = ViewCollate(None, size=24, **NO_NORM, batched=path != "per_image", raw=path == "raw")
    with pytest.warns(BadImageWarning) as record:
        out = c(rows)
    messages = " ".join(str(w.message) for w in record)
    assert all(f"sample id {k}" in messages and f"img_{k}.png" in messages for k in bad)
    assert c.skipped.value == 2 and int(c.skipped) == 2
    good = [k for k in range(11) if k not in bad]
    if path == "raw":
        assert out.ids.tolist() == good and out.images.shape[2:] == (1000, 1000)  # edge-padded to the largest
        v1, v2 = c.augment(out)[0]
        ids = out.ids
    else:
        (v1, v2), ids, labels = out.crops, out.ids, out.labels
        assert labels.tolist() == good
    assert ids.tolist() == good and v1.shape == v2.shape == (9, 3, 24, 24)
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()


def test_padding_never_leaks_into_views():
    rows = [
        {"id": 0, "image": {"bytes": encode(Image.new("RGB", (10, 200), (0, 128, 0))), "path": None}, "label": 0},
        {"id": 1, "image": {"bytes": encode(Image.new("RGB", (200, 10), (0, 0, 255))), "path": None}, "label": 0},
    ]
    c = ViewCollate(None, size=12, batched=True, **NO_NORM, **NO_COLOR)
    for _ in range(5):
        v1, v2 = c(rows).crops
        for v in (v1, v2):
            assert torch.allclose(v[0], torch.tensor([0.0, 128 / 255, 0.0]).view(3, 1, 1).expand(3, 12, 12), atol=1e-5)
            assert torch.allclose(v[1], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 12, 12), atol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_strict_mode_raises_with_the_id(batched):
    rows, _ = bad_and_odd_rows()
    c = ViewCollate(None, size=24, **NO_NORM, batched=batched, strict=True)
    with pytest.raises(BadImageError, match=r"sample id 1: cannot decode image \(img_1.png\)"):
        c(rows)


def test_all_bad_batch_is_empty_not_a_crash():
    rows = [{"id": 5, "image": {"bytes": b"junk", "path": None}, "label": 0}]
    for batched in (False, True):
        c = ViewCollate(None, size=8, **NO_NORM, batched=batched)
        with pytest.warns(BadImageWarning, match="sample id 5"):
            out = c(rows)
            (v1, _), ids = out.crops, out.ids
        assert v1.shape == (0, 3, 8, 8) and ids.numel() == 0


# -- persistent workers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_objects(tmp_path_factory):
    folder = small_objects_dir(tmp_path_factory.mktemp("so"), train=48, test=8, size=32)
    return get_spec("small_objects", data_dir=str(folder), image_size=16)


def test_persistent_workers_follow_box_updates_and_mode_switch(small_objects):
    ds = load_images(small_objects)
    table = BoxTable(len(ds))
    collate = ViewCollate.from_spec(small_objects, table, alpha=1.0, raw=True)
    loader = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True, collate_fn=collate)

    def epoch_crops() -> torch.Tensor:
        return torch.cat([raw.crops.reshape(-1, 4) for raw in loader])

    first = epoch_crops()
    assert (first[:, :2] > 0).any()  # RandomResizedCrop: crops everywhere
    table.update(torch.arange(len(ds)), torch.tensor([[0.0, 0.0, 0.02, 0.02]]).repeat(len(ds), 1))
    second = epoch_crops()  # box update alone changes nothing in rcrop mode
    assert (second[:, :2] > 0).any()
    collate.mode = "ccrop"  # set in the main process, seen by the running workers
    third = epoch_crops()
    assert (third[:, :2] == 0).all()  # every crop now hugs the top-left box
    collate.mode = "rcrop"
    assert (epoch_crops()[:, :2] > 0).any()
    assert collate.skipped.value == 0


def test_skip_counter_is_shared_by_workers():
    rows = rows_of(random_jpeg(1), 16) + [{"id": 16, "image": {"bytes": b"bad", "path": None}, "label": 0}]
    rows += [{"id": 17, "image": {"bytes": b"worse", "path": None}, "label": 0}]
    collate = ViewCollate(None, size=8, **NO_NORM, batched=True)
    loader = DataLoader(rows, batch_size=3, num_workers=2, collate_fn=collate)
    seen = [int(i) for views in loader for i in views.ids]
    assert sorted(seen) == list(range(16)) and collate.skipped.value == 2


# -- evaluation and device-resident mode -----------------------------------------------------------


def test_eval_collate_native_and_imagenet_like():
    arr = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    rows = rows_of(encode(Image.fromarray(arr)), 3) + [{"id": 9, "image": b"??", "label": 1}]
    spec = DatasetSpec(name="native", data_dir=".", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.warns(BadImageWarning, match="sample id 9"):
        x, ids, labels = EvalCollate(spec)(rows)
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert x.shape == (3, 3, 32, 32) and torch.allclose(x[0], expected, atol=1e-5) and ids.tolist() == [0, 1, 2]
    big = rows_of(encode(Image.fromarray(arr).resize((48, 40))), 2)
    assert EvalCollate(spec)(big)[0].shape == (2, 3, 32, 32)  # off-size images are resized to the native size

    inet = get_spec("imagenet1k")
    rows = rows_of(ramp_image(64, 48), 1)
    classify, _, _ = EvalCollate(inet.replace(**NO_NORM), purpose="classify")(rows)
    localize, _, _ = EvalCollate(inet.replace(**NO_NORM), purpose="localize")(rows)
    assert classify.shape == localize.shape == (1, 3, 224, 224)
    # resize(256) + center crop keeps the middle columns; localize keeps the whole image
    assert classify[0, 0, :, 0].mean() > localize[0, 0, :, 0].mean() + 0.05
    assert abs(localize[0, 0].mean() - 126 / 255) < 0.01
    with pytest.raises(ValueError):
        EvalCollate(inet, purpose="train")


def test_device_resident_batches_cover_every_id(small_objects):
    ds = load_images(small_objects)
    resident = DeviceResidentImages(ds, "cpu")
    assert len(resident) == 48 and resident.images.dtype == torch.uint8 and resident.images.shape[1:] == (3, 32, 32)
    crops = CropSampler(BoxTable(48), alpha=0.1)
    augment = BatchedViewAugment(16, small_objects.mean, small_objects.std)
    assert resident.num_batches(8, world_size=2) == 3
    seen = []
    for rank in range(2):
        for raw in resident.iter_batches(8, crops, epoch=1, seed=3, rank=rank, world_size=2):
            assert isinstance(raw, RawBatch) and raw.crops.shape == (2, 8, 4)
            v1, v2 = augment(raw)
            assert v1.shape == (8, 3, 16, 16)
            seen += raw.ids.tolist()
    assert len(seen) == len(set(seen)) == 48
    order0 = [r.ids.tolist() for r in resident.iter_batches(8, crops, epoch=0, seed=3)]
    order1 = [r.ids.tolist() for r in resident.iter_batches(8, crops, epoch=1, seed=3)]
    assert order0 != order1 and len(order0) == 6
    resumed = [r.ids.tolist() for r in resident.iter_batches(8, crops, epoch=0, seed=3, start_batch=4)]
    assert resumed == order0[4:]
    prepare = EvalCollate(small_objects).prepare  # 32 px images -> the 16 px eval input
    evaluated = [(x, ids) for rank in range(2) for x, ids, _ in resident.iter_eval(10, prepare, rank=rank, world_size=2)]
    assert sorted(i for _, ids in evaluated for i in ids.tolist()) == list(range(48))
    x, ids = evaluated[0]
    decoded, _, _ = EvalCollate(small_objects)([ds[i] for i in ids.tolist()])  # the rows' own eval batch
    assert x.shape == (10, 3, 16, 16) and torch.allclose(x, decoded, atol=1e-5)
    crops.mode = "ccrop"
    raw = next(resident.iter_batches(8, crops, seed=3))
    assert raw.crops.shape == (2, 8, 4)


def test_device_resident_rejects_mixed_sizes_and_skips_bad_images():
    rows = rows_of(random_jpeg(0), 4) + [{"id": 4, "image": b"x", "label": 0}]
    with pytest.warns(BadImageWarning, match="sample id 4"):
        resident = DeviceResidentImages(rows)
    assert len(resident) == 4 and resident.skipped.value == 1
    rows.append({"id": 5, "image": random_jpeg(1, (20, 32)), "label": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(ValueError, match="sample id 5 has size"):
            DeviceResidentImages(rows)


@pytest.mark.parametrize("size", [16, 40, 72])
def test_crop_resize_matches_its_reference_on_every_strategy(size):
    """size 40/72 (images up to 2x the view): roi_align over the whole float batch (72: every crop fits
    the view, computed by grid_sample); size 16: each image converted over the union of its views, each
    view torchvision's antialiased resized_crop, resized in uint8 on a CPU."""
    from torchvision.ops import roi_align
    from torchvision.transforms import functional as TF

    from hub_ccrop.views import stack_padded

    g = torch.Generator().manual_seed(0)
    shapes = [(40, 64), (64, 40), (23, 71), (64, 64), (9, 9), (50, 31)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    padded, sizes = stack_padded(images)
    crops = CropSampler(None)(torch.arange(len(shapes)), sizes, generator=g)
    crops[0, 0] = torch.tensor([0, 0, 40, 64])  # a whole image: the union touches every border
    order = torch.randperm(2 * len(shapes), generator=g)
    aug = BatchedViewAugment(size, **NO_NORM)
    if size > 16:
        i, j, h, w = crops.reshape(-1, 4).float().unbind(1)
        rois = torch.stack([torch.arange(len(shapes)).repeat(2).float(), j, i, j + w, i + h], dim=1)
        expected = roi_align(padded.float(), rois, output_size=(size, size), sampling_ratio=-1, aligned=True)
    else:
        expected = torch.stack([TF.resized_crop(images[b].float(), *crops[v, b].tolist(), [size, size], antialias=True)
                                for v in range(2) for b in range(len(shapes))])  # fmt: skip
    expected = expected / 255
    # size 16 resizes the uint8 pixels: within one grey level (the vectorized kernel's fixed-point weights)
    atol = 1e-5 if size > 16 else 1 / 255
    assert torch.allclose(aug.crop_resize(padded, crops), expected, atol=atol)
    assert torch.allclose(aug.crop_resize(padded, crops, order), expected[order], atol=atol)


# -- decoding on the device (nvJPEG on CUDA; here a CPU stand-in decoder is injected) -----------------


class FlakyDeviceDecoder:
    """Stands in for nvJPEG: torchvision's CPU decode_jpeg, except that it refuses ``refused`` images
    and, like nvJPEG, fails the whole batched call when one image fails."""

    def __init__(self, refused: set[bytes]) -> None:
        self.refused, self.calls = refused, []

    def __call__(self, items, mode, device):
        from torchvision.io import decode_jpeg

        self.calls.append(len(items))
        if any(bytes(t.numpy()) in self.refused for t in items):
            raise RuntimeError("nvjpeg: unsupported")
        return [decode_jpeg(t, mode=mode).to(device) for t in items]


def test_decode_on_device_falls_back_to_the_cpu_per_image():
    from hub_ccrop.data import decode_on_device, decode_to_tensor

    good, refused = random_jpeg(0, (40, 30)), random_jpeg(1, (20, 24))
    big = random_jpeg(2, (96, 64))
    png = encode(Image.new("RGB", (7, 5), (1, 2, 3)))
    values = [good, {"bytes": refused, "path": "r.jpg"}, png, good[: len(good) // 2], b"junk", big]
    decoder = FlakyDeviceDecoder({refused})
    out = decode_on_device(values, list(range(10, 16)), "cpu", max_side=48, decoder=decoder)
    assert decoder.calls == [4, 1, 1, 1, 1]  # the batch of 4 JPEGs fails, then each alone
    assert torch.equal(out[0], decode_to_tensor(good))
    assert torch.equal(out[1], decode_to_tensor(refused))  # the device refused it: decoded on the CPU
    assert out[2].shape == (3, 5, 7) and out[2][:, 0, 0].tolist() == [1, 2, 3]  # not a JPEG: the CPU
    assert isinstance(out[3], BadImageError) and out[3].sample_id == 13  # truncated: neither decodes it
    assert isinstance(out[4], BadImageError) and "sample id 14" in str(out[4])
    assert out[5].shape == decode_to_tensor(big, max_side=48).shape == (3, 32, 48)  # shrunk to max_side
    decoder.calls.clear()
    assert all(isinstance(t, torch.Tensor) for t in decode_on_device([good, big], [0, 1], "cpu", decoder=decoder))
    assert decoder.calls == [2]  # a clean batch: one batched call


def test_device_decode_batches_equal_the_raw_path():
    rows = [{"id": k, "image": {"bytes": random_jpeg(k, (32 + 4 * k, 40)), "path": None}, "label": k} for k in range(6)]
    rows.append({"id": 6, "image": {"bytes": b"\xff\xd8\xff broken", "path": "bad.jpg"}, "label": 0})
    raw_collate = ViewCollate(None, size=16, raw=True, **NO_NORM)
    encoded_collate = ViewCollate(None, size=16, device_decode=True, **NO_NORM)
    torch.manual_seed(0)
    with pytest.warns(BadImageWarning, match="sample id 6"):
        raw = raw_collate(rows)
    torch.manual_seed(0)
    with pytest.warns(BadImageWarning, match="sample id 6"):  # the header is already unreadable
        encoded = encoded_collate(rows)
    assert isinstance(encoded, EncodedBatch) and encoded.ids.tolist() == list(range(6))
    decoded = encoded_collate.decode_on(encoded, "cpu", decoder=FlakyDeviceDecoder(set()))
    for a, b in zip(raw, decoded, strict=True):
        assert torch.equal(a, b)
    views = [c.augment(batch, torch.Generator().manual_seed(1)) for c, batch in ((raw_collate, raw), (encoded_collate, decoded))]
    assert all(torch.equal(a, b) for a, b in zip(*views, strict=True))
    # an image whose header reads but whose data the device and the CPU both reject: skipped there
    truncated = random_jpeg(9, (128, 128))
    truncated = truncated[: len(truncated) // 2]
    late = encoded_collate([{"id": 9, "image": truncated, "label": 0}, *rows[:2]])
    with pytest.warns(BadImageWarning, match="sample id 9"):
        out = encoded_collate.decode_on(late, "cpu", decoder=FlakyDeviceDecoder(set()))
    assert out.ids.tolist() == [0, 1] and out.crops.shape == (2, 2, 4) and encoded_collate.skipped.value == 2

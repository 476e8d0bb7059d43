"""The built-in small-objects dataset: 10 shape classes on quiet, cluttered backgrounds.

Each image holds one salient object (saturated, bright) on a low-saturation, low-contrast background
with clutter. Saturated high-contrast backgrounds make a network learn the background instead of the
object (docs/METHOD.md, section 7), so the background is kept quiet on purpose. Objects share one narrow
color band, independent of the class: a per-image random object hue was the cheapest cue that tells
two images apart, so SimCLR learned color instead of shape (kNN 17% after 6 epochs; one color band,
bigger objects and a quieter background: 24% after 4, benchmarks/README.md "Quickstart (issue 13)").
Images are a pure function of ``(style, seed, index, size)``;
``gt_box`` is the object's tight box ``(x0, y0, x1, y1)`` in [0, 1] (pixel column ``c`` covers
``[c / W, (c + 1) / W]``).

Two styles differ only in object size (:data:`STYLES`): ``"quickstart"`` (tight box 10-40% of the
image, the default and the ``small_objects`` spec) and ``"hard"`` (5-30%, ``small_objects_hard``).
Random crops miss the object in both (``crop.object_miss_rate``), more often in ``"hard"``.

``get_spec("small_objects")`` reads a cached parquet copy (train: 4,000 images seed 0, test: 1,000
images seed 1) generated on first use under ``$HUB_CCROP_CACHE`` (default ``~/.cache/hub_ccrop``).
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "STYLES", "Style", "cache_root", "make_small_objects", "render_small_object", "small_objects_dir",
    "small_objects_hard_dir",
]  # fmt: skip

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "diamond", "bar", "l_shape", "hexagon")


@dataclass(frozen=True)
class Style:
    """What makes the set easy or hard; ranges are sampled uniformly per image."""

    area_range: tuple[float, float] = (0.10, 0.40)  # fraction of the image covered by the object's tight box
    clutter_items: tuple[int, int] = (8, 20)
    background_value: tuple[float, float] = (0.40, 0.50)
    background_saturation: tuple[float, float] = (0.0, 0.08)
    object_hue: tuple[float, float] = (0.08, 0.16)  # one color band (amber) for every class


STYLES = {"quickstart": Style(), "hard": Style(area_range=(0.05, 0.30))}
GENERATOR_VERSION = 2  # bump when the images change: cached copies are keyed by it
TRAIN_IMAGES, TEST_IMAGES = 4000, 1000
TRAIN_SEED, TEST_SEED = 0, 1


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], variant: int) -> None:
    """Fill ``shape`` inscribed in ``box`` (x0, y0, x1, y1, pixel edges) with 255 on a mask."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    last = (x1 - 1, y1 - 1)  # PIL's rectangle/ellipse include the end coordinate
    if shape in ("circle", "ring"):
        draw.ellipse((x0, y0, *last), fill=255)
        if shape == "ring":
            t = 0.28 * min(w, h)
            draw.ellipse((x0 + t, y0 + t, x1 - 1 - t, y1 - 1 - t), fill=0)
    elif shape in ("square", "bar"):
        draw.rectangle((x0, y0, *last), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=255)
    elif shape == "cross":
        tw, th = w / 3, h / 3
        draw.rectangle((cx - tw / 2, y0, cx + tw / 2 - 1, y1 - 1), fill=255)
        draw.rectangle((x0, cy - th / 2, x1 - 1, cy + th / 2 - 1), fill=255)
    elif shape == "l_shape":
        tw, th = w / 3, h / 3
        vertical = (x0, y0, x0 + tw - 1, y1 - 1) if variant % 2 == 0 else (x1 - tw, y0, x1 - 1, y1 - 1)
        horizontal = (x0, y1 - th, x1 - 1, y1 - 1) if variant < 2 else (x0, y0, x1 - 1, y0 + th - 1)
        draw.rectangle(vertical, fill=255)
        draw.rectangle(horizontal, fill=255)
    elif shape in ("star", "hexagon"):
        k = 5 if shape == "star" else 6
        rx, ry = (w - 1) / 2, (h - 1) / 2
        points = []
        for m in range(2 * k if shape == "star" else k):
            radius = 1.0 if shape == "hexagon" or m % 2 == 0 else 0.42
            angle = -math.pi / 2 + m * math.pi / (k if shape == "star" else k / 2)
            points.append((cx - 0.5 + rx * radius * math.cos(angle), cy - 0.5 + ry * radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int, style: Style) -> Image.Image:
    """A quiet, cluttered background: low saturation, low contrast."""
    hue, sat, val = rng.random(), rng.uniform(*style.background_saturation), rng.uniform(*style.background_value)
    img = Image.new("RGB", (size, size), _hsv(hue, sat, val))
    draw = ImageDraw.Draw(img)
    u = rng.random((int(rng.integers(*style.clutter_items)), 9))  # one draw for all clutter items
    for kind, dh, ds, dv, x, y, w, h, t in u:
        color = _hsv(hue + 0.16 * (dh - 0.5), sat * (0.5 + ds), val + 0.16 * (dv - 0.5))
        x, y = x * (size + 4) - 4, y * (size + 4) - 4
        w, h = 2 + w * size / 5, 2 + h * size / 5
        if kind < 0.25:
            draw.ellipse((x, y, x + w, y + h), fill=color)
        elif kind < 0.5:
            draw.rectangle((x, y, x + w, y + h), fill=color)
        elif kind < 0.75:
            draw.line((x, y, x + (2 * t - 1) * size / 3, y + (2 * dh - 1) * size / 3), fill=color, width=1)
        else:
            draw.polygon([(x, y), (x + w, y + t * h), (x + t * w, y + h)], fill=color)
    return img


def render_small_object(
    seed: int, index: int, size: int = 64, style: str | Style = "quickstart"
) -> tuple[Image.Image, int, list[float]]:
    """One image: ``(RGB image, label, gt_box)``, a pure function of ``(seed, index, size, style)``."""
    style = STYLES[style] if isinstance(style, str) else style
    rng = np.random.default_rng([seed, index, size])
    label = int(rng.integers(len(SHAPES)))
    shape = SHAPES[label]
    img = _background(rng, size, style)
    full = size * size
    low, high = style.area_range
    for _ in range(50):  # rejection: the *drawn* tight box must cover the style's area_range of the image
        area = rng.uniform(low, high) * full
        if shape == "bar":
            aspect = rng.uniform(2.5, 4.0) ** (1 if rng.random() < 0.5 else -1)
        elif shape in ("circle", "square", "ring"):
            aspect = 1.0
        else:
            aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        w = min(size - 1.0, math.sqrt(area * aspect))
        h = min(size - 1.0, math.sqrt(area / aspect))
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, (x0, y0, x0 + w, y0 + h), int(rng.integers(4)))
        m = np.asarray(mask) > 127
        cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
        if not len(cols):
            continue
        box = [cols[0] / size, rows[0] / size, (cols[-1] + 1) / size, (rows[-1] + 1) / size]
        frac = (box[2] - box[0]) * (box[3] - box[1])
        if low <= frac <= high:
            break
    else:  # pragma: no cover - the ranges above always admit a shape
        raise RuntimeError(f"could not place a {shape} in a {size}px image (seed {seed}, index {index})")
    # Salient object: saturated and bright, in the style's color band (the background is near gray).
    color = _hsv(rng.uniform(*style.object_hue), rng.uniform(0.65, 1.0), rng.uniform(0.85, 1.0))
    img.paste(Image.new("RGB", img.size, color), mask=mask)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0.0, 4.0, (size, size, 3)).round().astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB"), label, [float(v) for v in box]


def make_small_objects(num_images: int, *, size: int = 64, seed: int = 0, style: str | Style = "quickstart") -> Any:
    """A ``datasets.Dataset`` of ``num_images`` images: columns ``id, image`` (decoded to PIL on access),
    ``label, gt_box``; PNG-encoded, so what you read is exactly what was rendered."""
    from datasets import ClassLabel, Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    images, labels, boxes = [], [], []
    for index in range(num_images):
        img, label, box = render_small_object(seed, index, size, style)
        buffer = io.BytesIO()
        img.save(buffer, "PNG", compress_level=1)
        images.append({"bytes": buffer.getvalue(), "path": None})
        labels.append(label)
        boxes.append(box)
    features = Features({
        "id": Value("int64"), "image": ImageFeature(), "label": ClassLabel(names=list(SHAPES)),
        "gt_box": List(Value("float32"), length=4),
    })  # fmt: skip
    return Dataset.from_dict(
        {"id": list(range(num_images)), "image": images, "label": labels, "gt_box": boxes}, features=features
    )


def cache_root() -> Path:
    """``$HUB_CCROP_CACHE``, else ``$XDG_CACHE_HOME/hub_ccrop``, else ``~/.cache/hub_ccrop``."""
    if os.environ.get("HUB_CCROP_CACHE"):
        return Path(os.environ["HUB_CCROP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "hub_ccrop"


def small_objects_dir(
    root: str | os.PathLike | None = None,
    *,
    train: int = TRAIN_IMAGES,
    test: int = TEST_IMAGES,
    size: int = 64,
    style: str = "quickstart",
) -> Path:
    """A folder of Hub-style parquet files (``train-00000-of-00001.parquet``, ``test-...``), made once.

    Files are written atomically, so concurrent processes (several ranks) may all call this.
    """
    if style not in STYLES:
        raise ValueError(f"unknown small-objects style {style!r}: use one of {sorted(STYLES)}")
    folder = Path(root) if root is not None else cache_root()
    name = "small_objects" if style == "quickstart" else f"small_objects_{style}"
    folder = folder / f"{name}-v{GENERATOR_VERSION}-{size}px-{train}-{test}"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", train, TRAIN_SEED), ("test", test, TEST_SEED)):
        path = folder / f"{split}-00000-of-00001.parquet"
        if path.exists():
            continue
        tmp = folder / f".{path.name}.tmp{os.getpid()}"
        make_small_objects(count, size=size, seed=seed, style=style).to_parquet(str(tmp))
        os.replace(tmp, path)
    return folder


def small_objects_hard_dir(root: str | os.PathLike | None = None, **kwargs: Any) -> Path:
    """:func:`small_objects_dir` of the ``"hard"`` style (objects 5-30% of the image)."""
    return small_objects_dir(root, style="hard", **kwargs)

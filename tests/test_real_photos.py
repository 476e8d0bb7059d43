"""Real photos decode as they look (issue 24): EXIF orientation, odd modes, CMYK, 16-bit, size-capped huge
JPEGs; every decoder (PIL, tensor, header size, device batch) agrees. Images are generated, none committed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from hub_ccrop.data import decode_image, decode_on_device, decode_to_tensor, get_spec, image_size
from hub_ccrop.data.decode import _TRANSPOSE
from hub_ccrop.views import max_side_for

INVERSE = {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}  # EXIF orientation whose transpose undoes this one


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def with_orientation(img: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif, **kwargs)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(x: Image.Image | torch.Tensor) -> np.ndarray:
    return np.asarray(x) if isinstance(x, Image.Image) else x.permute(1, 2, 0).cpu().numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_photo_decodes_to_the_upright_pixels(orientation):
    upright = noise((24, 16))
    stored = upright if orientation == 1 else upright.transpose(_TRANSPOSE[INVERSE[orientation]])
    data = with_orientation(stored, "PNG", orientation)  # lossless: exactly the upright pixels back
    assert np.array_equal(pixels(decode_image(data)), np.asarray(upright))
    assert np.array_equal(pixels(decode_to_tensor(data)), np.asarray(upright))
    assert image_size(data) == (16, 24)

    jpeg = with_orientation(stored, "JPEG", orientation, quality=95)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg))).convert("RGB"))
    assert np.array_equal(pixels(decode_image(jpeg)), reference)
    fast = pixels(decode_to_tensor(jpeg))  # torchvision's libjpeg-turbo, oriented by us
    assert fast.shape == reference.shape and np.abs(fast.astype(int) - reference).max() <= 2
    device = decode_on_device([jpeg, {"bytes": jpeg, "path": "p.jpg"}], [0, 1], "cpu")  # the batched decoder
    assert all(np.array_equal(pixels(t), fast) for t in device)
    assert image_size(jpeg) == reference.shape[:2]


def test_rotated_huge_jpeg_is_capped_and_every_decoder_agrees_on_its_size():
    stored = noise((400, 200), seed=1)  # a landscape sensor image of a portrait photo: orientation 6
    jpeg = with_orientation(stored, "JPEG", 6, quality=90)
    assert image_size(jpeg, max_side=100) == (100, 50)
    assert decode_image(jpeg, max_side=100).size == (50, 100)
    assert decode_to_tensor(jpeg, max_side=100).shape == (3, 100, 50)
    assert decode_on_device([jpeg], [0], "cpu", max_side=100)[0].shape == (3, 100, 50)
    # awkward sizes: the decoded size is the header's, even when the JPEG is drafted to a rounded scale
    for size in ((4001, 3001), (2001, 999), (999, 2001), (1283, 641)):
        data = encode(Image.new("RGB", size, (90, 120, 30)), "JPEG")
        height, width = image_size(data, max_side=160)
        assert decode_image(data, max_side=160).size == (width, height) and max(width, height) == 160


def test_huge_jpeg_is_drafted_before_load_and_keeps_its_content(monkeypatch):
    yy, xx = np.mgrid[0:1500, 0:2000]
    smooth = np.stack([xx * 255 // 1999, yy * 255 // 1499, (xx + yy) * 255 // 3498], -1).astype(np.uint8)
    data = encode(Image.fromarray(smooth), "JPEG", quality=90)
    drafts = []
    draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: (draft(self, mode, size), drafts.append(self.size))[0])
    out = decode_image(data, max_side=200)
    assert out.size == (200, 150)
    assert drafts == [(250, 188)]  # DCT-domain decode at 1/8 scale (not 2000 x 1500 pixels)
    expected = np.asarray(Image.fromarray(smooth).resize((200, 150), Image.BILINEAR)).astype(int)
    assert np.abs(np.asarray(out).astype(int) - expected).mean() < 2


def test_16_bit_gradient_maps_to_the_right_8_bit_values():
    gradient = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(gradient), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = np.round(gradient / 257.0).astype(np.uint8)
    for decoded in (decode_image(data), decode_to_tensor(data)):
        out = pixels(decoded)
        assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 0], out[..., 2])
    dark = np.full((4, 4), 200, np.uint16)  # a dark 16-bit image stays dark (not read as 8-bit 200)
    assert pixels(decode_image(encode(Image.fromarray(dark), "PNG")))[0, 0, 0] == 1


def test_cmyk_jpeg_decodes_to_the_rgb_pil_gives():
    data = encode(noise((24, 16), seed=2).convert("CMYK"), "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(pixels(decode_image(data)), reference)
    assert np.array_equal(pixels(decode_to_tensor(data)), reference)
    assert np.array_equal(pixels(decode_on_device([data], [0], "cpu")[0]), reference)


def test_modes_mixed_in_one_batch_become_the_expected_rgb():
    gray = Image.new("L", (6, 4), 77)
    half = Image.new("LA", (6, 4), (0, 128))  # black, half transparent: on white -> 127
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    pal.info["transparency"] = 1
    rgba = Image.new("RGBA", (9, 3), (200, 100, 50, 255))
    values = [encode(gray, "PNG"), encode(half, "PNG"), encode(pal, "PNG", transparency=1),
              encode(rgba, "PNG"), encode(noise((5, 7)), "JPEG")]
    expected = [(77, 77, 77), (127, 127, 127), (255, 255, 255), (200, 100, 50)]
    out = decode_on_device(values, list(range(len(values))), "cpu")
    for k, rgb in enumerate(expected):
        assert tuple(out[k][:, 0, 0].tolist()) == rgb == decode_image(values[k]).getpixel((0, 0)), k
    assert [tuple(t.shape) for t in out] == [(3, 4, 6)] * 3 + [(3, 3, 9), (3, 7, 5)]


def test_own_photos_are_capped_and_the_small_registered_sets_are_not(tmp_path):
    assert max_side_for(get_spec(str(tmp_path))) == 640  # a folder of phone photos
    assert max_side_for(get_spec(str(tmp_path), image_size=512)) == 1024
    assert max_side_for(get_spec("imagenet1k")) == 640
    assert max_side_for(get_spec("cifar10")) is None and max_side_for(get_spec("small_objects")) is None
    assert max_side_for(get_spec("cifar10", data_dir=str(tmp_path))) is None  # a local copy of cifar10
    (tmp_path / "cifar10").mkdir()
    assert max_side_for(get_spec(str(tmp_path / "cifar10"))) == 640  # own photos, whatever the folder's name

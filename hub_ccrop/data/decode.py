"""Image decoding: any image value to RGB (PIL or uint8 tensors), on the CPU or batched on a device,
bad images reported by sample id."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class BadImageError(ValueError):
    """An image that cannot be decoded; names the sample id and the file when known."""

    def __init__(self, sample_id: Any, reason: str, path: str | None = None) -> None:
        where = f" ({path})" if path else ""
        super().__init__(f"sample id {sample_id}: cannot decode image{where}: {reason}")
        self.sample_id = sample_id
        self.path = path
        self.reason = reason


class BadImageWarning(UserWarning):
    """An image was skipped because it could not be decoded."""


def _open_image(value: Any) -> tuple[Image.Image, str | None]:
    if isinstance(value, Image.Image):
        return value, getattr(value, "filename", None) or None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return Image.open(io.BytesIO(data)), path
        if path:
            return Image.open(path), path
        raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(value))), None
    if isinstance(value, str | os.PathLike):
        return Image.open(value), os.fspath(value)
    if isinstance(value, torch.Tensor):  # CHW, like torchvision
        arr = value.detach().cpu().numpy()
        return _array_to_image(arr.transpose(1, 2, 0) if arr.ndim == 3 else arr), None
    if isinstance(value, np.ndarray):  # HWC or HW
        return _array_to_image(value), None
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def _array_to_image(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"array of shape {arr.shape} is not an image")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        arr = np.round(arr.astype(np.float32) / 257.0).clip(0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.round(arr.astype(np.float32) * scale).clip(0, 255).astype(np.uint8)
    else:
        arr = arr.clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit/int/float scaled to 8 bits, transparency composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        peak = arr.max(initial=0)
        if mode == "F" and peak <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif mode != "F" and (mode.startswith("I;16") or peak > 255):
            arr = arr / 257.0  # 16-bit range -> 8 bits
        return Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(value: Any, sample_id: Any = None, *, max_side: int | None = None) -> Image.Image:
    """Decode one image value (PIL, bytes, ``{"bytes", "path"}``, path, numpy/tensor) to an RGB PIL image.

    The EXIF orientation is applied (phone photos come upright); grayscale, palette, transparent, CMYK and
    16-bit images are converted; anything that cannot be decoded (truncated, not an image, empty) raises
    :class:`BadImageError` naming ``sample_id`` and the path. ``max_side`` shrinks images whose longer side
    is larger (JPEGs are decoded at reduced scale first) to exactly the size :func:`image_size` reports.
    """
    path = value.get("path") if isinstance(value, dict) else None
    try:
        img, path = _open_image(value)
        orientation = _orientation(img)
        target = _limited_size(_oriented(img.size, orientation), max_side)
        if target != _oriented(img.size, orientation) and img.format == "JPEG":
            img.draft("RGB", _oriented(target, orientation))  # DCT-domain downscale while decoding: much faster
        img.load()
        if img.width < 1 or img.height < 1:
            raise ValueError(f"empty image {img.size}")
        img = to_rgb(img)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        return img if target == img.size else img.resize(target, Image.BILINEAR)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported with the sample id
        raise BadImageError(sample_id, f"{type(err).__name__}: {err}", path) from err


def _limited_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


# EXIF orientation -> the PIL transpose that makes the image upright (as PIL.ImageOps.exif_transpose does).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright) from the image's header, without decoding the pixels.

    A PNG's EXIF counts only when it precedes the pixel data (where writers put it): reading one after the
    pixels would decode the image, and the header-only :func:`image_size` must agree with the decoders.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels are still good, keep them as stored
        return 1
    return orientation if orientation in _TRANSPOSE else 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """``(W, H)`` after the EXIF ``orientation`` (5-8 swap the sides); the inverse is the same swap."""
    return (size[1], size[0]) if orientation >= 5 else size


def _orient_tensor(img: Tensor, orientation: int) -> Tensor:
    """A ``[..., H, W]`` tensor made upright, pixel for pixel as :data:`_TRANSPOSE` does to a PIL image."""
    if orientation in (2, 3, 4):
        return img.flip({2: (-1,), 3: (-2, -1), 4: (-2,)}[orientation])
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def _jpeg_within(data: bytes, max_side: int | None) -> bool:
    """Whether JPEG bytes are decoded at full size (no ``max_side`` cap applies), from the header."""
    if max_side is None:
        return True
    try:
        return max(Image.open(io.BytesIO(data)).size) <= max_side
    except Exception:  # noqa: BLE001 - decode_image reports a broken file with its sample id
        return False


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation of JPEG bytes; no parsing at all for the common JPEG without EXIF."""
    if b"Exif" not in data:
        return 1
    try:
        return _orientation(Image.open(io.BytesIO(data)))
    except Exception:  # noqa: BLE001 - the decoder reports a broken file with its sample id
        return 1


_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_to_tensor(value: Any, sample_id: Any = None, *, max_side: int | None = None) -> Tensor:
    """Like :func:`decode_image` but returns a uint8 ``[3, H, W]`` tensor.

    JPEG bytes within ``max_side`` take torchvision's libjpeg-turbo decoder (no PIL round trip, about 2x
    faster; the EXIF orientation applied like :func:`decode_image`'s); everything else goes through
    :func:`decode_image`. Failures raise :class:`BadImageError` with the id.
    """
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, bytes | bytearray) and data[:3] == _JPEG_MAGIC and _jpeg_within(data, max_side):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return _orient_tensor(img, _jpeg_orientation(data))
        except RuntimeError as err:
            path = value.get("path") if isinstance(value, dict) else None
            raise BadImageError(sample_id, f"{type(err).__name__}: {err}", path) from err
    img = decode_image(value, sample_id, max_side=max_side)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def image_size(value: Any, sample_id: Any = None, *, max_side: int | None = None) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`decode_to_tensor` would return it (EXIF orientation and ``max_side``
    applied), from its header only (no decoding)."""
    path = value.get("path") if isinstance(value, dict) else None
    try:
        img, path = _open_image(value)
        width, height = _limited_size(_oriented(img.size, _orientation(img)), max_side)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - reported with the sample id, like a decoding failure
        raise BadImageError(sample_id, f"{type(err).__name__}: {err}", path) from err
    if width < 1 or height < 1:
        raise BadImageError(sample_id, f"empty image {(width, height)}", path)
    return height, width


def _jpeg_bytes(value: Any) -> bytes | None:
    data = value.get("bytes") if isinstance(value, dict) else value
    return bytes(data) if isinstance(data, bytes | bytearray) and data[:3] == _JPEG_MAGIC else None


def decode_on_device(
    values: Sequence[Any],
    ids: Sequence[Any],
    device: torch.device | str,
    *,
    max_side: int | None = None,
    decoder: Callable[..., Any] | None = None,
) -> list[Tensor | BadImageError]:
    """Decode a batch into uint8 ``[3, H, W]`` tensors on ``device``: the JPEGs in one batched call of
    ``decoder`` (default torchvision's ``decode_jpeg``, nvJPEG on CUDA), then, if that call fails, each
    JPEG alone, and any image the device cannot decode (not a JPEG, CMYK, corrupt) on the CPU with
    :func:`decode_to_tensor` (reduced-size JPEG decoding included). The EXIF orientation is applied and
    images larger than ``max_side`` are shrunk like the CPU path's. An image nothing decodes is returned as its :class:`BadImageError`.
    """
    if decoder is None:
        from torchvision.io import decode_jpeg as decoder
    from torchvision.io import ImageReadMode

    device = torch.device(device)
    out: list[Tensor | BadImageError | None] = [None] * len(values)
    jpegs = [k for k, v in enumerate(values) if _jpeg_bytes(v) is not None]
    if jpegs:
        data = [torch.frombuffer(bytearray(_jpeg_bytes(values[k])), dtype=torch.uint8) for k in jpegs]

        def device_decode(items: list[Tensor]) -> list[Tensor]:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                return decoder(items, mode=ImageReadMode.RGB, device=device)

        try:
            decoded: list[Tensor | None] = list(device_decode(data))
        except RuntimeError:  # one bad image fails the whole batch: retry one by one
            decoded = []
            for item in data:
                try:
                    decoded.append(device_decode([item])[0])
                except RuntimeError:
                    decoded.append(None)  # the CPU gets its turn below
        for k, img in zip(jpegs, decoded, strict=True):
            if img is not None:  # nvJPEG ignores EXIF: orient here, as the CPU decoders do
                out[k] = _shrink(_orient_tensor(img, _jpeg_orientation(_jpeg_bytes(values[k]))), max_side)
    for k, value in enumerate(values):
        if out[k] is None:
            try:
                out[k] = decode_to_tensor(value, ids[k], max_side=max_side).to(device, non_blocking=True)
            except BadImageError as err:
                out[k] = err
    return out


def _shrink(img: Tensor, max_side: int | None) -> Tensor:
    """``img`` resized (antialiased) so its longer side is at most ``max_side``."""
    height, width = img.shape[-2:]
    new_w, new_h = _limited_size((width, height), max_side)
    if (new_h, new_w) == (height, width):
        return img
    from torchvision.transforms import functional as TF

    return TF.resize(img, [new_h, new_w], antialias=True)

"""Pixels -> the config's channel count and square size, for image files and arrays alike.

Training images, reference images and ``export`` (which redraws removed instances) must be converted identically:
Pillow's grayscale and RGB conversions, a short-side resize with the ``resample`` filter, then a centre crop.
"""

from __future__ import annotations

import io

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .images import check_pixel_values

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def resample_filter(name: str) -> int:
    """Pillow's resampling filter for ``data.resample`` (lanczos, bicubic, bilinear, box, hamming, nearest)."""
    from PIL import Image

    return Image.Resampling[name.upper()]


def _channels_first(pixels: np.ndarray) -> np.ndarray:
    """One Pillow image's (H, W) or (H, W, C) pixels as (C, H, W)."""
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class Converter:
    """One image file -> (C, S, S) uint8, by the config's channels, size and filter."""

    def __init__(self, cfg: DataConfig) -> None:
        self.channels = cfg.channels
        self.size = cfg.image_size
        self.filter = resample_filter(cfg.resample)

    def __call__(self, raw: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            mode = self.channels_mode(img.mode)
            if img.mode.startswith("I"):  # 16-bit gray: scale to 8 bits (Pillow's convert would clip)
                gray16 = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(np.round(gray16 / 257.0), 0, 255).astype(np.uint8), mode="L")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert(mode)
            if self.size is not None:
                img = self.resize(img)
            return _channels_first(np.asarray(img, dtype=np.uint8))

    def channels_mode(self, mode: str) -> str:
        """The Pillow mode to convert to: fixed by ``channels``, else gray stays gray."""
        if self.channels is None:
            return "L" if mode in GRAY_MODES else "RGB"
        return "L" if self.channels == 1 else "RGB"

    def resize(self, img):  # noqa: ANN001, ANN201 - PIL images, imported lazily
        """Short side to ``size`` with the filter, then the central ``size`` x ``size`` square."""
        (width, height), side = img.size, self.size
        if (width, height) == (side, side):
            return img
        scale = side / min(width, height)
        new_width, new_height = max(side, round(width * scale)), max(side, round(height * scale))
        img = img.resize((new_width, new_height), self.filter)
        left, top = (new_width - side) // 2, (new_height - side) // 2
        return img.crop((left, top, left + side, top + side))


def channels_first(x: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4 -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), "
                        f"got {tuple(x.shape)}")
    first, last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
    if first and last:  # both could be channels: the layout whose images are square wins
        first = not (x.shape[1] == x.shape[2] and x.shape[2] != x.shape[3])
    if first:
        return x
    if last:
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"{source}: images of shape {tuple(x.shape)} have no channel axis of size 1, 3 or 4 "
                    "(first or last after N)")


def convert_array(x: np.ndarray, cfg: DataConfig, source: str) -> np.ndarray:
    """Channels and size of an (N, C, H, W) array by the config; uint8 stays uint8."""
    if x.shape[0] == 0 or min(x.shape[2:]) == 0:
        raise DataError(f"{source}: empty image array of shape {tuple(x.shape)}")
    check_pixel_values(x, source)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.uint8, copy=False)
    if x.shape[1] == 4:
        x = x[:, :3]  # alpha dropped, as Pillow's RGBA -> RGB
    if (cfg.channels or x.shape[1]) != x.shape[1]:
        x = _to_gray(x) if cfg.channels == 1 else np.repeat(x, 3, axis=1)
    if cfg.image_size is not None and tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size):
        x = _resize_array(x, cfg)
    return np.ascontiguousarray(x)


def _to_gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as Pillow's RGB -> L (integer rounding for uint8)."""
    if x.dtype == np.uint8:
        wide = x.astype(np.uint32)
        return ((wide[:, 0] * 19595 + wide[:, 1] * 38470 + wide[:, 2] * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].astype(x.dtype)


def _resize_array(x: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Each image through the same short-side resize and centre crop as image files."""
    from PIL import Image

    convert = Converter(cfg)
    out = np.empty((x.shape[0], x.shape[1], cfg.image_size, cfg.image_size), dtype=x.dtype)
    for i, img in enumerate(x):
        if x.dtype == np.uint8:
            pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            out[i] = _channels_first(np.asarray(convert.resize(pil)))
        else:  # float channels one at a time in Pillow's 32-bit float mode
            for channel in range(img.shape[0]):
                pil = Image.fromarray(img[channel].astype(np.float32), mode="F")
                out[i, channel] = np.asarray(convert.resize(pil))
    return out

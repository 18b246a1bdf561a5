"""Shared steps of the image loaders: array checks, scaling to [-1, 1], resizing, seeded splits.

The array loaders (digits, mnist, npz) return float64 (N, C, H, W) tensors in [-1, 1], the range of the
generator's tanh output; ``image_files`` shares the checks and counts but keeps uint8.
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import DataError, GancleanseWarning
from .base import MAX_LABEL, Splits, permutation, row_keys


def check_images(x: np.ndarray, source: str) -> np.ndarray:
    """Validate an (N, H, W) or (N, C, H, W) pixel array; return it as (N, C, H, W), a view: ``to_tensor``
    later copies only the images a split keeps to float64."""
    if x.ndim == 4 and x.shape[1] > 4 and x.shape[3] <= 4:
        raise DataError(f"{source}: images of shape {tuple(x.shape)} look channels-last; store them as (N, C, H, W)")
    if x.ndim not in (3, 4):
        raise DataError(f"{source}: expected images of shape (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    x = x[:, None] if x.ndim == 3 else x
    if x.shape[0] == 0 or min(x.shape[1:]) == 0:
        raise DataError(f"{source}: empty image array of shape {tuple(x.shape)}")
    check_pixel_values(x, source)
    return x


def check_pixel_values(x: np.ndarray, source: str) -> None:
    """Integer pixels in 0..255; float pixels finite (a warning when outside [-1, 1]); no other dtype."""
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer pixels must lie in 0..255, found {lo}..{hi}")
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{source}: image array contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 or hi > 1.0:
            warnings.warn(f"{source}: float pixels outside [-1, 1] (range {lo:.3g}..{hi:.3g}) are "
                          "used as they are; a generator ending in tanh cannot reach them",
                          GancleanseWarning, stacklevel=4)
    else:
        raise DataError(f"{source}: image array has dtype {x.dtype}; use uint8 (0..255) or float")


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Checked pixels -> float64 tensor; integers 0..255 are mapped linearly onto [-1, 1]."""
    pixels = np.array(x, dtype=np.float64)
    return torch.from_numpy(pixels / 127.5 - 1.0 if np.issubdtype(x.dtype, np.integer) else pixels)


def as_labels(y: np.ndarray, n: int, source: str) -> torch.Tensor:
    """Integer class labels in 0 .. MAX_LABEL - 1, one per image, as int64 (checked before any conversion:
    2**70 as a float would wrap around silently)."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{source}: labels must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    outside = np.flatnonzero((y < 0) | (y >= MAX_LABEL))
    if outside.size:
        i = int(outside[0])
        raise DataError(f"{source}: label {int(y[i])} of row {i} is outside 0..{MAX_LABEL - 1}")
    return torch.from_numpy(y.astype(np.int64))


def npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the header of a .npy stream, which is left at the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def check_npz_members(path: Path, archive: zipfile.ZipFile) -> None:
    """Every member of an .npz must be an array of numbers (``export`` copies them all), checked from the headers
    alone: an object array or a member that is no array is refused by name. A damaged member is left to the
    reader that loads it (its message names the damage)."""
    for member in archive.namelist():
        name = member.removesuffix(".npy")
        try:
            if not member.endswith(".npy"):
                raise ValueError("no .npy member")
            with archive.open(member) as f:
                dtype = npy_header(f)[2]
        except ValueError as e:
            raise DataError(f"{path}: member {name!r} is not a NumPy array ({e}); save the file with "
                            "numpy.savez") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error):
            continue
        if dtype.hasobject:
            raise DataError(f"{path}: the array {name!r} holds Python objects (dtype {dtype}); store numeric "
                            "arrays only")


def resize(x: torch.Tensor, size: int | None, clamp: bool = True) -> torch.Tensor:
    """Bilinear resize to size x size; clamping keeps scaled pixels inside [-1, 1] after rounding."""
    if size is None or tuple(x.shape[2:]) == (size, size):
        return x
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp(-1.0, 1.0) if clamp else out


def check_counts(cfg: DataConfig, keys: tuple[str, ...], available: int, what: str) -> None:
    """Raise a DataError naming the keys when they ask for more instances than exist."""
    wanted = sum(getattr(cfg, k) for k in keys)
    if wanted > available:
        terms = " + ".join(f"data.{k} = {getattr(cfg, k)}" for k in keys)
        total = f" = {wanted}" if len(keys) > 1 else ""
        raise DataError(f"{terms}{total} exceeds the {available} images available in {what}")


def split_counts(cfg: DataConfig, available: int, what: str) -> tuple[int, int, int]:
    """(n_train, n_valid, n_test); an unset n_train takes every instance not in valid or test."""
    if cfg.n_train is not None:
        check_counts(cfg, ("n_train", "n_valid", "n_test"), available, what)
        return cfg.n_train, cfg.n_valid, cfg.n_test
    check_counts(cfg, ("n_valid", "n_test"), available, what)
    if available - cfg.n_valid - cfg.n_test < 1:
        raise DataError(f"data.n_valid = {cfg.n_valid} + data.n_test = {cfg.n_test} leaves no training "
                        f"instance of the {available} in {what}")
    return available - cfg.n_valid - cfg.n_test, cfg.n_valid, cfg.n_test


def take(x: np.ndarray, idx: torch.Tensor, size: int | None) -> torch.Tensor:
    """The images at ``idx`` as float64, resized; clamped only when the data was scaled here."""
    return resize(to_tensor(x[idx.numpy()]), size, clamp=np.issubdtype(x.dtype, np.integer))


def split_indices(cfg: DataConfig, n: int, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train / valid / test indices into ``n`` images, cut from the ``data.seed`` permutation."""
    n_train, n_valid, n_test = split_counts(cfg, n, what)
    perm = permutation(n, cfg.seed)
    end_valid = n_train + n_valid
    return perm[:n_train], perm[n_train:end_valid], perm[end_valid:end_valid + n_test]


def seeded_split(cfg: DataConfig, x: np.ndarray, y: torch.Tensor | None, what: str) -> Splits:
    """Permute with ``data.seed`` and cut train / valid / test from checked pixels ``x``."""
    parts = split_indices(cfg, x.shape[0], what)
    ys = [None] * 3 if y is None else [y[i] for i in parts]
    return Splits(*(take(x, i, cfg.image_size) for i in parts), *ys, keys=row_keys(parts))

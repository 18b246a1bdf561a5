"""MNIST from files the user already has: the four IDX files (optionally gzipped) or an .npz.

Nothing is downloaded. As in the paper, train and valid are cut from a ``data.seed``
permutation of the 60k training file and the test split is the first ``n_test`` images
of the official 10k test file. An .npz holding ``x_train, y_train, x_test, y_test`` is
split the same way; one holding only ``x`` and ``y`` gets a seeded three-way split.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from .base import Splits
from .images import as_labels, check_counts, check_images, permutation, seeded_split, take
from .npz import read_npz, require_path

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_GZIP = b"\x1f\x8b"


def find_idx(directory: Path, name: str) -> Path:
    """``name`` or ``name.gz`` in ``directory`` (also the ``train-images.idx3-ubyte`` spelling)."""
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (directory / candidate).is_file():
            return directory / candidate
    raise DataError(f"MNIST file not found: {directory / name} (nor {name}.gz); data.path must be "
                    "a directory holding the four IDX files or an .npz file")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read MNIST file ({e.strerror or e})") from None
    if raw[:2] != _GZIP:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e})") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file of unsigned bytes, checked against its magic number and declared size."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(f"{path}: wrong magic number {found} (expected {magic} for IDX {kind}); "
                        "not an MNIST file of that kind")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file (header needs {header} bytes, file has {len(data)})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = math.prod(dims)  # exact: np.prod wraps around in int64 (2**31 * 2**31 * 4 == 0)
    body = len(data) - header
    if body != size:
        what = "truncated" if body < size else "has trailing bytes"
        raise DataError(f"{path}: {what}: header declares shape {tuple(dims)} = {size} bytes of data, "
                        f"file holds {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _pair(directory: Path, which: str) -> tuple[np.ndarray, np.ndarray, str]:
    xf, yf = find_idx(directory, FILES[f"{which}_x"]), find_idx(directory, FILES[f"{which}_y"])
    x, y = read_idx(xf, IMAGES_MAGIC), read_idx(yf, LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{xf} holds {x.shape[0]} images but {yf} holds {y.shape[0]} labels")
    return check_images(x, str(xf)), y, str(xf)


def _paper_split(cfg: DataConfig, train: tuple[np.ndarray, np.ndarray, str],
                 test: tuple[np.ndarray, np.ndarray, str]) -> Splits:
    """Train + valid from the seeded permutation of the training images; test from the head of the test images."""
    (x, y, x_name), (xt, yt, xt_name) = train, test
    same = x.shape[1:] == xt.shape[1:] if cfg.image_size is None else x.shape[1] == xt.shape[1]
    if not same:  # every split must fit the one model (image_size resizes height and width only)
        raise DataError(f"{xt_name} holds images of shape {tuple(xt.shape[1:])} but {x_name} holds "
                        f"{tuple(x.shape[1:])}; the training and test images must have the same shape")
    n_train = cfg.n_train if cfg.n_train is not None else x.shape[0] - cfg.n_valid
    check_counts(dataclasses.replace(cfg, n_train=max(n_train, 1)), ("n_train", "n_valid"), x.shape[0], x_name)
    check_counts(cfg, ("n_test",), xt.shape[0], xt_name)
    perm = permutation(x.shape[0], cfg.seed)
    tr, va = perm[:n_train], perm[n_train:n_train + cfg.n_valid]
    te = torch.arange(cfg.n_test)
    y_t, yt_t = as_labels(y, x.shape[0], x_name), as_labels(yt, xt.shape[0], xt_name)
    s = cfg.image_size
    keys = {"train": [f"train#{int(i)}" for i in tr], "valid": [f"train#{int(i)}" for i in va],
            "test": [f"test#{int(i)}" for i in te]}
    return Splits(take(x, tr, s), take(x, va, s), take(xt, te, s), y_t[tr], y_t[va], yt_t[te], keys=keys)


def mnist(cfg: DataConfig) -> Splits:
    """MNIST from ``data.path``: an IDX directory or an .npz file."""
    path = require_path(cfg)
    if path.is_dir():
        return _paper_split(cfg, _pair(path, "train"), _pair(path, "test"))
    if not path.exists():
        raise DataError(f"data.path not found: {path} (expected the MNIST IDX directory or an .npz file)")
    arrays = read_npz(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = []
        for which in ("train", "test"):
            name = f"{path}:x_{which}"
            x = check_images(arrays[f"x_{which}"], name)
            parts.append((x, arrays[f"y_{which}"], name))
        return _paper_split(cfg, parts[0], parts[1])
    if {"x", "y"} <= arrays.keys():
        x = check_images(arrays["x"], f"{path}:x")
        return seeded_split(cfg, x, as_labels(arrays["y"], x.shape[0], f"{path}:y"), str(path))
    raise DataError(f"{path}: an MNIST .npz needs arrays x and y, or x_train, y_train, x_test and "
                    f"y_test (found: {', '.join(sorted(arrays)) or 'none'})")

"""MNIST from files the user already has: the four IDX files (optionally gzipped) or an .npz.

Nothing is downloaded. As in the paper, train and valid are cut from a ``data.seed`` permutation of the 60k
training file and the test split is the first ``n_test`` images of the official 10k test file. An .npz
holding ``x_train, y_train, x_test, y_test`` is split the same way; one holding only ``x`` and ``y`` gets a
seeded three-way split.
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
from .base import Splits, permutation
from .images import as_labels, check_counts, check_images, seeded_split, take
from .npz import read_npz, require_path

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # (images, labels)
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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
    if raw[:2] != b"\x1f\x8b":  # not gzip-compressed
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
        raise DataError(f"{path}: wrong magic number {found} (expected {magic} for IDX "
                        f"{'images' if magic == IMAGES_MAGIC else 'labels'}); not an MNIST file of that kind")
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


def _idx_pair(directory: Path, which: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(checked images, labels, images file name) of the ``train`` or ``test`` IDX files."""
    images_file, labels_file = (find_idx(directory, name) for name in FILES[which])
    x, y = read_idx(images_file, IMAGES_MAGIC), read_idx(labels_file, LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{images_file} holds {x.shape[0]} images but {labels_file} holds {y.shape[0]} labels")
    return check_images(x, str(images_file)), y, str(images_file)


def _paper_split(cfg: DataConfig, train: tuple[np.ndarray, np.ndarray, str],
                 test: tuple[np.ndarray, np.ndarray, str]) -> Splits:
    """Train + valid from the seeded permutation of the training images; test from the head of the test images."""
    (train_x, train_y, train_name), (test_x, test_y, test_name) = train, test
    same = train_x.shape[1:] == test_x.shape[1:] if cfg.image_size is None else train_x.shape[1] == test_x.shape[1]
    if not same:  # every split must fit the one model (image_size resizes height and width only)
        raise DataError(f"{test_name} holds images of shape {tuple(test_x.shape[1:])} but {train_name} holds "
                        f"{tuple(train_x.shape[1:])}; the training and test images must have the same shape")
    n_train = cfg.n_train if cfg.n_train is not None else train_x.shape[0] - cfg.n_valid
    check_counts(dataclasses.replace(cfg, n_train=max(n_train, 1)), ("n_train", "n_valid"),
                 train_x.shape[0], train_name)
    check_counts(cfg, ("n_test",), test_x.shape[0], test_name)
    perm = permutation(train_x.shape[0], cfg.seed)
    train_rows, valid_rows = perm[:n_train], perm[n_train:n_train + cfg.n_valid]
    test_rows = torch.arange(cfg.n_test)
    train_labels = as_labels(train_y, train_x.shape[0], train_name)
    test_labels = as_labels(test_y, test_x.shape[0], test_name)
    size = cfg.image_size
    keys = {"train": [f"train#{int(i)}" for i in train_rows], "valid": [f"train#{int(i)}" for i in valid_rows],
            "test": [f"test#{int(i)}" for i in test_rows]}
    return Splits(take(train_x, train_rows, size), take(train_x, valid_rows, size), take(test_x, test_rows, size),
                  train_labels[train_rows], train_labels[valid_rows], test_labels[test_rows], keys=keys)


def mnist(cfg: DataConfig) -> Splits:
    """MNIST from ``data.path``: an IDX directory or an .npz file."""
    path = require_path(cfg)
    if path.is_dir():
        return _paper_split(cfg, _idx_pair(path, "train"), _idx_pair(path, "test"))
    if not path.exists():
        raise DataError(f"data.path not found: {path} (expected the MNIST IDX directory or an .npz file)")
    arrays = read_npz(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = []
        for which in ("train", "test"):  # no comprehension: its frame would shift the warnings' stacklevel
            name = f"{path}:x_{which}"
            parts.append((check_images(arrays[f"x_{which}"], name), arrays[f"y_{which}"], name))
        return _paper_split(cfg, *parts)
    if {"x", "y"} <= arrays.keys():
        x = check_images(arrays["x"], f"{path}:x")
        return seeded_split(cfg, x, as_labels(arrays["y"], x.shape[0], f"{path}:y"), str(path))
    raise DataError(f"{path}: an MNIST .npz needs arrays x and y, or x_train, y_train, x_test and "
                    f"y_test (found: {', '.join(sorted(arrays)) or 'none'})")

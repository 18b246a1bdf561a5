"""A user's own images in a NumPy ``.npz`` file: array ``x`` of pixels, optional labels ``y``.

``x`` is (N, H, W) or (N, C, H, W). Integer pixels in 0..255 are scaled to [-1, 1]; float pixels are used
unchanged. The split is seeded by ``data.seed``.
"""

from __future__ import annotations

import dataclasses
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..integrity import sha256_file
from .base import Splits
from .images import as_labels, check_images, check_npz_members, seeded_split
from .source_check import row_hashes


def require_path(cfg: DataConfig) -> Path:
    """The ``data.path`` a file-based dataset needs, as a Path."""
    if not cfg.path:
        raise ConfigError(f"data.name = {cfg.name!r} needs data.path (the "
                          f"{'MNIST IDX directory or .npz file' if cfg.name == 'mnist' else '.npz file'})")
    return Path(cfg.path).expanduser()


def read_npz(path: Path) -> dict[str, Any]:
    """All arrays of an .npz file; a DataError naming the file if it cannot be read."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, not an .npz archive; save it with "
                            "numpy.savez(path, x=images, y=labels)")
        with loaded as f:
            check_npz_members(path, f.zip)
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):  # numpy hands back the raw bytes of a member that is no .npy
            raise DataError(f"{path}: member {k!r} is not a NumPy array ({len(v)} bytes without an "
                            ".npy header); save the file with numpy.savez")
    return arrays


def npz(cfg: DataConfig) -> Splits:
    """Seeded train / valid / test split of the arrays in ``data.path``."""
    path = require_path(cfg)
    arrays = read_npz(path)
    if "x" not in arrays:
        raise DataError(f"{path}: no array named 'x' (found: {', '.join(sorted(arrays)) or 'none'}); "
                        "store the images as x (and optional labels as y)")
    x = check_images(arrays["x"], f"{path}:x")
    y = as_labels(arrays["y"], x.shape[0], f"{path}:y") if "y" in arrays else None
    splits = seeded_split(cfg, x, y, str(path))
    # what export verifies the file against; no "digest": the fingerprint stays the one of the values
    source = {"format": "npz", "path": str(path.resolve()), "array": "x", "n_files": 1, "n_read": int(x.shape[0]),
              "skipped": [], "labels": "none" if y is None else "y", "label_names": None,
              "file_sha256": sha256_file(path), "rows": row_hashes(arrays["x"], arrays.get("y"))}
    return dataclasses.replace(splits, source=source)

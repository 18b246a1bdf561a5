"""scikit-learn's bundled handwritten digits: 1,797 labelled 8x8 images, no download needed.

Small enough for image-GAN tests and examples that run in seconds on a CPU; with ``data.image_size = 28``
they take the shape of MNIST and fit the paper's DCGAN.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DataConfig
from .base import Splits, row_keys
from .images import resize, split_indices

MAX_PIXEL = 16.0  # the bundled images count pen strokes in 0..16


def digits(cfg: DataConfig) -> Splits:
    """Seeded train / valid / test split of the digits, pixels scaled to [-1, 1], shape (N, 1, H, W)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64) / (MAX_PIXEL / 2) - 1.0)[:, None]
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    parts = split_indices(cfg, x.shape[0], "the scikit-learn digits")
    return Splits(*(resize(x[i], cfg.image_size) for i in parts), *(y[i] for i in parts), keys=row_keys(parts))

"""Training instances as feature rows, for the scorers that look at the data alone."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, GancleanseError
from ..run import Run
from ..specs import FEATURE_CHOICES


def instance_features(run: Run, features: str) -> np.ndarray:
    """The raw data (flattened), or the features of a feature space (``gancleanse.features``; "auto": the
    metrics' own), one row per instance."""
    if features == "raw":
        # Pixels as float32 (exact for 8-bit values, half the memory); float data as it is.
        dtype = torch.float32 if run.splits.train.dtype == torch.uint8 else torch.float64
        x = run.splits.split("train", dtype).reshape(run.n_train, -1).numpy()  # data on the host: sklearn
    elif features in FEATURE_CHOICES:
        from ..features import training_features

        x = training_features(run, features)
    else:
        raise ConfigError(f"unknown features {features!r} (available: raw, {', '.join(FEATURE_CHOICES)})")
    return check_rows(np.asarray(x, dtype=np.float64), features)


def check_rows(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim != 2 or x.shape[0] < 2:
        raise GancleanseError(f"{what} features: need a 2-D array of at least two instances, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise GancleanseError(f"{what} features contain NaN or infinite values")
    return x

"""Baseline scorers that do not look at the training dynamics: random and Isolation Forest.

Both return *harmfulness* (higher = removed first), so a study treats every scorer alike.
"""

from __future__ import annotations

import numpy as np

from ..errors import GancleanseError


def random_scores(n: int, seed: int) -> np.ndarray:
    """Seeded standard-normal draws: a removal order independent of the data."""
    return np.random.default_rng(seed).standard_normal(n)


def isolation_forest_scores(features: np.ndarray, seed: int, n_estimators: int = 100) -> np.ndarray:
    """Harmfulness = minus Isolation Forest's ``score_samples``: the most anomalous come first.

    ``features`` has one row per training instance (raw data flattened, or classifier features).
    """
    from sklearn.ensemble import IsolationForest

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise GancleanseError(f"isolation_forest needs a 2-D array of at least two instances, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise GancleanseError("isolation_forest: the instance features contain NaN or infinite values")
    forest = IsolationForest(n_estimators=n_estimators, random_state=seed).fit(x)
    return -forest.score_samples(x)

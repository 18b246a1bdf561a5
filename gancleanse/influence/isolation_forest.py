"""Isolation Forest: the most anomalous instances (shortest isolation paths) are removed first."""

from __future__ import annotations

import time
import numpy as np

from ..options import IsolationForestOptions
from ..run import Run
from ..scores import Scores
from .features import check_rows, instance_features


def isolation_forest_scores(features: np.ndarray, seed: int, n_estimators: int = 100) -> np.ndarray:
    """Harmfulness = minus Isolation Forest's ``score_samples`` of each row."""
    from sklearn.ensemble import IsolationForest

    x = check_rows(np.asarray(features, dtype=np.float64), "isolation_forest")
    return -IsolationForest(n_estimators=n_estimators, random_state=seed).fit(x).score_samples(x)


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, features: str = "raw",
          options: IsolationForestOptions | None = None) -> Scores:
    estimators = (options or IsolationForestOptions()).estimators
    started = time.perf_counter()
    harm = isolation_forest_scores(instance_features(run, features), seed, estimators)
    return Scores(metric, "isolation_forest", -harm, harm,
                  info={"features": features, "seed": seed, "estimators": estimators,
                        "seconds": time.perf_counter() - started})

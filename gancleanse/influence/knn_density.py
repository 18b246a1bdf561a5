"""kNN density: instances in the sparsest regions of the training data are removed first.

The density at x_j is estimated from r_k(j), its distance to the k-th nearest other training
instance (density ~ 1 / r_k^d); removing low-density instances is the usual instance
selection for GANs. Raw data for 2D, or the metric classifier's feature space for images.
"""

from __future__ import annotations

import time
import numpy as np

from ..errors import ConfigError
from ..options import KNNOptions
from ..run import Run
from ..scores import Scores
from .features import check_rows, instance_features


def kth_neighbor_distance(features: np.ndarray, k: int = KNNOptions().neighbors) -> np.ndarray:
    """Euclidean distance from each row to its k-th nearest other row."""
    from sklearn.neighbors import NearestNeighbors

    x = check_rows(np.asarray(features, dtype=np.float64), "knn_density")
    if not 1 <= k < len(x):
        raise ConfigError(f"knn_density: neighbors = {k} must be between 1 and {len(x) - 1} (instances - 1)")
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    # Each row finds itself at distance 0, so column k is the k-th *other* row (with exact
    # duplicates a twin may come first; both are then at distance 0 and the column is the same).
    return dist[:, k]


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, features: str = "raw",
          options: KNNOptions | None = None) -> Scores:
    neighbors = (options or KNNOptions()).neighbors
    started = time.perf_counter()
    r = kth_neighbor_distance(instance_features(run, features), neighbors)
    return Scores(metric, "knn_density", r, r,
                  info={"features": features, "neighbors": neighbors, "seconds": time.perf_counter() - started})

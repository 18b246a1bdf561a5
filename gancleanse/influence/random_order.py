"""Random: a seeded removal order independent of the data (the control every scorer must beat)."""

from __future__ import annotations

import time
import numpy as np

from ..options import NoOptions
from ..run import Run
from ..scores import Scores


def random_scores(n: int, seed: int) -> np.ndarray:
    """Seeded standard-normal draws."""
    return np.random.default_rng(seed).standard_normal(n)


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, options: NoOptions | None = None) -> Scores:
    started = time.perf_counter()
    harm = random_scores(run.n_train, seed)
    return Scores(metric, "random", harm, harm, info={"seed": seed, "seconds": time.perf_counter() - started})

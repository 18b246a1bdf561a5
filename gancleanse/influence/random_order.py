"""Random: a seeded removal order independent of the data (the control every scorer must beat)."""

from __future__ import annotations

import time
import numpy as np

from ..options import NoOptions
from ..run import Run
from ..scores import Scores


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, options: NoOptions | None = None) -> Scores:
    """Harmfulness: seeded standard-normal draws."""
    started = time.perf_counter()
    harm = np.random.default_rng(seed).standard_normal(run.n_train)
    return Scores(metric, "random", harm, harm, info={"seed": seed, "seconds": time.perf_counter() - started})

"""Random: a seeded removal order independent of the data (the control every scorer must beat)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..run import Run
from ..scores import Scores


def random_scores(n: int, seed: int) -> np.ndarray:
    """Seeded standard-normal draws."""
    return np.random.default_rng(seed).standard_normal(n)


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, **options: Any) -> Scores:
    _no_options("random", options)
    started = time.perf_counter()
    harm = random_scores(run.n_train, seed)
    return Scores(metric, "random", harm, harm, info={"seed": seed, "seconds": time.perf_counter() - started})


def _no_options(method: str, options: dict[str, Any]) -> None:
    if options:
        from ..errors import ConfigError

        raise ConfigError(f"{method} takes no options (got {', '.join(sorted(options))})")

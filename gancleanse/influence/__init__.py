"""Scorers: every way of ranking training instances, one module each, one signature::

    score(run, metric, *, seed=0, progress=True, **options) -> Scores

``itd`` and ``aid`` estimate how removing an instance changes ``metric``; the baselines rank
without it (``metric`` is then only recorded). The CLI, the API and the study all go through
``score`` below, so a new scorer is one module plus one line in ``SCORERS``.

Kept free of heavy imports: the config validates method names against ``METHODS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..run import Run
    from ..scores import Scores

FEATURES = ("raw", "classifier")


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer's name, its module, and what it ranks with.

    ``uses``: "metric" (one score file per scored metric), "features" (fitted on raw data, and
    on the metric classifier's features for image data) or "nothing".
    """

    name: str
    module: str
    uses: str
    summary: str


SCORERS: dict[str, ScorerSpec] = {s.name: s for s in (
    ScorerSpec("itd", "itd", "metric", "influence through the recorded training trajectory"),
    ScorerSpec("aid", "aid", "metric", "influence by implicit differentiation at the trained point"),
    ScorerSpec("isolation_forest", "isolation_forest", "features", "most anomalous first (Isolation Forest)"),
    ScorerSpec("knn_density", "knn_density", "features", "lowest density first (distance to the k-th neighbour)"),
    ScorerSpec("discriminator", "discriminator", "nothing", "least real to the trained discriminator first"),
    ScorerSpec("random", "random_order", "nothing", "a seeded random order"),
)}
METHODS = tuple(SCORERS)


def spec(method: str) -> ScorerSpec:
    from ..errors import ConfigError

    if method not in SCORERS:
        raise ConfigError(f"unknown method {method!r} (available: {', '.join(METHODS)})")
    return SCORERS[method]


def score(run: "Run", method: str, metric: str = "all", *, features: str | None = None,
          seed: int = 0, progress: bool = True, **options: Any) -> "Scores":
    """Score every training instance of ``run`` with ``method``.

    ``features`` ("raw" by default, or "classifier") only for feature scorers; other
    ``options`` go to the scorer (AID's solver options, ``neighbors`` for knn_density).
    """
    from ..config import METRICS
    from ..errors import ConfigError

    s = spec(method)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if s.uses == "features":
        features = features or "raw"
        if features not in FEATURES:
            raise ConfigError(f"unknown features {features!r} (available: {', '.join(FEATURES)})")
        options["features"] = features
    elif features is not None:
        raise ConfigError(f"features = {features!r} applies to isolation_forest and knn_density, not {method}")
    module = importlib.import_module(f"{__name__}.{s.module}")
    return module.score(run, metric, seed=seed, progress=progress, **options)


def variants(method: str, metrics: list[str] | tuple[str, ...], image_data: bool) -> list[str]:
    """What a study scores ``method`` with: each metric, each feature space, or nothing ("none")."""
    uses = spec(method).uses
    if uses == "metric":
        return list(metrics)
    if uses == "features":
        return ["raw", "classifier"] if image_data else ["raw"]
    return ["none"]


def variant_arguments(method: str, variant: str) -> dict[str, Any]:
    """``score`` keyword arguments of one study variant (see ``variants``)."""
    uses = spec(method).uses
    if uses == "metric":
        return {"metric": variant}
    if uses == "features":
        return {"metric": "all", "features": variant}
    return {"metric": "all"}

"""Scorers: every way of ranking training instances, one module each, one signature::

    module.score(run, metric, *, seed=0, progress=True, options=<its options dataclass>) -> Scores

``itd`` and ``aid`` estimate how removing an instance changes ``metric``; the baselines rank
without it (``metric`` is then only recorded). The CLI, the API and the study all go through
``score`` below. A new scorer is one module, an options dataclass in ``gancleanse.options``
and one entry in ``gancleanse.specs.SCORERS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..errors import ConfigError, NonFiniteError
from ..options import ScorerOptions
from ..specs import FEATURES, metric_spec, scorer_spec

if TYPE_CHECKING:
    from ..run import Run
    from ..scores import Scores


def score(run: "Run", method: str, metric: str = "all", *, features: str | None = None, seed: int = 0,
          progress: bool = True, options: "ScorerOptions | Mapping[str, Any] | None" = None,
          **option_values: Any) -> "Scores":
    """Score every training instance of ``run`` with ``method``: finite, keyed by instance, naming the run.
    ``features`` only for feature scorers: "raw" (default) or a feature space (``gancleanse.features``); ``options``: the scorer's
    options dataclass (``gancleanse.options``), a mapping of its fields, or its fields as keywords."""
    spec = scorer_spec(method)
    metric_spec(metric)
    if options is not None and option_values:
        raise ConfigError(f"{method}: give options either as options= or as keywords, not both")
    typed = spec.options.from_mapping(options if options is not None else option_values, scorer=method)
    kwargs: dict[str, Any] = {}
    if spec.uses == "features":
        kwargs["features"] = _scorer_features(run, features or "raw")
    elif features is not None:
        raise ConfigError(f"features = {features!r} applies to isolation_forest and knn_density, not {method}")
    module = importlib.import_module(f"{__name__}.{spec.module}")
    scores = module.score(run, metric, seed=seed, progress=progress, options=typed, **kwargs)
    check_finite(scores, run)
    scores.keys = run.train_keys
    scores.info["run_id"] = run.id
    _record_features(scores, run, spec.uses, kwargs.get("features"))
    return scores


def _scorer_features(run: "Run", features: str) -> str:
    """A feature scorer's features: "raw", or a feature space ("auto" resolved to the run's own)."""
    if features not in FEATURES:
        raise ConfigError(f"unknown features {features!r} (available: {', '.join(FEATURES)})")
    if features != "auto":
        return features
    from ..features import resolve

    choice = resolve(run)
    if choice is None:
        raise ConfigError(f"features = auto: data.name = {run.cfg.data.name!r} has no feature space (samples of "
                          f"shape {run.splits.sample_shape}); use features = raw")
    return choice.space


def _record_features(scores: "Scores", run: "Run", uses: str, features: str | None) -> None:
    """Which network the scores saw images through (space, file, sha256), so every number names its weights."""
    from ..features import describe, load_feature_model, metric_features

    if uses == "metric" and metric_spec(scores.metric).needs == "features":
        scores.info["metric_features"] = metric_features(run)
    elif uses == "features" and features not in (None, "raw"):
        scores.info["feature_model"] = describe(load_feature_model(run, features))


def check_finite(scores: "Scores", run: "Run") -> None:
    """NaN or infinity in an estimate is an error naming where it came from, never a score file."""
    vectors = {"influence": scores.influence, "harmfulness": scores.harmfulness,
               **{f"influence after {k} epoch(s) traced": v for k, v in scores.horizons.items()}}
    for what, v in vectors.items():
        bad = ~np.isfinite(np.asarray(v, dtype=np.float64))
        if bad.any():
            first = [int(i) for i in np.flatnonzero(bad)[:5]]
            raise NonFiniteError(f"{scores.method} {what} on {scores.metric} of run {run.path} has "
                                 f"{int(bad.sum())} non-finite value(s) (instances {first}); nothing was written")


def variants(method: str, metrics: list[str] | tuple[str, ...], space: str | None) -> list[str]:
    """What ``method`` is scored with: each metric, the raw data and the run's feature space ``space``
    (``Run.feature_space``; None: none), or nothing ("none")."""
    uses = scorer_spec(method).uses
    if uses == "features":
        return ["raw", space] if space else ["raw"]
    return list(metrics) if uses == "metric" else ["none"]


def variant_arguments(method: str, variant: str) -> dict[str, Any]:
    """``score`` keyword arguments of one variant (see ``variants``)."""
    uses = scorer_spec(method).uses
    if uses == "metric":
        return {"metric": variant}
    return {"metric": "all", "features": variant} if uses == "features" else {"metric": "all"}

"""GAN evaluation metrics, each a differentiable function of the training state.

``make_metric(name, run, split)`` binds a metric to a run's fixed evaluation latents and real split,
returning a callable ``state -> scalar tensor`` that ITD differentiates. Each name has one builder in
``BUILDERS``; what a metric is (label, direction, what it needs) lives in ``gancleanse.specs``.

``is``, ``log_is``, ``fid`` and ``kid`` see generated images through a frozen classifier (``classifier.py``:
trained on the run's labelled training split and cached in the run directory, or the TorchScript file
``metric.extractor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch

from ..errors import ConfigError, NonFiniteError
from .all_kde import average_log_likelihood

if TYPE_CHECKING:
    from ..run import Run
    from ..training.dynamics import Dynamics, State
    from .classifier import FeatureModel


@dataclass(frozen=True)
class Metric:
    """A scalar function of the training state (its direction: ``gancleanse.specs``)."""

    name: str
    split: str
    fn: Callable[["State"], torch.Tensor]

    def __call__(self, state: "State") -> torch.Tensor:
        return self.fn(state)

    def value(self, state: "State") -> float:
        """The metric as a number; NaN or infinity is an error, never a result."""
        with torch.no_grad():
            v = float(self.fn(state))
        if not math.isfinite(v):
            raise NonFiniteError(f"metric {self.name} on the {self.split} split evaluated to {v}")
        return v


@dataclass(frozen=True)
class MetricInputs:
    """What a metric is bound to: the run, the split's reals and the split's fixed latents and labels."""

    name: str
    run: "Run"
    split: str
    real: torch.Tensor
    z: torch.Tensor
    c: torch.Tensor | None
    dynamics: "Dynamics"

    def generate(self, state: "State") -> torch.Tensor:
        """The generated samples the metric sees (the generator average when there is one)."""
        return self.dynamics.models.generate(self.dynamics.eval_generator(state), self.z, self.c)

    def metric(self, fn: Callable[["State"], torch.Tensor]) -> Metric:
        return Metric(self.name, self.split, fn)


def make_metric(name: str, run: "Run", split: str = "valid") -> Metric:
    """The metric ``name`` on ``split`` ("valid" or "test") of ``run``'s data."""
    builder = BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join(BUILDERS)})")
    return builder(MetricInputs(name, run, split, run.real(split), run.eval_latents(split), run.eval_labels(split),
                                run.dynamics))


def _all(inputs: MetricInputs) -> Metric:
    bandwidth = inputs.run.cfg.metric.bandwidth
    return inputs.metric(lambda state: average_log_likelihood(inputs.real, inputs.generate(state), bandwidth))


def _loss_d(inputs: MetricInputs) -> Metric:
    from .loss_d import discriminator_loss

    x, y = inputs.real.to(inputs.run.dtype), inputs.run.labels(inputs.split)
    return inputs.metric(lambda state: discriminator_loss(inputs.dynamics, state, x, inputs.z, y, inputs.c))


# Real-split quantities of the classifier metrics, computed once per (run data, split, model).
_REAL_CACHE: dict[tuple, Any] = {}
_REAL_CACHE_SIZE = 8
Cached = TypeVar("Cached")


def _feature_model(inputs: MetricInputs) -> "FeatureModel":
    """The frozen classifier of IS / log IS / FID / KID; it sees the generated images in one
    full batch (memory grows with ``metric.n_samples``)."""
    from .classifier import extractor_file, load_feature_model

    run = inputs.run
    if extractor_file(run) is None and (inputs.real.ndim != 4 or run.splits.y_train is None):
        raise ConfigError(f"metric {inputs.name!r} needs labelled image data (or metric.extractor), not "
                          f"available for data.name = {run.cfg.data.name!r}")
    return load_feature_model(run)


def _cached(inputs: MetricInputs, model: "FeatureModel", what: tuple, compute: Callable[[], Cached]) -> Cached:
    """The real split's quantity ``what`` under ``model``: computed once, then taken from the cache."""
    run = inputs.run
    key = (str(run.path.resolve()), run.meta.get("data_fingerprint"), inputs.split, model.key, str(run.device), *what)
    if key not in _REAL_CACHE:
        if len(_REAL_CACHE) >= _REAL_CACHE_SIZE:
            _REAL_CACHE.pop(next(iter(_REAL_CACHE)))
        _REAL_CACHE[key] = compute()
    return _REAL_CACHE[key]


def _real_features(inputs: MetricInputs, model: "FeatureModel") -> torch.Tensor:
    """The real split's features, evaluated once without a graph and cached."""
    return _cached(inputs, model, ("features",), lambda: model.evaluate(inputs.real)[0])


def _inception(inputs: MetricInputs) -> Metric:
    from .inception_score import check_splits, inception_score, log_inception_score

    model = _feature_model(inputs)
    score = inception_score if inputs.name == "is" else log_inception_score
    splits = inputs.run.cfg.metric.is_splits
    check_splits(splits, inputs.z.shape[0])
    return inputs.metric(lambda state: score(model.logits(inputs.generate(state)), splits))


def _fid(inputs: MetricInputs) -> Metric:
    from .fid import fid_reference, frechet_distance

    model = _feature_model(inputs)
    ridge, n = inputs.run.cfg.metric.fid_ridge, inputs.z.shape[0]
    ref = _cached(inputs, model, ("fid", ridge, n), lambda: fid_reference(_real_features(inputs, model), ridge, n))
    return inputs.metric(lambda state: frechet_distance(ref, model.features(inputs.generate(state))))


def _kid(inputs: MetricInputs) -> Metric:
    from .kid import kernel_inception_distance, real_kernel_mean

    model = _feature_model(inputs)
    degree = inputs.run.cfg.metric.kid_degree
    real = _real_features(inputs, model)
    real_term = _cached(inputs, model, ("kid", degree), lambda: real_kernel_mean(real, degree))
    return inputs.metric(lambda state: kernel_inception_distance(real, model.features(inputs.generate(state)),
                                                                 degree, real_term))


BUILDERS: dict[str, Callable[[MetricInputs], Metric]] = {
    "all": _all, "is": _inception, "log_is": _inception, "fid": _fid, "kid": _kid, "loss_d": _loss_d}

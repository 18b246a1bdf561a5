"""GAN evaluation metrics, each a differentiable function of the training state.

``make_metric(name, run, split)`` binds a metric to a run's fixed evaluation latents and
real split, returning a callable ``state -> scalar tensor`` that ITD differentiates.
``is``, ``log_is``, ``fid`` and ``kid`` see generated images through a frozen classifier
(``classifier.py``: trained on the run's labelled training split and cached in the run
directory, or the TorchScript file ``metric.extractor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..config import HIGHER_IS_BETTER, METRICS
from ..errors import ConfigError, NonFiniteError
from .all_kde import average_log_likelihood

if TYPE_CHECKING:
    from ..run import Run
    from ..training.dynamics import State


@dataclass(frozen=True)
class Metric:
    """A scalar function of the training state, with its direction."""

    name: str
    split: str
    fn: Callable[["State"], torch.Tensor]

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.name]

    def __call__(self, state: "State") -> torch.Tensor:
        return self.fn(state)

    def value(self, state: "State") -> float:
        """The metric as a number; NaN or infinity is an error, never a result."""
        with torch.no_grad():
            v = float(self.fn(state))
        if not math.isfinite(v):
            raise NonFiniteError(f"metric {self.name} on the {self.split} split evaluated to {v}")
        return v


def make_metric(name: str, run: "Run", split: str = "valid") -> Metric:
    """The metric ``name`` on ``split`` ("valid" or "test") of ``run``'s data."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    real = run.real(split)
    z, c = run.eval_latents(split), run.eval_labels(split)
    dyn = run.dynamics
    if name == "all":
        bandwidth = run.cfg.metric.bandwidth

        def fn(state: "State") -> torch.Tensor:
            return average_log_likelihood(real, dyn.models.generate(dyn.eval_generator(state), z, c), bandwidth)

        return Metric(name, split, fn)
    if name == "loss_d":
        from .loss_d import discriminator_loss

        x, y = real.to(run.dtype), run.labels(split)
        return Metric(name, split, lambda state: discriminator_loss(dyn, state, x, z, y, c))
    from .classifier import extractor_file

    if extractor_file(run) is None and (real.ndim != 4 or run.splits.y_train is None):
        raise ConfigError(f"metric {name!r} needs labelled image data (or metric.extractor), not "
                          f"available for data.name = {run.cfg.data.name!r}")
    return _classifier_metric(name, run, split, real, z, c)


# Real-split quantities of the classifier metrics, computed once per (run data, split, model).
_REAL_CACHE: dict[tuple, object] = {}
_REAL_CACHE_SIZE = 8


def _cached(key: tuple, compute: Callable[[], object]) -> object:
    if key not in _REAL_CACHE:
        if len(_REAL_CACHE) >= _REAL_CACHE_SIZE:
            _REAL_CACHE.pop(next(iter(_REAL_CACHE)))
        _REAL_CACHE[key] = compute()
    return _REAL_CACHE[key]


def _classifier_metric(name: str, run: "Run", split: str, real: torch.Tensor, z: torch.Tensor,
                       c: torch.Tensor | None) -> Metric:
    """IS / log IS / FID / KID of generated images through the frozen classifier.

    The generated images go through the classifier in one full batch (memory grows with
    ``metric.n_samples``); the real split is evaluated once, without a graph, and cached.
    """
    from .classifier import load_feature_model

    dyn = run.dynamics
    mc = run.cfg.metric
    model = load_feature_model(run)

    def generate(state: "State") -> torch.Tensor:
        return dyn.models.generate(dyn.eval_generator(state), z, c)

    if name in ("is", "log_is"):
        from .inception_score import inception_score, log_inception_score

        score = inception_score if name == "is" else log_inception_score
        splits = mc.is_splits
        if not 1 <= splits <= z.shape[0]:
            raise ConfigError(f"metric.is_splits = {splits} must lie between 1 and the number of "
                              f"generated samples ({z.shape[0]})")
        return Metric(name, split, lambda state: score(model.logits(generate(state)), splits))

    base = (str(run.path.resolve()), run.meta.get("data_fingerprint"), split, model.key, str(run.device))

    def real_features() -> torch.Tensor:
        return model.evaluate(real)[0]

    if name == "fid":
        from .fid import FIDReference, fid_reference, frechet_distance

        ridge = mc.fid_ridge
        ref = _cached(base + ("fid", ridge, z.shape[0]),
                      lambda: fid_reference(_cached(base + ("features",), real_features), ridge, z.shape[0]))
        assert isinstance(ref, FIDReference)
        return Metric(name, split, lambda state: frechet_distance(ref, model.features(generate(state))))
    if name == "kid":
        from .kid import kernel_inception_distance, real_kernel_mean

        degree = mc.kid_degree
        feats = _cached(base + ("features",), real_features)
        rr = _cached(base + ("kid", degree), lambda: real_kernel_mean(feats, degree))
        return Metric(name, split, lambda state: kernel_inception_distance(feats, model.features(generate(state)),
                                                                           degree, rr))
    raise ConfigError(f"unknown metric {name!r}")  # pragma: no cover - METRICS lists only these

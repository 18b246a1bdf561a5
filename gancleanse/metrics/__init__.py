"""GAN evaluation metrics, each a differentiable function of the training state.

``make_metric(name, run, split)`` binds a metric to a run's fixed evaluation latents and
real split, returning a callable ``state -> scalar tensor`` that ITD differentiates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..config import HIGHER_IS_BETTER, METRICS
from ..errors import ConfigError
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
        with torch.no_grad():
            return float(self.fn(state))


def make_metric(name: str, run: "Run", split: str = "valid") -> Metric:
    """The metric ``name`` on ``split`` ("valid" or "test") of ``run``'s data."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    real = getattr(run.splits, split)
    z = run.eval_latents(split)
    dyn = run.dynamics
    if name == "all":
        bandwidth = run.cfg.metric.bandwidth

        def fn(state: "State") -> torch.Tensor:
            return average_log_likelihood(real, dyn.models.generate(dyn.eval_generator(state), z), bandwidth)

        return Metric(name, split, fn)
    if name == "loss_d":
        from .loss_d import discriminator_loss

        x = real.to(run.dtype)
        return Metric(name, split, lambda state: discriminator_loss(dyn, state, x, z))
    raise ConfigError(f"metric {name!r} needs image data and a classifier, not available for "
                      f"data.name = {run.cfg.data.name!r}")

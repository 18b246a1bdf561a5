"""Inception Score from classifier logits: how confident and how diverse the generated classes are.

    log IS = mean_k KL( p(y|x_k) || p_bar ),   p_bar = mean_k p(y|x_k),   IS = exp(log IS)

with p the softmax of the logits, in float64 (log-softmax, so no log of a rounded zero). The paper uses one
split (p_bar over all n samples). With ``splits`` = S > 1 the samples are cut into S contiguous, nearly
equal parts; IS is the mean over parts of exp(mean KL in the part) (the usual definition), and log IS is
the mean over parts of the mean KL (so it is log IS exactly when S = 1). Higher is better.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


def kl_to_marginal(logits: torch.Tensor) -> torch.Tensor:
    """KL(p(y|x_k) || p_bar) for every row k, with p_bar the mean of the rows' softmax."""
    log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
    log_p_bar = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    return (log_p.exp() * (log_p - log_p_bar)).sum(1)


def check_splits(splits: int, n: int) -> None:
    if not 1 <= splits <= n:
        raise ConfigError(f"metric.is_splits = {splits} must lie between 1 and the number of generated samples ({n})")


def _parts(logits: torch.Tensor, splits: int) -> tuple[torch.Tensor, ...]:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (n, classes), got {tuple(logits.shape)}")
    check_splits(splits, logits.shape[0])
    return torch.tensor_split(logits, splits, dim=0)


def log_inception_score(logits: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """Mean over parts of the mean KL to the part's marginal (= log IS for one part)."""
    return torch.stack([kl_to_marginal(p).mean() for p in _parts(logits, splits)]).mean()


def inception_score(logits: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """Mean over parts of exp(mean KL to the part's marginal)."""
    return torch.stack([kl_to_marginal(p).mean().exp() for p in _parts(logits, splits)]).mean()

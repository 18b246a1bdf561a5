"""Optimizers as pure transforms: ``update(grads, state, params, count) -> (params, state)``.

The optimizer state (momentum buffer, Adam moments) is part of the training state that
ITD differentiates, so nothing here mutates a tensor in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import TrainConfig

Tree = dict[str, torch.Tensor]


class Optimizer(Protocol):
    def init(self, params: Tree) -> dict[str, Tree]: ...

    def update(self, grads: Tree, state: dict[str, Tree], params: Tree,
               count: int) -> tuple[Tree, dict[str, Tree]]: ...


@dataclass(frozen=True)
class SGD:
    lr: float

    def init(self, params: Tree) -> dict[str, Tree]:
        return {}

    def update(self, grads, state, params, count):
        return {k: p - self.lr * grads[k] for k, p in params.items()}, state


@dataclass(frozen=True)
class Momentum:
    """Heavy ball as in ``torch.optim.SGD(momentum=mu)``: buf = mu * buf + g; p -= lr * buf."""

    lr: float
    mu: float

    def init(self, params: Tree) -> dict[str, Tree]:
        return {"buf": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(self, grads, state, params, count):
        buf = {k: self.mu * state["buf"][k] + g for k, g in grads.items()}
        return {k: p - self.lr * buf[k] for k, p in params.items()}, {"buf": buf}


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) derivative at 0, so untouched moments give no NaN."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))), torch.zeros_like(v))


@dataclass(frozen=True)
class Adam:
    lr: float
    beta1: float
    beta2: float
    eps: float

    def init(self, params: Tree) -> dict[str, Tree]:
        return {"m": {k: torch.zeros_like(p) for k, p in params.items()},
                "v": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(self, grads, state, params, count):
        k = count + 1
        c1, c2 = 1.0 - self.beta1**k, 1.0 - self.beta2**k
        m = {n: self.beta1 * state["m"][n] + (1.0 - self.beta1) * g for n, g in grads.items()}
        v = {n: self.beta2 * state["v"][n] + (1.0 - self.beta2) * g * g for n, g in grads.items()}
        new = {n: p - self.lr * (m[n] / c1) / (safe_sqrt(v[n] / c2) + self.eps) for n, p in params.items()}
        return new, {"m": m, "v": v}


def make_optimizer(cfg: TrainConfig, lr: float) -> Optimizer:
    if cfg.optimizer == "sgd":
        return SGD(lr)
    if cfg.optimizer == "momentum":
        return Momentum(lr, cfg.momentum)
    if cfg.optimizer == "adam":
        return Adam(lr, cfg.betas[0], cfg.betas[1], cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")

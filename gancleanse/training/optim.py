"""Optimizers as pure transforms: ``update(grads, state, params, count) -> (params, state)``.

The optimizer state (momentum buffer, Adam moments) is part of the training state that ITD
differentiates, so nothing here mutates a tensor in place. Each optimizer also states its effective
per-coordinate step sizes (``step_sizes``): near a fixed point its update is about theta <- theta - P grad,
and AID damps its implicit derivative on that linearized training's time scale, so it needs P without
knowing the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

if TYPE_CHECKING:
    from ..config import TrainConfig

Tree = dict[str, torch.Tensor]


class Optimizer(Protocol):
    def init(self, params: Tree) -> dict[str, Tree]: ...

    def update(self, grads: Tree, state: dict[str, Tree], params: Tree, count: int) -> tuple[Tree, dict[str, Tree]]: ...

    def step_sizes(self, state: dict[str, Tree], params: Tree, count: int) -> Tree:
        """P per coordinate (float64, shaped like ``params``) with update ~ -P grad near a fixed
        point, given the optimizer ``state`` after ``count`` steps."""


def _constant_like(params: Tree, value: float) -> Tree:
    return {k: torch.full_like(p, value, dtype=torch.float64) for k, p in params.items()}


@dataclass(frozen=True)
class SGD:
    lr: float

    def init(self, params: Tree) -> dict[str, Tree]:
        return {}

    def update(self, grads: Tree, state: dict[str, Tree], params: Tree, count: int) -> tuple[Tree, dict[str, Tree]]:
        return {k: p - self.lr * grads[k] for k, p in params.items()}, state

    def step_sizes(self, state: dict[str, Tree], params: Tree, count: int) -> Tree:
        """The learning rate, everywhere."""
        return _constant_like(params, self.lr)


@dataclass(frozen=True)
class Momentum:
    """Heavy ball as in ``torch.optim.SGD(momentum=mu)``: buf = mu * buf + g; p -= lr * buf."""

    lr: float
    mu: float

    def init(self, params: Tree) -> dict[str, Tree]:
        return {"buf": {k: torch.zeros_like(p) for k, p in params.items()}}

    def update(self, grads: Tree, state: dict[str, Tree], params: Tree, count: int) -> tuple[Tree, dict[str, Tree]]:
        buf = {k: self.mu * state["buf"][k] + g for k, g in grads.items()}
        return {k: p - self.lr * buf[k] for k, p in params.items()}, {"buf": buf}

    def step_sizes(self, state: dict[str, Tree], params: Tree, count: int) -> Tree:
        """lr / (1 - mu): a steady gradient g moves the parameters by that times g per step."""
        return _constant_like(params, self.lr / max(1.0 - self.mu, 1e-12))


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
        return {moment: {k: torch.zeros_like(p) for k, p in params.items()} for moment in ("m", "v")}

    def update(self, grads: Tree, state: dict[str, Tree], params: Tree, count: int) -> tuple[Tree, dict[str, Tree]]:
        k = count + 1
        c1, c2 = 1.0 - self.beta1**k, 1.0 - self.beta2**k
        m = {n: self.beta1 * state["m"][n] + (1.0 - self.beta1) * g for n, g in grads.items()}
        v = {n: self.beta2 * state["v"][n] + (1.0 - self.beta2) * g * g for n, g in grads.items()}
        new = {n: p - self.lr * (m[n] / c1) / (safe_sqrt(v[n] / c2) + self.eps) for n, p in params.items()}
        return new, {"m": m, "v": v}

    def step_sizes(self, state: dict[str, Tree], params: Tree, count: int) -> Tree:
        """lr / (sqrt(v_hat) + eps), v_hat the bias-corrected second moment after ``count`` steps:
        the first moment tends to the gradient itself at a fixed point."""
        correction = 1.0 - self.beta2**count
        return {n: self.lr / ((state["v"][n].to(torch.float64) / correction).sqrt() + self.eps)
                for n in params}


OPTIMIZERS: dict[str, Callable[["TrainConfig", float], Optimizer]] = {
    "sgd": lambda cfg, lr: SGD(lr),
    "momentum": lambda cfg, lr: Momentum(lr, cfg.momentum),
    "adam": lambda cfg, lr: Adam(lr, cfg.betas[0], cfg.betas[1], cfg.eps),
}


def make_optimizer(cfg: "TrainConfig", lr: float) -> Optimizer:
    """``cfg.optimizer`` with learning rate ``lr`` (each player has its own)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (available: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[cfg.optimizer](cfg, lr)

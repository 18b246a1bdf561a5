"""Per-sample GAN loss terms on discriminator logits.

Each function returns one value per sample so that the discriminator's real term can be
weighted instance by instance (the weights are how removal is expressed and differentiated).
Every loss is one row of ``TERMS``: its discriminator terms on reals and fakes and its
generator term.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

Term = Callable[[torch.Tensor], torch.Tensor]


def _neg_log_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits)  # -log sigmoid(l)


def _neg_log_one_minus_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits)  # -log(1 - sigmoid(l))


def _log_one_minus_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return -F.softplus(logits)  # log(1 - sigmoid(l)): the saturating generator loss


def _negated(logits: torch.Tensor) -> torch.Tensor:
    return -logits


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _hinge_real(logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - logits)


def _hinge_fake(logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 + logits)


def _squared_to_one(logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logits - 1.0) ** 2


def _squared_to_zero(logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * logits**2


class LossTerms(NamedTuple):
    d_real: Term  # discriminator on real samples (weighted per instance)
    d_fake: Term  # discriminator on generated samples
    g: Term  # generator on generated samples


TERMS: dict[str, LossTerms] = {
    "modified_minmax": LossTerms(_neg_log_sigmoid, _neg_log_one_minus_sigmoid, _neg_log_sigmoid),  # non-saturating G
    "minmax": LossTerms(_neg_log_sigmoid, _neg_log_one_minus_sigmoid, _log_one_minus_sigmoid),
    "wasserstein": LossTerms(_negated, _identity, _negated),
    "hinge": LossTerms(_hinge_real, _hinge_fake, _negated),
    "ls": LossTerms(_squared_to_one, _squared_to_zero, _squared_to_one),
}
LOSSES = tuple(TERMS)


def loss_terms(kind: str) -> LossTerms:
    """The three terms of the loss ``kind``; a ValueError names an unknown one."""
    try:
        return TERMS[kind]
    except (KeyError, TypeError):  # TypeError: not even a name
        raise ValueError(f"unknown loss {kind!r}") from None


def d_real_term(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on real samples (to be weighted by instance weights)."""
    return loss_terms(kind).d_real(logits)


def d_fake_term(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on generated samples."""
    return loss_terms(kind).d_fake(logits)


def g_term(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Generator loss on generated samples."""
    return loss_terms(kind).g(logits)

"""Per-sample GAN loss terms on discriminator logits.

Each term returns one value per sample so that the discriminator's real term can be weighted
instance by instance (the weights are how removal is expressed and differentiated). Every loss
is one row of ``TERMS``: its discriminator terms on reals and fakes and its generator term.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

Term = Callable[[torch.Tensor], torch.Tensor]


def _neg_log_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits)  # -log sigmoid(l)


def _squared_to_one(logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logits - 1.0) ** 2


class LossTerms(NamedTuple):
    d_real: Term  # discriminator on real samples (weighted per instance)
    d_fake: Term  # discriminator on generated samples
    g: Term  # generator on generated samples


# F.softplus(l) = -log(1 - sigmoid(l)); minmax's generator term is its negation, log(1 - sigmoid(l)).
TERMS: dict[str, LossTerms] = {
    "modified_minmax": LossTerms(_neg_log_sigmoid, F.softplus, _neg_log_sigmoid),  # non-saturating G
    "minmax": LossTerms(_neg_log_sigmoid, F.softplus, lambda logits: -F.softplus(logits)),
    "wasserstein": LossTerms(torch.neg, lambda logits: logits, torch.neg),
    "hinge": LossTerms(lambda logits: F.relu(1.0 - logits), lambda logits: F.relu(1.0 + logits), torch.neg),
    "ls": LossTerms(_squared_to_one, lambda logits: 0.5 * logits**2, _squared_to_one),
}


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

"""The discriminator loss on held-out data: the prior approach's metric, used as a baseline.

    loss_d = mean l_real(D(x)) + mean l_fake(D(G(z))) + weight decay

in two parts: the generated samples' term, a statistic of their logits (so it is evaluated in chunks), and the rest.

Differentiated with respect to both players. Lower is better (for the generator's data
fit, a low validation D loss means D separates held-out reals from fakes poorly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..training.dynamics import l2_penalty
from ..training.losses import d_fake_term, d_real_term

if TYPE_CHECKING:
    from ..training.dynamics import Dynamics, State


def fake_term(dyn: "Dynamics", logits: torch.Tensor) -> torch.Tensor:
    """mean l_fake(D(G(z))) over the discriminator's logits on all generated samples, float64."""
    return d_fake_term(dyn.loss, logits).mean().to(torch.float64)


def real_term_and_decay(dyn: "Dynamics", state: "State", real: torch.Tensor,
                        y: torch.Tensor | None = None) -> torch.Tensor:
    """mean l_real(D(x)) + weight decay on an evaluation split (``y``: the reals' labels for a conditional
    GAN): the part of the loss that sees no generated sample, float64."""
    pd = state["d"]
    value = d_real_term(dyn.loss, dyn.models.discriminate(pd, real, y)).mean()
    if dyn.weight_decay_d:
        value = value + dyn.weight_decay_d * l2_penalty(pd)
    return value.to(torch.float64)

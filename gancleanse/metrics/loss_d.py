"""The discriminator loss on held-out data: the prior approach's metric, used as a baseline.

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


def discriminator_loss(dyn: "Dynamics", state: "State", real: torch.Tensor, z: torch.Tensor,
                       y: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
    """mean l_real(D(x)) + mean l_fake(D(G(z))) + weight decay, on an evaluation split
    (``y`` / ``c``: labels of the reals / fakes for a conditional GAN)."""
    pd = state["d"]
    fake = dyn.models.generate(dyn.eval_generator(state), z, c)
    value = (d_real_term(dyn.loss, dyn.models.discriminate(pd, real, y)).mean()
             + d_fake_term(dyn.loss, dyn.models.discriminate(pd, fake, c)).mean())
    if dyn.weight_decay_d:
        value = value + dyn.weight_decay_d * l2_penalty(pd)
    return value.to(torch.float64)

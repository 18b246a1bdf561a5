"""Per-sample GAN loss terms on discriminator logits.

Each function returns one value per sample so that the discriminator's real term can be
weighted instance by instance (the weights are how removal is expressed and differentiated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("modified_minmax", "minmax", "wasserstein", "hinge", "ls")


def d_real_term(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on real samples (to be weighted by instance weights)."""
    if kind in ("modified_minmax", "minmax"):
        return F.softplus(-logits)  # -log sigmoid(D(x))
    if kind == "wasserstein":
        return -logits
    if kind == "hinge":
        return F.relu(1.0 - logits)
    if kind == "ls":
        return 0.5 * (logits - 1.0) ** 2
    raise ValueError(f"unknown loss {kind!r}")


def d_fake_term(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on generated samples."""
    if kind in ("modified_minmax", "minmax"):
        return F.softplus(logits)  # -log(1 - sigmoid(D(G(z))))
    if kind == "wasserstein":
        return logits
    if kind == "hinge":
        return F.relu(1.0 + logits)
    if kind == "ls":
        return 0.5 * logits**2
    raise ValueError(f"unknown loss {kind!r}")


def g_term(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Generator loss on generated samples."""
    if kind == "modified_minmax":
        return F.softplus(-logits)  # non-saturating: -log sigmoid(D(G(z)))
    if kind == "minmax":
        return -F.softplus(logits)  # log(1 - sigmoid(D(G(z))))
    if kind in ("wasserstein", "hinge"):
        return -logits
    if kind == "ls":
        return 0.5 * (logits - 1.0) ** 2
    raise ValueError(f"unknown loss {kind!r}")

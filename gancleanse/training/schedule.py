"""Deterministic minibatch order and latents, derived from the training seed alone.

Never the global RNG: each epoch's permutation and each step's latents come from their
own generator seeded by ``SeedSequence([seed, stream, counter])``, so any step can be
regenerated in isolation (full retraining) and the recorded window can be checked
against it. The remainder of an epoch that does not fill a batch is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_PERMUTATION, _LATENT_D, _LATENT_G, _EVAL, _SOLVER = 0, 1, 2, 3, 4


def _generator(*words: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def eval_latents(seed: int, split: str, n: int, z_dim: int) -> torch.Tensor:
    """Fixed latents for evaluating a metric on one split (float64)."""
    split_id = {"valid": 0, "test": 1}[split]
    return torch.randn(n, z_dim, generator=_generator(seed, _EVAL, split_id), dtype=torch.float64)


def solver_draw(seed: int, counter: int, n_train: int, size: int, z_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance indices (without replacement) and latents (float64) for AID's Jacobian products.

    A stream of its own, so that estimating influence never shifts the training's draws.
    """
    gen = _generator(seed, _SOLVER, counter)
    indices = torch.randperm(n_train, generator=gen)[:size]
    return indices, torch.randn(size, z_dim, generator=gen, dtype=torch.float64)


@dataclass
class Schedule:
    """Step -> (instance indices, discriminator latents, generator latents)."""

    n_train: int
    batch_size: int
    z_dim: int
    seed: int
    shared_latents: bool  # simultaneous updates use one latent batch for both players
    _perm_cache: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = torch.randperm(self.n_train, generator=_generator(self.seed, _PERMUTATION, epoch))
            self._perm_cache = (epoch, perm)
        b = self.batch_size
        return self._perm_cache[1][pos * b:(pos + 1) * b]

    def latents(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch_size, self.z_dim)
        z_d = torch.randn(shape, generator=_generator(self.seed, _LATENT_D, step), dtype=torch.float64)
        if self.shared_latents:
            return z_d, z_d
        z_g = torch.randn(shape, generator=_generator(self.seed, _LATENT_G, step), dtype=torch.float64)
        return z_d, z_g

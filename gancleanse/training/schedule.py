"""Deterministic minibatch order and latents, derived from the training seed alone.

Never the global RNG: each epoch's permutation and each step's latents come from their own generator
seeded by ``SeedSequence([seed, stream, counter])``, so any step can be regenerated in isolation (full
retraining) and the recorded window checked against it. An epoch's remainder short of a batch is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_PERMUTATION, _LATENT_D, _LATENT_G, _EVAL, _SOLVER, _LABEL_D, _LABEL_G, _EVAL_LABEL = range(8)
_EVAL_SPLITS = {"valid": 0, "test": 1}


def _generator(*words: int) -> torch.Generator:
    """A generator of its own for one (seed, stream, counter): no draw depends on another."""
    seed = int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def eval_latents(seed: int, split: str, n: int, z_dim: int) -> torch.Tensor:
    """Fixed latents for evaluating a metric on one split (float64)."""
    return torch.randn(n, z_dim, generator=_generator(seed, _EVAL, _EVAL_SPLITS[split]), dtype=torch.float64)


def draw_labels(frequencies: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` class labels (int64) drawn with replacement from the class ``frequencies``."""
    return torch.multinomial(frequencies, n, replacement=True, generator=gen)


def eval_labels(seed: int, split: str, n: int, frequencies: torch.Tensor) -> torch.Tensor:
    """Fixed labels of a conditional GAN's evaluation samples on one split (beside its latents)."""
    return draw_labels(frequencies, n, _generator(seed, _EVAL_LABEL, _EVAL_SPLITS[split]))


def solver_draw(seed: int, counter: int, n_train: int, size: int, z_dim: int,
                frequencies: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Instance indices (without replacement), latents (float64) and, for a conditional GAN, generated
    labels, for AID's Jacobian products: a stream of its own, so influence never shifts training's draws."""
    gen = _generator(seed, _SOLVER, counter)
    indices = torch.randperm(n_train, generator=gen)[:size]
    z = torch.randn(size, z_dim, generator=gen, dtype=torch.float64)
    return indices, z, None if frequencies is None else draw_labels(frequencies, size, gen)


@dataclass
class Schedule:
    """Step -> (instance indices, discriminator latents, generator latents[, generated labels])."""

    n_train: int
    batch_size: int
    z_dim: int
    seed: int
    shared_latents: bool  # simultaneous updates use one latent batch for both players
    label_frequencies: torch.Tensor | None = None  # conditional GANs: the training labels' distribution
    _perm_cache: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size

    def indices(self, step: int) -> torch.Tensor:
        """The training instances of step ``step``'s minibatch: a slice of its epoch's permutation."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            permutation = torch.randperm(self.n_train, generator=_generator(self.seed, _PERMUTATION, epoch))
            self._perm_cache = (epoch, permutation)
        size = self.batch_size
        return self._perm_cache[1][position * size:(position + 1) * size]

    def latents(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (discriminator, generator) latents of step ``step`` (float64; one batch when shared)."""
        shape = (self.batch_size, self.z_dim)
        z_d = torch.randn(shape, generator=_generator(self.seed, _LATENT_D, step), dtype=torch.float64)
        if self.shared_latents:
            return z_d, z_d
        return z_d, torch.randn(shape, generator=_generator(self.seed, _LATENT_G, step), dtype=torch.float64)

    def labels(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Labels of each player's generated samples (None, None when unconditional), drawn from the training
        labels' frequencies and then fixed like the latents: a counterfactual retrain keeps them."""
        if self.label_frequencies is None:
            return None, None
        c_d = draw_labels(self.label_frequencies, self.batch_size, _generator(self.seed, _LABEL_D, step))
        if self.shared_latents:
            return c_d, c_d
        return c_d, draw_labels(self.label_frequencies, self.batch_size, _generator(self.seed, _LABEL_G, step))

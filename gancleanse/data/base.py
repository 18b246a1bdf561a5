"""The split container and the dispatcher from ``[data] name`` to a loader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..config import Config
from ..errors import ConfigError


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors (float64 on CPU); labels where the data has them.

    Index ``j`` of ``train`` is instance ``j`` in every score file and removal list.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    y_train: torch.Tensor | None = None
    y_valid: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def fingerprint(self) -> str:
        """A hash of the training split, saved in a run so that later data changes are caught."""
        h = hashlib.sha256()
        for t in (self.train, self.valid, self.test):
            h.update(t.detach().contiguous().to(torch.float64).numpy().tobytes())
        return h.hexdigest()[:16]


def load_data(cfg: Config) -> Splits:
    """Build the splits the config names. Deterministic in ``[data] seed``."""
    name = cfg.data.name
    if name == "gaussian2d":
        from .gaussian2d import gaussian2d

        return gaussian2d(cfg.data)
    if name == "digits":
        from .digits import digits

        return digits(cfg.data)
    if name == "mnist":
        from .mnist import mnist

        return mnist(cfg.data)
    if name == "npz":
        from .npz import npz

        return npz(cfg.data)
    raise ConfigError(f"data.name = {name!r} is not available in this build")

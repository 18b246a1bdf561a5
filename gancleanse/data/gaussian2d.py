"""The paper's 2D toy data: N(mu=[1, 1], Sigma=[[1, .8], [.8, 1]])."""

from __future__ import annotations

import torch

from ..config import GAUSSIAN2D_N_TRAIN, DataConfig
from .base import Splits

MEAN = (1.0, 1.0)
COV = ((1.0, 0.8), (0.8, 1.0))


def gaussian2d(cfg: DataConfig) -> Splits:
    """Fresh samples from the seeded generator: train, then valid, then test rows."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n_train = cfg.n_train if cfg.n_train is not None else GAUSSIAN2D_N_TRAIN
    n = n_train + cfg.n_valid + cfg.n_test
    chol = torch.linalg.cholesky(torch.tensor(COV, dtype=torch.float64))
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) @ chol.T + torch.tensor(MEAN, dtype=torch.float64)
    end_valid = n_train + cfg.n_valid
    return Splits(train=x[:n_train], valid=x[n_train:end_valid], test=x[end_valid:])

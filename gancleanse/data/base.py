"""The split container and the dispatcher from ``[data] name`` to a loader."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..config import Config
from ..errors import ConfigError, DataError


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

    @classmethod
    def from_tensors(cls, train: torch.Tensor, valid: torch.Tensor, test: torch.Tensor,
                     y_train: torch.Tensor | None = None, y_valid: torch.Tensor | None = None,
                     y_test: torch.Tensor | None = None) -> "Splits":
        """User data, checked: same sample shape in every split, finite values, labels per sample."""
        xs = {"train": train, "valid": valid, "test": test}
        ys = {"train": y_train, "valid": y_valid, "test": y_test}
        out = {}
        for name, x in xs.items():
            x = torch.as_tensor(x)
            if x.ndim < 2 or x.shape[0] == 0:
                raise DataError(f"{name} split must have shape (N, ...) with N > 0, got {tuple(x.shape)}")
            if x.shape[1:] != torch.as_tensor(train).shape[1:]:
                raise DataError(f"{name} split has sample shape {tuple(x.shape[1:])}, train has "
                                f"{tuple(torch.as_tensor(train).shape[1:])}")
            x = x.detach().to(torch.float64).cpu().contiguous()
            if not torch.isfinite(x).all():
                raise DataError(f"{name} split contains NaN or infinite values")
            out[name] = x
            y = ys[name]
            if y is not None:
                y = torch.as_tensor(y).to(torch.int64).reshape(-1)
                if y.shape[0] != x.shape[0]:
                    raise DataError(f"{name} labels: {y.shape[0]} for {x.shape[0]} samples")
            out[f"y_{name}"] = y
        return cls(**out)

    @classmethod
    def random_split(cls, x: torch.Tensor, n_valid: int, n_test: int, seed: int = 0,
                     y: torch.Tensor | None = None) -> "Splits":
        """Split one array into train / valid / test by a seeded permutation."""
        x = torch.as_tensor(x)
        n = x.shape[0]
        if n_valid + n_test >= n:
            raise DataError(f"n_valid + n_test = {n_valid + n_test} leaves no training data out of {n}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        parts = perm[n_valid + n_test:], perm[:n_valid], perm[n_valid:n_valid + n_test]
        ys = [None] * 3 if y is None else [torch.as_tensor(y)[p] for p in parts]
        return cls.from_tensors(*(x[p] for p in parts), *ys)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


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
    if name == "custom":
        raise ConfigError("data.name = 'custom' stands for tensors given to the Python API "
                          "(gancleanse.train(cfg, out, data=Splits(...))); a config file cannot load them")
    raise ConfigError(f"data.name = {name!r} is not available in this build")

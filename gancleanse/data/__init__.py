"""Datasets split into train / valid / test; only the discriminator ever sees them.

``LOADERS`` maps every ``[data] name`` to the function that builds its splits: a new dataset is one module
and one table row. The loaders never import this package, so the registry on top forms no import cycle.
"""

from __future__ import annotations

from typing import Callable

from ..config import Config, DataConfig
from ..errors import ConfigError
from .base import Splits
from .digits import digits
from .gaussian2d import gaussian2d
from .image_files import load_images
from .mnist import mnist
from .npz import npz

Loader = Callable[[DataConfig], Splits]


def api_tensors(cfg: DataConfig) -> Splits:
    """``custom`` stands for tensors handed to the Python API: nothing a config file can load."""
    raise ConfigError("data.name = 'custom' stands for tensors given to the Python API "
                      "(gancleanse.train(cfg, out, data=Splits(...))); a config file cannot load them")


def not_built(cfg: DataConfig) -> Splits:
    """A name the config accepts but this build has no loader for."""
    raise ConfigError(f"data.name = {cfg.name!r} is not available in this build")


LOADERS: dict[str, Loader] = {"gaussian2d": gaussian2d, "digits": digits, "mnist": mnist, "npz": npz,
                              "images": load_images, "custom": api_tensors}


def load_data(cfg: Config) -> Splits:
    """Build the splits the config names. Deterministic in ``[data] seed``."""
    return LOADERS.get(cfg.data.name, not_built)(cfg.data)


__all__ = ["LOADERS", "Loader", "Splits", "load_data"]

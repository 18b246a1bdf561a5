"""Generator / discriminator architectures and the functional wrapper used by training."""

from __future__ import annotations

from .base import GANModules, build_models, check_no_batchnorm
from .mlp import MLPDiscriminator, MLPGenerator

__all__ = ["GANModules", "build_models", "check_no_batchnorm", "MLPGenerator", "MLPDiscriminator"]

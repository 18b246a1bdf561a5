"""Low-rank adapters: a linear or convolution layer's weight W becomes W + (alpha / r) B A.

``lora(module, rank=r)`` wraps the layers of a user's module in place. B starts at zero, so the wrapped
module computes exactly what it did; A starts small and seeded. Only the adapters train by default
(``trainable.select_trainable``): the wrapped weights become constants of the run, and the recorded
state, checkpoints and ITD's adjoint hold A and B."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

ADAPTER_NAMES = ("lora_a", "lora_b")
WRAPPABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


class LoRA(nn.Module):
    """``base`` with a low-rank update of its weight; same inputs, outputs and hyperparameters."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        weight = base.weight
        rows, cols = weight.shape[0], weight[0].numel()
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(cols)
        down = (torch.rand(rank, cols, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.lora_a = nn.Parameter(down.to(weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        weight = base.weight + self.scale * (self.lora_b @ self.lora_a).reshape(base.weight.shape)
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, base.bias)
        return F.conv_transpose2d(x, weight, base.bias, base.stride, base.padding, base.output_padding, base.groups,
                                  base.dilation)


def lora(module: nn.Module, rank: int = 8, *, targets: Sequence[str] | None = None, alpha: float | None = None,
         seed: int = 0) -> nn.Module:
    """Wrap ``module``'s Linear / Conv2d / ConvTranspose2d layers (those whose names match a glob
    of ``targets``; default all) with rank-``rank`` adapters, in place; returns ``module``."""
    if rank < 1:
        raise ConfigError(f"lora: rank must be at least 1, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    found = [(name, sub) for name, sub in module.named_modules()
             if isinstance(sub, WRAPPABLE) and name and (targets is None or any(fnmatchcase(name, t) for t in targets))]
    if not found:
        what = "no Linear or convolution layer" if targets is None else f"no layer matching {list(targets)}"
        raise ConfigError(f"lora: {type(module).__name__} has {what} to adapt")
    for name, sub in found:
        if isinstance(sub, LoRA) or name.endswith(".base"):
            raise ConfigError(f"lora: layer {name!r} already has adapters")
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, LoRA(sub, rank, float(rank if alpha is None else alpha), generator))
    return module

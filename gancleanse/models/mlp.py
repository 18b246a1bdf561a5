"""Fully connected GAN (the paper's 2D model: G z-32-32-2, D 2-64-64-1, no biases)."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
}


def _stack(sizes: list[int], activation: str, norm: str, bias: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=bias), ACTIVATIONS[activation]()]
        if norm == "layer":
            layers.append(nn.LayerNorm(b, elementwise_affine=True, bias=bias))
    return layers


class MLPGenerator(nn.Module):
    def __init__(self, z_dim: int, out_shape: tuple[int, ...], hidden: int, layers: int,
                 activation: str = "relu", norm: str = "none", bias: bool = False) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        sizes = [z_dim] + [hidden] * layers
        self.net = nn.Sequential(*_stack(sizes, activation, norm, bias),
                                 nn.Linear(hidden, math.prod(out_shape), bias=bias))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, in_dim: int, hidden: int, layers: int, activation: str = "relu",
                 norm: str = "none", bias: bool = False) -> None:
        super().__init__()
        sizes = [in_dim] + [hidden] * layers
        self.net = nn.Sequential(*_stack(sizes, activation, norm, bias), nn.Linear(hidden, 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).reshape(-1)

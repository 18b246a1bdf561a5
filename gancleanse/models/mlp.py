"""Fully connected GAN (the paper's 2D model: G z-32-32-2, D 2-64-64-1, no biases).

With ``n_classes`` the pair is class-conditional: G takes a learned class embedding beside z (``embed``,
z_dim wide), and D adds the projection term <embed(y), phi(x)> of its last hidden features phi to the
unconditional logit (Miyato & Koyama's projection discriminator)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layer_norm import LayerNorm, may_take_third_derivatives

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid,
               "leaky_relu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh}


def _stack(sizes: list[int], activation: str, norm: str, bias: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(width_in, width_out, bias=bias), ACTIVATIONS[activation]()]
        if norm == "layer":
            layers.append(LayerNorm(width_out, elementwise_affine=True, bias=bias))
    return layers


def with_label_embedding(z: torch.Tensor, embed: nn.Embedding | None, y: torch.Tensor | None) -> torch.Tensor:
    """[z, embed(y)] for a conditional generator; z itself for an unconditional one."""
    if embed is None:
        return z
    if y is None:
        raise ValueError("a class-conditional generator needs the labels of its samples")
    return torch.cat([z.reshape(z.shape[0], -1), embed(y)], dim=1)


def projection_logit(logit: torch.Tensor, features: torch.Tensor, embed: nn.Embedding | None,
                     y: torch.Tensor | None) -> torch.Tensor:
    """psi(phi(x)) + <embed(y), phi(x)>: the projection discriminator's logit, shape (B,)."""
    logit = logit.reshape(-1)
    if embed is None:
        return logit
    if y is None:
        raise ValueError("a class-conditional discriminator needs the labels of its samples")
    return logit + (embed(y) * features).sum(dim=1)


class MLPGenerator(nn.Module):
    def __init__(self, z_dim: int, out_shape: tuple[int, ...], hidden: int, layers: int,
                 activation: str = "relu", norm: str = "none", bias: bool = False, n_classes: int = 0) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.embed = nn.Embedding(n_classes, z_dim) if n_classes else None
        self.net = nn.Sequential(*_stack([z_dim * (2 if n_classes else 1)] + [hidden] * layers, activation, norm, bias),
                                 nn.Linear(hidden, math.prod(out_shape), bias=bias))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(with_label_embedding(z, self.embed, y)).reshape(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """``third_derivatives``: as the DCGAN discriminator's (its LayerNorms exact where needed)."""

    def __init__(self, in_dim: int, hidden: int, layers: int, activation: str = "relu",
                 norm: str = "none", bias: bool = False, n_classes: int = 0, third_derivatives: bool = False) -> None:
        super().__init__()
        sizes = [in_dim] + [hidden] * layers
        self.net = nn.Sequential(*_stack(sizes, activation, norm, bias), nn.Linear(hidden, 1, bias=bias))
        self.embed = nn.Embedding(n_classes, hidden) if n_classes else None
        self.third_derivatives = third_derivatives

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        *body, head = self.net
        features = x.reshape(x.shape[0], -1)
        exact = self.third_derivatives and may_take_third_derivatives(self, features)
        for layer in body:
            features = layer(features, exact) if isinstance(layer, LayerNorm) else layer(features)
        return projection_logit(head(features), features, self.embed, y)

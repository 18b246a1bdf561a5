"""The paper's small convolutional GAN for MNIST-sized images, plus 8x8, 32x32 and 64x64 variants.

The discriminator is a stack of 'valid' (padding 0) convolutions that ends at 1x1, then a linear
logit; the generator mirrors it with transposed convolutions from a 1x1 latent (kernels and strides
reversed, side (n - 1) * s + k), then a 1x1 convolution to the image channels C (from the sample shape
(C, H, W)) and tanh. Every stride-2 layer has (side - k) divisible by 2, so each transposed convolution
reproduces the discriminator's side exactly and G walks D's sides in reverse. D's sides (``SPECS``
holds the kernels and strides):

- 8: 8 -> 6 -> 4 -> 2 -> 1, scikit-learn digits at native size;
- 28: 28 -> 25 -> 12 -> 10 -> 9 -> 4 -> 2 -> 1, the paper's model (7 layers);
- 32: 32 -> 30 -> 14 -> 6 -> 2 -> 1 and 64: 64 -> 62 -> 30 -> 14 -> 6 -> 2 -> 1 (e.g. CIFAR-sized or
  resized images): DCGAN-style kernel-4 stride-2 downsampling between a kernel-3 stride-1 first
  layer and a kernel-2 last layer, 64x64 adding one stride-2 layer in front of 32x32's tail.

Every convolution is followed by the activation and, with ``norm = "layer"``, by a per-instance
LayerNorm over (C, H, W): it never mixes instances, so an instance weight of 0 still means "this
instance was not seen", which BatchNorm would break. A discriminator trained with gradient penalties is
differentiated three times by ITD and AID, past where ``F.layer_norm``'s derivatives are right: where
that can happen, its LayerNorms go through ``layer_norm.layer_norm`` (the same values and first two
derivatives, bit for bit; see that module), elsewhere through ``layer_norm.plain_layer_norm`` (``F.layer_norm``'s
values and first derivative, and while ITD and AID run a faster second). With ``n_classes`` both are class-conditional as
the MLP's are: a z_dim-wide class embedding beside z at G's input, a projection term on D's final
(hidden-wide) features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DataError
from .layer_norm import layer_norm, may_take_third_derivatives, plain_layer_norm
from .mlp import ACTIVATIONS, projection_logit, with_label_embedding

# image side -> discriminator (kernels, strides); the generator uses both reversed.
SPECS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    28: ((4, 3, 3, 2, 3, 3, 2), (1, 2, 1, 1, 2, 1, 1)),
    8: ((3, 3, 3, 2), (1, 1, 1, 1)),
    32: ((3, 4, 4, 4, 2), (1, 2, 2, 2, 1)),
    64: ((3, 4, 4, 4, 4, 2), (1, 2, 2, 2, 2, 1)),
}


def conv_sizes(side: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> list[int]:
    """Spatial sides through 'valid' convolutions: side -> ... -> last."""
    sizes = [side]
    for kernel, stride in zip(kernels, strides):
        sizes.append((sizes[-1] - kernel) // stride + 1)
    return sizes


def image_spec(sample_shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """(channels, side, kernels, strides) for an image shape the DCGAN supports; else a DataError."""
    supported = ", ".join(f"{s}x{s}" for s in sorted(SPECS))
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2] or sample_shape[1] not in SPECS:
        raise DataError(f"model.arch = 'dcgan' cannot take samples of shape {tuple(sample_shape)}: it needs "
                        f"images (C, H, W) of side {supported} (set data.image_size to resize)")
    channels, side, _ = sample_shape
    return (channels, side, *SPECS[side])


class ChannelLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of each instance with a per-channel gain and bias, as the paper's
    normalization has (``nn.LayerNorm([C, H, W])``'s affine parameters are per element)."""

    def __init__(self, channels: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias: nn.Parameter | None
        self.register_parameter("bias", nn.Parameter(torch.zeros(channels)) if bias else None)

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """``exact``: through ``layer_norm`` (right beyond the second derivative, slower) instead of
        ``plain_layer_norm``; the values and first derivatives are the same bit for bit either way."""
        # Broadcasting the per-channel parameters into layer_norm's own affine step keeps
        # one saved tensor per layer instead of three, which matters for ITD's stored graphs.
        shape = x.shape[1:]
        weight = self.weight[:, None, None].expand(shape)
        bias = self.bias[:, None, None].expand(shape) if self.bias is not None else None
        return (layer_norm if exact else plain_layer_norm)(x, list(shape), weight, bias, self.eps)


def _block(conv: nn.Module, channels: int, activation: str, norm: str, bias: bool) -> list[nn.Module]:
    layers = [conv, ACTIVATIONS[activation]()]
    if norm == "layer":
        layers.append(ChannelLayerNorm(channels, bias))
    return layers


class DCGANDiscriminator(nn.Module):
    """Image (B, C, H, W) -> logit (B,). ``third_derivatives``: the LayerNorms of an evaluation that may be
    differentiated three times (``may_take_third_derivatives``) are exact there; gradient penalties are what
    lead ITD and AID there, so a run without them leaves this off and keeps ``plain_layer_norm``, which is faster.
    The generator's derivatives never go past the second, so it has no such choice."""

    def __init__(self, in_shape: tuple[int, ...], hidden: int = 32, activation: str = "sigmoid",
                 norm: str = "layer", bias: bool = False, n_classes: int = 0, third_derivatives: bool = False) -> None:
        super().__init__()
        channels, _, kernels, strides = image_spec(tuple(in_shape))
        layers: list[nn.Module] = []
        for i, (kernel, stride) in enumerate(zip(kernels, strides)):
            conv = nn.Conv2d(channels if i == 0 else hidden, hidden, kernel, stride, padding=0, bias=bias)
            layers += _block(conv, hidden, activation, norm, bias)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, 1, bias=bias)
        self.embed = nn.Embedding(n_classes, hidden) if n_classes else None
        self.third_derivatives = third_derivatives

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        exact = self.third_derivatives and may_take_third_derivatives(self, x)
        features = x
        for layer in self.features:
            features = layer(features, exact) if isinstance(layer, ChannelLayerNorm) else layer(features)
        features = features.flatten(1)
        return projection_logit(self.head(features), features, self.embed, y)


class DCGANGenerator(nn.Module):
    """Latent (B, z_dim) -> image (B, C, H, W) in [-1, 1]."""

    def __init__(self, z_dim: int, out_shape: tuple[int, ...], hidden: int = 32,
                 activation: str = "sigmoid", norm: str = "layer", bias: bool = False, n_classes: int = 0) -> None:
        super().__init__()
        channels, _, kernels, strides = image_spec(tuple(out_shape))
        self.embed = nn.Embedding(n_classes, z_dim) if n_classes else None
        width = z_dim * (2 if n_classes else 1)
        layers: list[nn.Module] = []
        for i, (kernel, stride) in enumerate(zip(reversed(kernels), reversed(strides))):
            conv = nn.ConvTranspose2d(width if i == 0 else hidden, hidden, kernel, stride, padding=0, bias=bias)
            layers += _block(conv, hidden, activation, norm, bias)
        self.net = nn.Sequential(*layers, nn.Conv2d(hidden, channels, 1, bias=bias), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = with_label_embedding(z.reshape(z.shape[0], -1), self.embed, y)
        return self.net(z.reshape(z.shape[0], -1, 1, 1))

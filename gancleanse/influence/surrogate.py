"""A smoothed-kink ReLU for influence estimation: the same training, a smoother derivative.

A GAN step contains the gradient of the losses, so ReLU's first derivative (the step function H)
is part of the trajectory itself, and its derivative (a Dirac at 0, taken as 0 by autograd) is
what ITD's VJP through the step needs. Removing one instance moves pre-activations across 0 and
flips H: the step map jumps, which an exact derivative of the piecewise-smooth trajectory cannot see.

``smoothed_relu(modules, T)`` swaps every ``nn.ReLU`` / ``nn.LeakyReLU`` of the generator and
discriminator for a module whose value and first derivative are bitwise ReLU's (so the replayed
training is the recorded one) and whose second derivative is the derivative of ``sigmoid(x / T)``
instead of 0: the Dirac is spread over a width T, as if H were ``sigmoid(x / T)`` (the derivative
of ``T * softplus(x / T)``) for the purpose of differentiating it. Within the context, ITD
estimates the expected effect of flips of pre-activations within about T of 0. Smoothing H itself
(the first derivative) would change the gradients each step applies, hence the trajectory: not done.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.autograd import Function


def kink_backward(x: torch.Tensor, grad: torch.Tensor, temperature: float, negative_slope: float) -> torch.Tensor:
    """ReLU's (LeakyReLU's) backward in value, with the smoothed jump in its own derivative."""
    exact = torch.where(x > 0, grad, grad * negative_slope)
    s = torch.sigmoid(x / temperature)  # s - s.detach(): exactly 0 in value, the derivative of sigmoid(x / T)
    return exact + grad * ((1.0 - negative_slope) * (s - s.detach()))


class _KinkSmoothedReLU(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, temperature: float, negative_slope: float) -> torch.Tensor:
        return torch.relu(x) if negative_slope == 0.0 else torch.nn.functional.leaky_relu(x, negative_slope)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, temperature, negative_slope = inputs
        ctx.save_for_backward(x)
        ctx.temperature, ctx.negative_slope = temperature, negative_slope

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        # Written with differentiable ops: the outer transform (ITD's VJP of a step that
        # itself takes a gradient) differentiates this backward.
        return kink_backward(x, grad, ctx.temperature, ctx.negative_slope), None, None


def kink_smoothed_relu(x: torch.Tensor, temperature: float, negative_slope: float = 0.0) -> torch.Tensor:
    """relu(x) (leaky_relu) in value and first derivative; second derivative sigmoid'(x / T) / T."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _KinkSmoothedReLU.apply(x, float(temperature), float(negative_slope))


class KinkSmoothedReLU(nn.Module):
    """Drop-in for ``nn.ReLU`` / ``nn.LeakyReLU`` (see ``kink_smoothed_relu``)."""

    def __init__(self, temperature: float, negative_slope: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.negative_slope = float(temperature), float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kink_smoothed_relu(x, self.temperature, self.negative_slope)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, negative_slope={self.negative_slope}"


def _targets(root: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, attribute name, activation) of ``root`` to swap."""
    return [(parent, name, child) for parent in root.modules() for name, child in parent.named_children()
            if isinstance(child, (nn.ReLU, nn.LeakyReLU))]


@contextmanager
def smoothed_relu(modules, temperature: float) -> Iterator[int]:
    """Within the context, the ReLUs of ``modules`` (a ``GANModules``, e.g. ``run.models``, or any ``nn.Module``)
    are kink-smoothed; the originals are put back on exit, also on error. Yields how many were swapped."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    roots = [modules.generator, modules.discriminator] if hasattr(modules, "discriminator") else [modules]
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for root in roots:
            for parent, name, child in _targets(root):
                slope = child.negative_slope if isinstance(child, nn.LeakyReLU) else 0.0
                setattr(parent, name, KinkSmoothedReLU(temperature, slope))
                swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)

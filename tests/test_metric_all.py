"""ALL (average log-likelihood under a Gaussian KDE) against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from gancleanse.metrics.all_kde import average_log_likelihood


@pytest.mark.parametrize("bandwidth,chunk", [(1.0, 2048), (0.3, 7)])
def test_all_matches_scipy_logsumexp_of_gaussian_kernels(bandwidth, chunk):
    gen = np.random.default_rng(0)
    real, fake = gen.normal(size=(50, 3)), gen.normal(loc=0.5, size=(40, 3))
    sq = ((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1)
    log_kernels = -sq / (2 * bandwidth**2) - 1.5 * math.log(2 * math.pi * bandwidth**2)
    expected = np.mean(scipy.special.logsumexp(log_kernels, axis=1) - math.log(len(fake)))
    got = average_log_likelihood(torch.from_numpy(real), torch.from_numpy(fake), bandwidth, chunk=chunk)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_in_place_kernel_is_bitwise_the_out_of_place_expression():
    """The in-place distance computation keeps every recorded ALL value bit for bit."""
    gen = torch.Generator().manual_seed(3)
    x, g, h = torch.randn(300, 2, generator=gen, dtype=torch.float64), torch.randn(200, 2, generator=gen,
                                                                                dtype=torch.float64), 0.7
    d2 = ((x * x).sum(1, keepdim=True) + (g * g).sum(1)[None, :] - 2.0 * x @ g.T).clamp_min(0.0)
    reference = torch.logsumexp(-d2 / (2.0 * h**2), dim=1).sum() / 300 - (math.log(200) + math.log(2 * math.pi * h**2))
    for chunk in (1, 7, 128, 4096):  # blocks of any height: the same bits
        assert torch.equal(average_log_likelihood(x, g, h, chunk=chunk), reference), chunk


def test_all_gradient_passes_gradcheck():
    """ITD differentiates ALL through the in-place kernel blocks."""
    gen = torch.Generator().manual_seed(5)
    real = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    fake = torch.randn(15, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: average_log_likelihood(real, g, 0.6, chunk=6), (fake,))

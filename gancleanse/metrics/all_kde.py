"""ALL: average log-likelihood of real points under a Gaussian KDE of generated points.

    ALL = mean_m log( (1/n) sum_k N(x_m; G(z_k), h^2 I) )

computed with logsumexp in float64 (the densities underflow otherwise). Higher is better.
"""

from __future__ import annotations

import math

import torch


def average_log_likelihood(real: torch.Tensor, generated: torch.Tensor, bandwidth: float = 1.0,
                           chunk: int = 2048) -> torch.Tensor:
    """Mean log KDE density of ``real`` (M, ...) under kernels centred on ``generated`` (n, ...)."""
    x = real.reshape(real.shape[0], -1).to(torch.float64)
    g = generated.reshape(generated.shape[0], -1).to(torch.float64)
    n, d = g.shape
    g_sq = (g * g).sum(1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        xc = x[start:start + chunk]
        # |x|^2 + |g|^2 - 2 x.g, clamped and scaled in place: the same operations in the same
        # order as the out-of-place expression (bitwise), without four temporaries of M x n
        d2 = torch.add((xc * xc).sum(1, keepdim=True), g_sq[None, :])
        d2.add_((xc @ g.T).mul_(-2.0)).clamp_min_(0.0).div_(-2.0 * bandwidth**2)
        total = total + torch.logsumexp(d2, dim=1).sum()
    log_norm = math.log(n) + 0.5 * d * math.log(2.0 * math.pi * bandwidth**2)
    return total / x.shape[0] - log_norm

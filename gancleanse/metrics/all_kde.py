"""ALL: average log-likelihood of real points under a Gaussian KDE of generated points.

    ALL = mean_m log( (1/n) sum_k N(x_m; G(z_k), h^2 I) )

computed with logsumexp in float64 (the densities underflow otherwise). Higher is better.
"""

from __future__ import annotations

import math

import torch


def average_log_likelihood(real: torch.Tensor, generated: torch.Tensor, bandwidth: float = 1.0,
                           chunk: int = 128) -> torch.Tensor:
    """Mean log KDE density of ``real`` (M, ...) under kernels centred on ``generated`` (n, ...).

    Real points are taken ``chunk`` rows at a time, so that each block of the kernel matrix
    stays in cache through its passes (rather than one block of all real points), and the rows'
    log densities are summed once at the end: the value does not depend on ``chunk``.
    """
    x = real.reshape(real.shape[0], -1).to(torch.float64)
    g = generated.reshape(generated.shape[0], -1).to(torch.float64)
    n, d = g.shape
    g_sq = (g * g).sum(1)
    rows = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        x_chunk = x[start:start + chunk]
        # |x|^2 + |g|^2 - 2 x.g, clamped and scaled in place: the same operations in the same
        # order as the out-of-place expression (bitwise), without four temporaries
        d2 = torch.add((x_chunk * x_chunk).sum(1, keepdim=True), g_sq[None, :])
        d2.add_((x_chunk @ g.T).mul_(-2.0)).clamp_min_(0.0).div_(-2.0 * bandwidth**2)
        rows[start:start + chunk] = torch.logsumexp(d2, dim=1)
    log_norm = math.log(n) + 0.5 * d * math.log(2.0 * math.pi * bandwidth**2)
    return rows.sum() / x.shape[0] - log_norm

"""Kernel Inception Distance: the unbiased MMD^2 between real and generated features.

    k(x, y) = (x . y / d + 1) ** degree          (d = feature dimension, degree = metric.kid_degree)
    KID = sum_{i != j} k(r_i, r_j) / (m (m-1)) + sum_{i != j} k(g_i, g_j) / (n (n-1))
          - 2 sum_{i,j} k(r_i, g_j) / (m n)

in float64 over the full sets (no subsets), differentiable in the generated features. The real-real term
does not depend on the generator and is computed once (``real_kernel_mean``). Memory: kernel sums are taken
``chunk`` rows at a time (chunk x n, never n x n without a graph); ``kid_gradient`` gives the gradient in
closed form the same way, for ``Metric.gradient``. Autograd through ``kernel_inception_distance`` keeps
every block (n x (n + m) in all). Lower is better.
"""

from __future__ import annotations

import torch

from ..errors import DataError


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int) -> torch.Tensor:
    """(x y^T / d + 1) ** degree for rows of x (m, d) and y (n, d)."""
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def _check(features: torch.Tensor, what: str) -> torch.Tensor:
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError(f"KID needs at least 2 {what} feature rows of shape (n, d), got {tuple(features.shape)}")
    return features.to(torch.float64)


def off_diagonal_mean(x: torch.Tensor, degree: int, chunk: int = 4096) -> torch.Tensor:
    """Mean of k(x_i, x_j) over i != j (row blocks, so a large real set fits in memory)."""
    x = _check(x, "")
    n = x.shape[0]
    total = x.new_zeros(())
    for start in range(0, n, chunk):
        total = total + polynomial_kernel(x[start:start + chunk], x, degree).sum()
    diag = ((x * x).sum(1) / x.shape[1] + 1.0) ** degree
    return (total - diag.sum()) / (n * (n - 1))


@torch.no_grad()
def real_kernel_mean(real: torch.Tensor, degree: int) -> torch.Tensor:
    """The generator-independent term of KID, computed once per real split."""
    return off_diagonal_mean(real, degree)


def kernel_inception_distance(real: torch.Tensor, generated: torch.Tensor, degree: int = 3,
                              real_term: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Unbiased MMD^2 with the polynomial kernel; pass ``real_term`` to reuse the real-real mean."""
    r, g = _check(real, "real"), _check(generated, "generated")
    if r.shape[1] != g.shape[1]:
        raise DataError(f"KID: real features have dimension {r.shape[1]}, generated {g.shape[1]}")
    real_mean = off_diagonal_mean(r, degree) if real_term is None else real_term
    cross = sum(polynomial_kernel(g[i:i + chunk], r, degree).sum() for i in range(0, g.shape[0], chunk))
    return real_mean + off_diagonal_mean(g, degree, chunk) - 2.0 * cross / (r.shape[0] * g.shape[0])


@torch.no_grad()
def kid_gradient(real: torch.Tensor, generated: torch.Tensor, degree: int, chunk: int = 4096) -> torch.Tensor:
    """dKID/d(generated) in closed form, ``chunk`` rows at a time (no Gram matrix is kept): row i is
    2 / (n (n-1)) sum_{j != i} k'(g_i . g_j) g_j / d  -  2 / (m n) sum_k k'(r_k . g_i) r_k / d,
    with k'(t) = degree (t / d + 1)^(degree - 1)."""
    r, g = _check(real, "real"), _check(generated, "generated")
    (n, d), m = g.shape, r.shape[0]
    out = torch.empty_like(g)
    for start in range(0, n, chunk):
        rows = g[start:start + chunk]
        slope_g = degree * (rows @ g.T / d + 1.0) ** (degree - 1)
        slope_g[:, start:start + rows.shape[0]].fill_diagonal_(0.0)  # i != j
        slope_r = degree * (rows @ r.T / d + 1.0) ** (degree - 1)
        out[start:start + chunk] = (2.0 / (n * (n - 1)) * (slope_g @ g) - 2.0 / (m * n) * (slope_r @ r)) / d
    return out

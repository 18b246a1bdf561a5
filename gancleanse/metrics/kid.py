"""Kernel Inception Distance: the unbiased MMD^2 between real and generated features.

    k(x, y) = (x . y / d + 1) ** degree          (d = feature dimension, degree = metric.kid_degree)
    KID = sum_{i != j} k(r_i, r_j) / (m (m-1)) + sum_{i != j} k(g_i, g_j) / (n (n-1))
          - 2 sum_{i,j} k(r_i, g_j) / (m n)

in float64 over the full sets (no subsets), differentiable in the generated features. The real-real term
does not depend on the generator and is computed once (``real_kernel_mean``). Memory: the generated Gram
matrix is n x n and the cross one m x n, both kept for the backward pass (n = 5,000 costs about 200 MB
each in float64). Lower is better.
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
                              real_term: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased MMD^2 with the polynomial kernel; pass ``real_term`` to reuse the real-real mean."""
    r, g = _check(real, "real"), _check(generated, "generated")
    if r.shape[1] != g.shape[1]:
        raise DataError(f"KID: real features have dimension {r.shape[1]}, generated {g.shape[1]}")
    real_mean = off_diagonal_mean(r, degree) if real_term is None else real_term
    gram = polynomial_kernel(g, g, degree)
    n = g.shape[0]
    generated_mean = (gram.sum() - gram.diagonal().sum()) / (n * (n - 1))
    cross_mean = polynomial_kernel(r, g, degree).mean()
    return real_mean + generated_mean - 2.0 * cross_mean

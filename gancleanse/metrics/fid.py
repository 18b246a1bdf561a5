"""Frechet distance between Gaussians fitted to real and generated classifier features (FID).

    FID = ||mu_r - mu_g||^2 + tr S_r + tr S_g - 2 tr sqrt( S_r^1/2 S_g S_r^1/2 )

in float64, covariances unbiased (ddof = 1). The matrix inside the square root is symmetric positive
semi-definite and has the eigenvalues of S_r S_g, so its trace square root is sum_i sqrt(lambda_i) with
lambda from ``eigvalsh``. Only eigenvalues are differentiated, whose gradient V diag(.) V^T is well
defined even when eigenvalues repeat (no 1/(lambda_i - lambda_j) terms as in a full eigenvector derivative).

Small eigenvalues: before the square root, eigenvalues are clamped from below at ``d * eps * max(lambda)``
(eps = float64 machine epsilon; d = feature dimension). That removes round-off negatives and bounds the
derivative 1/(2 sqrt(lambda)), which is infinite at 0; eigenvalues below the floor get zero gradient, and
the value changes by at most d * sqrt(floor). The same clamp at 0 gives S_r^1/2.

Ridge: ``ridge`` * I (``metric.fid_ridge``) is added to BOTH covariances when the real set makes the
problem singular: fewer real or generated samples than d + 1 (the covariance is rank deficient by
construction), or a real covariance whose smallest eigenvalue is below ``d * eps * max``. The decision
depends only on the real features and the number of generated samples, never on the generated values, so
a metric is one smooth function of the generator (a data-dependent switch would make counterfactual and
estimate disagree). With identical sets the ridge cancels (FID = 0); otherwise it shifts FID by O(ridge * d).

The real side (mean, S_r^1/2 and tr S_r) is computed once per real split (``FIDReference``). The result
is clamped at 0 (round-off can make FID(X, X) a tiny negative). Lower is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError

EPS = torch.finfo(torch.float64).eps


def covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased (ddof = 1) covariance of the rows, float64, exactly symmetric."""
    f = features.to(torch.float64)
    mu = f.mean(0)
    c = f - mu
    cov = c.T @ c / (f.shape[0] - 1)
    return mu, 0.5 * (cov + cov.T)


def _floor(eigenvalues: torch.Tensor) -> torch.Tensor:
    return eigenvalues.shape[0] * EPS * eigenvalues.detach().abs().max()


def trace_sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """tr sqrt(M) = sum sqrt(eigvalsh(M)) for symmetric PSD M, with the floor described above."""
    lam = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return lam.clamp_min(_floor(lam)).sqrt().sum()


@dataclass(frozen=True)
class FIDReference:
    """The real split's side of FID, fixed for every generator."""

    mean: torch.Tensor
    sqrt_cov: torch.Tensor
    trace_cov: torch.Tensor
    ridge: float  # the ridge added to both covariances (0.0 when not needed)


def _check(features: torch.Tensor, what: str) -> None:
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError(f"FID needs at least 2 {what} feature rows of shape (n, d), got {tuple(features.shape)}")


@torch.no_grad()
def fid_reference(real: torch.Tensor, ridge: float = 1e-6, n_generated: int | None = None) -> FIDReference:
    """Mean, S_r^1/2 and tr S_r of the real features; decides whether the ridge applies."""
    _check(real, "real")
    mu, cov = covariance(real)
    d = cov.shape[0]
    lam = torch.linalg.eigvalsh(cov)
    singular = (real.shape[0] <= d or (n_generated is not None and n_generated <= d)
                or bool(lam[0] <= _floor(lam)))
    used = float(ridge) if singular else 0.0
    if used:
        cov = cov + used * torch.eye(d, dtype=cov.dtype, device=cov.device)
    lam, vec = torch.linalg.eigh(cov)  # S_r^1/2, eigenvalues clamped at 0
    return FIDReference(mu, (vec * lam.clamp_min(0.0).sqrt()) @ vec.T, torch.trace(cov), used)


def frechet_distance(ref: FIDReference, generated: torch.Tensor) -> torch.Tensor:
    """FID of generated features (n, d) against a precomputed real reference; differentiable."""
    _check(generated, "generated")
    if generated.shape[1] != ref.mean.shape[0]:
        raise DataError(f"FID: real features have dimension {ref.mean.shape[0]}, generated {generated.shape[1]}")
    mu, cov = covariance(generated)
    if ref.ridge:
        cov = cov + ref.ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    diff = ref.mean - mu
    cross = trace_sqrt_psd(ref.sqrt_cov @ cov @ ref.sqrt_cov)
    return (diff @ diff + ref.trace_cov + torch.trace(cov) - 2.0 * cross).clamp_min(0.0)


def frechet_inception_distance(real: torch.Tensor, generated: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """FID between two feature sets (the real side is not differentiated)."""
    return frechet_distance(fid_reference(real, ridge, generated.shape[0]), generated)

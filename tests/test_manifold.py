"""Precision, recall, density and coverage against a brute-force NumPy computation and their known limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gancleanse.errors import ConfigError, DataError
from gancleanse.metrics.manifold import (density_coverage, knn_radii, manifold_recall, precision_recall,
                                         real_manifold)
from gancleanse.specs import direction, metric_spec


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The four metrics from full distance matrices and explicit loops over the samples."""
    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x: np.ndarray) -> np.ndarray:
        d = distances(x, x)
        return np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(len(x))])

    r_real, r_fake, d = radii(real), radii(fake), distances(real, fake)  # d[i, j]: real i to fake j
    n, m = d.shape
    precision = sum(any(d[i, j] <= r_real[i] for i in range(n)) for j in range(m)) / m
    recall = sum(any(d[i, j] <= r_fake[j] for j in range(m)) for i in range(n)) / n
    density = sum(int(d[i, j] <= r_real[i]) for i in range(n) for j in range(m)) / (k * m)
    coverage = sum(d[i].min() <= r_real[i] for i in range(n)) / n
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def computed(real: torch.Tensor, fake: torch.Tensor, k: int, chunk: int) -> dict[str, float]:
    p, r = precision_recall(real, fake, k, chunk)
    dens, cov = density_coverage(real, fake, k, chunk)
    return {"precision": p, "recall": r, "density": dens, "coverage": cov}


def sets(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussians of different spread: every metric strictly between its limits."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, d, generator=g, dtype=torch.float64)
    fake = 0.8 + 0.9 * torch.randn(m, d, generator=g, dtype=torch.float64)
    return real, fake


@pytest.mark.parametrize("n, m, d, k", [(40, 30, 3, 1), (57, 83, 5, 3), (120, 64, 8, 5), (33, 33, 3, 6)])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_matches_brute_force(n: int, m: int, d: int, k: int, chunk: int) -> None:
    real, fake = sets(n, m, d, seed=n + m + k)
    expected = brute_force(real.numpy(), fake.numpy(), k)
    got = computed(real, fake, k, chunk)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected["precision"] < 1.0 and 0.0 < expected["recall"] < 1.0  # not a limit case
    assert 0.0 < expected["coverage"] < 1.0 and expected["density"] > 0.0


@pytest.mark.parametrize("chunk", [3, 1000])
def test_ties_on_an_integer_grid(chunk: int) -> None:
    """Integer features: distances are square roots of exact integer sums, so many pairs tie exactly with a radius
    (and NumPy's values equal ours bitwise); every tie counts in."""
    g = torch.Generator().manual_seed(6)
    real = torch.randint(0, 3, (70, 4), generator=g).double()
    fake = torch.randint(0, 3, (50, 4), generator=g).double()
    for k in (1, 4):
        assert computed(real, fake, k, chunk) == brute_force(real.numpy(), fake.numpy(), k)


def test_samples_close_together_far_from_the_origin() -> None:
    """Spread 1e-3 at distance 1e6 from the origin: the Gram expansion |a|^2 + |b|^2 - 2 a.b loses every digit of
    the distances, so each decision falls back to the differences."""
    real, fake = sets(40, 30, 5, seed=7)
    real, fake = 1e6 + 1e-3 * real, 1e6 + 1e-3 * fake
    gram = torch.cdist(real, fake, compute_mode="use_mm_for_euclid_dist")
    assert not torch.allclose(gram, torch.cdist(real, fake, compute_mode="donot_use_mm_for_euclid_dist"), rtol=0.1)
    expected = brute_force(real.numpy(), fake.numpy(), 3)
    assert computed(real, fake, 3, 7) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected["precision"] < 1.0 and 0.0 < expected["coverage"] < 1.0


def test_float32_features_are_measured_in_float64() -> None:
    real, fake = sets(50, 40, 4, seed=1)
    expected = brute_force(real.float().double().numpy(), fake.float().double().numpy(), 3)
    assert computed(real.float(), fake.float(), 3, 16) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k, chunk", [(1, 4), (3, 7), (5, 1000)])
def test_identical_sets(k: int, chunk: int) -> None:
    """Each sample lies in its own ball: precision = recall = coverage = 1; each real ball holds its centre and
    its k neighbours (no ties in continuous data), so density = (k + 1) / k."""
    real, _ = sets(45, 1, 6, seed=k)
    got = computed(real, real.clone(), k, chunk)
    assert got == {"precision": 1.0, "recall": 1.0, "coverage": 1.0, "density": (k + 1) / k}


def test_sets_far_apart_score_zero() -> None:
    real, fake = sets(50, 40, 3, seed=2)
    assert computed(real, fake + 1e3, 3, 8) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("chunk", [3, 1000])
def test_one_real_point_repeated(chunk: int) -> None:
    """Generated = real[0] m times: their k-NN balls have radius 0 and hold only real[0], so recall = 1/n exactly;
    every generated sample is real[0], inside its own ball, so precision = 1."""
    real, _ = sets(60, 1, 4, seed=3)
    fake = real[:1].repeat(25, 1)
    precision, recall = precision_recall(real, fake, 3, chunk)
    assert (precision, recall) == (1.0, 1 / 60)
    assert computed(real, fake, 3, chunk) == pytest.approx(brute_force(real.numpy(), fake.numpy(), 3), abs=1e-12)


def test_radii_exclude_the_point_but_count_its_duplicates() -> None:
    x = torch.tensor([[0.0], [0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert knn_radii(x, 1, chunk=2).tolist() == [0.0, 0.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2, chunk=3).tolist() == [1.0, 1.0, 1.0, 3.0, 6.0]


def test_chunking_gives_bitwise_the_same_radii() -> None:
    real, _ = sets(101, 1, 7, seed=4)
    whole = knn_radii(real, 4, chunk=1000)
    for chunk in (1, 10, 33):
        assert torch.equal(knn_radii(real, 4, chunk=chunk), whole)


def test_k_not_below_the_sample_count_is_refused() -> None:
    real, fake = sets(5, 3, 2, seed=5)
    with pytest.raises(DataError, match=r"k = 5 need more than k real samples, got n = 5"):
        precision_recall(real, fake, 5)
    with pytest.raises(DataError, match=r"k = 3 need more than k generated samples, got n = 3"):
        manifold_recall(real_manifold(real, 3), fake)
    with pytest.raises(DataError, match="k >= 1"):
        density_coverage(real, fake, 0)
    with pytest.raises(DataError, match="dimension 2, generated 3"):
        density_coverage(real, torch.zeros(4, 3, dtype=torch.float64), 2)
    with pytest.raises(DataError, match="not finite"):
        precision_recall(real, torch.full((4, 2), float("nan")), 2)


def test_evaluation_metrics_have_a_direction_but_cannot_be_scored() -> None:
    for name in ("precision", "recall", "density", "coverage"):
        assert direction(name) == 1.0
        with pytest.raises(ConfigError, match=f"metric '{name}' is evaluation only"):
            metric_spec(name)

"""IS, log IS, FID and KID against independent NumPy/SciPy computations, their gradients
against central finite differences, and the classifier (accuracy, cache, user extractor)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from torch import nn

import gancleanse as gc
from gancleanse.config import Config, MetricConfig
from gancleanse.errors import ConfigError, DataError
from gancleanse.features import classifier as clf
from gancleanse.features.base import FeatureModel, freeze
from gancleanse.features.classifier import SmallCNN, cached_classifier
from gancleanse.features.torchscript import load_extractor
from gancleanse.metrics import make_metric
from gancleanse.metrics.fid import (
    fid_reference,
    frechet_distance,
    frechet_inception_distance,
)
from gancleanse.metrics.inception_score import inception_score, log_inception_score
from gancleanse.metrics.kid import kernel_inception_distance, real_kernel_mean

F64 = torch.float64


def features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Correlated, non-Gaussian random features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    return torch.sigmoid(torch.randn(n, d, generator=g, dtype=F64) @ mix + shift)


def digits_split(n_train: int = 1297, n_test: int = 250, seed: int = 0):
    """sklearn's 8x8 digits in [-1, 1], shape (N, 1, 8, 8), seeded train/test cut."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images / 8.0 - 1.0)[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[-n_test:]
    return x[tr], y[tr], x[te], y[te]


# --------------------------------------------------------------- reference values
def np_fid(r: np.ndarray, g: np.ndarray, ridge: float = 0.0) -> float:
    s_r = np.cov(r, rowvar=False) + ridge * np.eye(r.shape[1])
    s_g = np.cov(g, rowvar=False) + ridge * np.eye(r.shape[1])
    cross = scipy.linalg.sqrtm(s_r @ s_g)
    diff = r.mean(0) - g.mean(0)
    return float(diff @ diff + np.trace(s_r) + np.trace(s_g) - 2.0 * np.trace(cross).real)


def np_kid(r: np.ndarray, g: np.ndarray, degree: int) -> float:
    d = r.shape[1]
    m, n = len(r), len(g)
    krr, kgg, krg = ((a @ b.T / d + 1.0) ** degree for a, b in ((r, r), (g, g), (r, g)))
    return float((krr.sum() - np.trace(krr)) / (m * (m - 1)) + (kgg.sum() - np.trace(kgg)) / (n * (n - 1))
                 - 2.0 * krg.mean())


def np_log_is_parts(logits: np.ndarray, splits: int) -> list[float]:
    out = []
    for part in np.array_split(logits, splits):
        p = scipy.special.softmax(part, axis=1)
        p_bar = p.mean(0)
        out.append(float(np.mean([scipy.special.rel_entr(row, p_bar).sum() for row in p])))
    return out


def test_fid_matches_scipy_sqrtm() -> None:
    r, g = features(300, 8, 0), features(200, 8, 1, shift=0.3)
    ref = fid_reference(r, ridge=1e-6, n_generated=200)
    assert ref.ridge == 0.0  # full rank: no ridge
    ours = float(frechet_distance(ref, g))
    assert ours == pytest.approx(np_fid(r.numpy(), g.numpy()), rel=1e-6)
    assert ours > 0.01


def test_fid_ridge_applies_when_rank_deficient() -> None:
    r, g = features(300, 16, 2), features(12, 16, 3, shift=0.2)  # 12 generated rows < d + 1
    ref = fid_reference(r, ridge=1e-3, n_generated=12)
    assert ref.ridge == 1e-3
    assert float(frechet_distance(ref, g)) == pytest.approx(np_fid(r.numpy(), g.numpy(), 1e-3), rel=1e-6)
    r_singular = torch.cat([r[:, :15], r[:, :1]], 1)  # two equal columns: singular real covariance
    assert fid_reference(r_singular, ridge=1e-3, n_generated=300).ridge == 1e-3


@pytest.mark.parametrize("n", [200, 10])  # full rank, and rank deficient (ridge)
def test_fid_of_identical_sets_is_zero(n: int) -> None:
    x = features(n, 16, 4)
    value = float(frechet_inception_distance(x, x.clone(), ridge=1e-6))
    assert 0.0 <= value < 1e-9
    assert float(frechet_inception_distance(x, features(n, 16, 5))) > 1e-3


@pytest.mark.parametrize("degree", [1, 3])
def test_kid_matches_numpy(degree: int) -> None:
    r, g = features(120, 6, 6), features(90, 6, 7, shift=0.5)
    ours = kernel_inception_distance(r, g, degree)
    assert float(ours) == pytest.approx(np_kid(r.numpy(), g.numpy(), degree), rel=1e-6)
    cached = kernel_inception_distance(r, g, degree, real_term=real_kernel_mean(r, degree))
    assert float(cached) == float(ours)
    same_law = kernel_inception_distance(r, features(90, 6, 13), degree)  # unbiased: about 0, either sign
    assert abs(float(same_law)) < 0.1 * float(ours)


@pytest.mark.parametrize("splits", [1, 3])
def test_inception_score_matches_numpy(splits: int) -> None:
    logits = torch.randn(100, 10, generator=torch.Generator().manual_seed(8), dtype=F64) * 3
    parts = np_log_is_parts(logits.numpy(), splits)
    assert float(log_inception_score(logits, splits)) == pytest.approx(np.mean(parts), rel=1e-6)
    assert float(inception_score(logits, splits)) == pytest.approx(np.mean(np.exp(parts)), rel=1e-6)
    if splits == 1:
        assert float(inception_score(logits)) == pytest.approx(np.exp(float(log_inception_score(logits))),
                                                               rel=1e-12)
    with pytest.raises(ConfigError, match="is_splits"):
        inception_score(logits, 101)


# --------------------------------------------------------------------- gradients
def test_feature_gradients_match_finite_differences() -> None:
    r = features(50, 5, 9)
    ref = fid_reference(r, ridge=1e-6, n_generated=30)
    rr = real_kernel_mean(r, 3)
    g = features(30, 5, 10, shift=0.4).requires_grad_(True)
    logits = (torch.randn(30, 4, generator=torch.Generator().manual_seed(1), dtype=F64)).requires_grad_(True)
    kw = {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-5}
    assert torch.autograd.gradcheck(lambda x: frechet_distance(ref, x), (g,), **kw)
    assert torch.autograd.gradcheck(lambda x: kernel_inception_distance(r, x, 3, rr), (g,), **kw)
    assert torch.autograd.gradcheck(lambda x: inception_score(x), (logits,), **kw)
    assert torch.autograd.gradcheck(lambda x: log_inception_score(x, 2), (logits,), **kw)


def whiten(x: torch.Tensor) -> torch.Tensor:
    c = x - x.mean(0)
    chol = torch.linalg.cholesky(c.T @ c / (x.shape[0] - 1))
    return torch.linalg.solve_triangular(chol, c.T, upper=False).T


def test_fid_gradient_with_repeated_eigenvalues() -> None:
    """S_r = I and S_g = 4 I: every eigenvalue of S_r^1/2 S_g S_r^1/2 equals 4."""
    r = whiten(features(40, 4, 11))
    g = (2.0 * whiten(features(25, 4, 12)) + 0.1).requires_grad_(True)
    ref = fid_reference(r, ridge=0.0, n_generated=25)
    value = frechet_distance(ref, g)
    assert float(value.detach()) == pytest.approx(4 * 0.01 + 4 + 16 - 2 * 4 * 2, rel=1e-9)  # |mu|^2 + tr + tr - 2 tr
    (grad,) = torch.autograd.grad(value, g)
    assert torch.isfinite(grad).all()
    assert torch.autograd.gradcheck(lambda x: frechet_distance(ref, x), (g,), eps=1e-6, atol=1e-7, rtol=1e-5)


class TinyExtractor(nn.Module):
    """A float64 image -> (features, logits) map with few features (FID stays full rank)."""

    def __init__(self, pixels: int, d: int = 5, k: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(pixels, d, generator=g, dtype=F64) / pixels**0.5)
        self.v = nn.Parameter(torch.randn(d, k, generator=g, dtype=F64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.sigmoid(x.flatten(1) @ self.w)
        return f, f @ self.v


def directional_check(fn, x: torch.Tensor, seed: int, h: float = 1e-5, rel: float = 1e-6) -> None:
    """<grad f, v> against the central difference (f(x + h v) - f(x - h v)) / 2h."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x), x)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    for k in range(2):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + k), dtype=F64)
        with torch.no_grad():
            fd = (fn(x + h * v) - fn(x - h * v)) / (2 * h)
        assert float((grad * v).sum()) == pytest.approx(float(fd), rel=rel, abs=1e-10)


def image_metric(metric: str, model: FeatureModel, real: torch.Tensor, n: int):
    """generated images -> metric value, with the real side fixed."""
    real_f = model.evaluate(real)[0]
    if metric == "is":
        return lambda x: inception_score(model.logits(x))
    if metric == "log_is":
        return lambda x: log_inception_score(model.logits(x))
    if metric == "fid":
        ref = fid_reference(real_f, 1e-6, n)
        return lambda x: frechet_distance(ref, model.features(x))
    rr = real_kernel_mean(real_f, 3)
    return lambda x: kernel_inception_distance(real_f, model.features(x), 3, rr)


@pytest.mark.parametrize("metric", ["is", "log_is", "fid", "kid"])
def test_image_gradients_through_the_classifier(metric: str) -> None:
    """Gradients w.r.t. generated images, through a frozen model, match finite differences."""
    g = torch.Generator().manual_seed(20)
    real = torch.rand(80, 1, 8, 8, generator=g, dtype=F64) * 2 - 1
    fake = torch.tanh(torch.randn(40, 1, 8, 8, generator=g, dtype=F64))
    cnn = SmallCNN((1, 8, 8), 10)
    cnn.reset_parameters(torch.Generator().manual_seed(3))
    models = {"cnn": FeatureModel(freeze(cnn.to(F64)), F64, "cnn", "test"),
              "tiny": FeatureModel(freeze(TinyExtractor(64)), F64, "tiny", "test")}
    # FID through the 128-d CNN features would need > 128 samples for a full-rank covariance;
    # the CNN is checked on is/log_is/kid and the small extractor on all four.
    for name, model in models.items():
        if metric == "fid" and name == "cnn":
            continue
        assert not any(p.requires_grad for p in model.module.parameters())
        directional_check(image_metric(metric, model, real, fake.shape[0]), fake, seed=30)


# -------------------------------------------------------------------- classifier
def test_classifier_reaches_95_percent_on_digits(tmp_path: Path) -> None:
    x_tr, y_tr, x_te, y_te = digits_split()
    started = time.perf_counter()
    model = cached_classifier(tmp_path, x_tr, y_tr, x_te, y_te, MetricConfig(), seed=0)
    seconds = time.perf_counter() - started
    assert model.accuracy is not None and model.accuracy >= 0.95, model.accuracy
    assert clf.accuracy(model.module, x_te, y_te) == model.accuracy  # float64 copy agrees
    assert seconds < 60
    feats, logits = model(x_te[:7])
    assert feats.shape == (7, 128) and logits.shape == (7, 10) and feats.dtype == F64
    meta = json.loads((tmp_path / "classifier.json").read_text())
    assert meta["test_accuracy"] == model.accuracy and meta["settings"]["epochs"] == MetricConfig().classifier_epochs


def test_classifier_shapes_for_28x28() -> None:
    cnn = SmallCNN((1, 28, 28), 10)
    assert cnn.hidden.in_features == 7 * 7 * 8
    f, logits = cnn(torch.zeros(3, 1, 28, 28))
    assert f.shape == (3, 128) and logits.shape == (3, 10)
    with pytest.raises(DataError, match="4x4"):
        SmallCNN((1, 3, 3), 10)


def test_classifier_cache_reuse_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x_tr, y_tr, x_te, y_te = digits_split(300, 100)
    calls: list[int] = []
    real_train = clf.train_classifier

    def counting(*args, **kwargs):
        calls.append(kwargs["epochs"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(clf, "train_classifier", counting)
    cfg = MetricConfig(classifier_epochs=2)
    first = cached_classifier(tmp_path, x_tr, y_tr, x_te, y_te, cfg, seed=1)
    weights = tmp_path / "classifier.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = cached_classifier(tmp_path, x_tr, y_tr, x_te, y_te, cfg, seed=1)
    assert calls == [2] and weights.stat().st_mtime_ns == stamp
    assert again.key == first.key and again.accuracy == first.accuracy
    assert torch.equal(again.module.out.weight, first.module.out.weight)

    cached_classifier(tmp_path, x_tr, y_tr, x_te, y_te, MetricConfig(classifier_epochs=3), seed=1)
    assert calls == [2, 3]
    assert json.loads((tmp_path / "classifier.json").read_text())["settings"]["epochs"] == 3
    y_changed = y_tr.clone()
    y_changed[0] = (y_changed[0] + 1) % 10
    cached_classifier(tmp_path, x_tr, y_changed, x_te, y_te, MetricConfig(classifier_epochs=3), seed=1)
    assert calls == [2, 3, 3]  # other labels: retrained
    cached_classifier(tmp_path, x_tr, y_changed, x_te, y_te, MetricConfig(classifier_epochs=3), seed=2)
    assert calls == [2, 3, 3, 3]  # other seed: retrained


# --------------------------------------------------------------------- extractor
class ScriptedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.tanh(self.lin(x.flatten(1)))
        return f, f[:, :3] * 2.0


class ScriptedFlat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)  # shape (N,): not logits


def script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_extractor_loads_and_is_checked(tmp_path: Path) -> None:
    path = script(ScriptedPair(), tmp_path / "pair.pt")
    model = load_extractor(path, (1, 8, 8))
    x = torch.rand(5, 1, 8, 8, dtype=F64)
    f, logits = model(x)
    assert f.shape == (5, 6) and logits.shape == (5, 3) and f.dtype == F64
    assert not any(p.requires_grad for p in model.module.parameters())

    with pytest.raises(ConfigError, match="missing.pt"):
        load_extractor(tmp_path / "missing.pt", (1, 8, 8))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(DataError, match="junk.pt.*not a loadable TorchScript"):
        load_extractor(junk, (1, 8, 8))
    flat = script(ScriptedFlat(), tmp_path / "flat.pt")
    with pytest.raises(DataError, match=r"flat.pt.*got tensor of shape \(2,\)"):
        load_extractor(flat, (1, 8, 8))
    with pytest.raises(DataError, match=r"pair.pt: failed on a batch of shape \(2, 1, 5, 5\)"):
        load_extractor(path, (1, 5, 5))


# ------------------------------------------------------------------ run level
def digits_config(**metric) -> Config:
    return Config.from_dict({
        "data": {"name": "digits", "n_train": 300, "n_valid": 120, "n_test": 100, "seed": 0},
        "model": {"arch": "mlp", "activation": "softplus", "g_hidden": 16, "d_hidden": 16, "z_dim": 4},
        "train": {"epochs": 1, "batch_size": 50, "lr_d": 0.01, "lr_g": 0.01, "checkpoint_every": 6},
        "metric": {"n_samples": 150, "classifier_epochs": 20, **metric},
    })


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> gc.Run:
    return gc.train(digits_config(), tmp_path_factory.mktemp("digits") / "run", progress=False)


@pytest.mark.parametrize("name", ["is", "log_is", "fid", "kid"])
def test_make_metric_on_a_digits_run(digits_run: gc.Run, name: str) -> None:
    run = digits_run
    metric = make_metric(name, run, "valid")
    state = run.final_state()
    model = clf.load_or_train_classifier(run)
    assert (run.path / "classifier.safetensors").is_file()
    fake = run.models.generate(run.dynamics.eval_generator(state), run.eval_latents("valid"))
    real_f = model.evaluate(run.splits.valid)[0]
    expected = {"is": lambda: inception_score(model.logits(fake)),
                "log_is": lambda: log_inception_score(model.logits(fake)),
                "fid": lambda: frechet_inception_distance(real_f, model.features(fake), 1e-6),
                "kid": lambda: kernel_inception_distance(real_f, model.features(fake), 3)}[name]()
    assert metric.value(state) == pytest.approx(float(expected), rel=1e-10)

    grads = torch.func.grad(metric.fn)(state)
    assert all(float(t.abs().max()) == 0.0 for t in grads["d"].values())
    assert any(float(t.abs().max()) > 0.0 for t in grads["g"].values())
    gen = torch.Generator().manual_seed(5)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state["g"].items()}
    h = 1e-6  # small: max-pooling is piecewise smooth, a larger step can cross a switch

    def shifted(sign: float) -> float:
        return metric.value({**state, "g": {k: v + sign * h * direction[k] for k, v in state["g"].items()}})

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    analytic = sum(float((grads["g"][k] * direction[k]).sum()) for k in direction)
    assert analytic == pytest.approx(fd, rel=1e-6)


def test_make_metric_with_an_extractor(digits_run: gc.Run, tmp_path: Path) -> None:
    path = script(ScriptedPair(), tmp_path / "pair.pt")
    run = gc.Run.open(digits_run.path, extractor=path)  # named explicitly: it runs code
    metric = make_metric("fid", run, "test")
    model = load_extractor(path, (1, 8, 8))
    state = run.final_state()
    fake = run.models.generate(run.dynamics.eval_generator(state), run.eval_latents("test"))
    expected = frechet_inception_distance(model.evaluate(run.splits.test)[0], model.features(fake), 1e-6)
    assert metric.value(state) == pytest.approx(float(expected), rel=1e-10)


def test_classifier_metrics_refuse_2d_data(run_factory) -> None:
    run = run_factory()
    with pytest.raises(ConfigError, match="need image data"):
        make_metric("fid", run)

"""The self-supervised feature space: contrastive loss against a brute-force reference, views, bitwise
determinism in the seed, the run-directory cache, one-line errors, and that its Frechet distance grows
with the fraction of corrupted images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gancleanse.config import MetricConfig
from gancleanse.errors import DataError
from gancleanse.features import load_feature_model
from gancleanse.features import self_supervised as ssl
from gancleanse.metrics.fid import frechet_inception_distance

TINY = {"encoder_epochs": 2, "encoder_batch_size": 16}


def images(n: int = 40, side: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, channels, side, side), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64) * 2 - 1


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` scikit-learn digits (8x8) in [-1, 1], and the rest."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(np.asarray(load_digits().images, dtype=np.float64) / 8.0 - 1.0)[:, None]
    return x[:n], x[n:]


def train(x: torch.Tensor, seed: int = 0, epochs: int = 2) -> ssl.Encoder:
    return ssl.train_encoder(x, epochs=epochs, lr=1e-3, batch_size=16, temperature=0.5, seed=seed)[0]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- loss and views
def test_nt_xent_matches_a_brute_force_sum() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = 0.3
    views = [v / v.norm() for v in torch.cat([z1, z2])]
    total = 0.0
    for i in range(10):
        partner = (i + 5) % 10
        others = sum(math.exp(float(views[i] @ views[k]) / t) for k in range(10) if k != i)
        total -= math.log(math.exp(float(views[i] @ views[partner]) / t) / others)
    assert float(ssl.nt_xent(z1, z2, t)) == pytest.approx(total / 10, rel=1e-12)


def test_views_without_any_change_are_the_images(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"BLUR": 0.0, "SATURATION": (1e-6, 1e-6), "ZOOM": (1.0, 1.0), "SHIFT": 0.0,
                        "ROTATION_DEGREES": 0.0, "BRIGHTNESS": 0.0, "CONTRAST": (1.0, 1.0), "NOISE": 0.0}.items():
        monkeypatch.setattr(ssl, name, value)
    x = images(6, side=9, channels=3)
    torch.testing.assert_close(ssl.augment(x, torch.Generator().manual_seed(0)), x, rtol=0, atol=1e-10)


def test_a_view_zoomed_in_twice_is_the_centre_upsampled(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"BLUR": 0.0, "SATURATION": (1e-6, 1e-6), "ZOOM": (2.0, 2.0), "SHIFT": 0.0,
                        "ROTATION_DEGREES": 0.0, "BRIGHTNESS": 0.0, "CONTRAST": (1.0, 1.0), "NOISE": 0.0}.items():
        monkeypatch.setattr(ssl, name, value)
    x = images(3, side=8)
    view = ssl.augment(x, torch.Generator().manual_seed(0))
    # output pixel i samples input position 1.75 + i / 2; interpolate() samples the same inside the crop
    centre = F.interpolate(x[..., 2:6, 2:6], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(view[..., 1:7, 1:7], centre[..., 1:7, 1:7], rtol=0, atol=1e-10)


def test_views_are_random_reproducible_and_leave_the_global_rng_alone() -> None:
    x = images(6, side=12).to(torch.float32)
    before = torch.get_rng_state()
    a = ssl.augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, ssl.augment(x, torch.Generator().manual_seed(5)))
    assert not torch.allclose(a, ssl.augment(x, torch.Generator().manual_seed(6)))
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------------- training
def test_training_is_bitwise_deterministic_in_the_seed() -> None:
    x = images()
    before = torch.get_rng_state()
    first = train(x, seed=3)
    assert torch.equal(before, torch.get_rng_state())
    assert same_weights(first, train(x, seed=3))
    assert not same_weights(first, train(x, seed=4))


def test_features_have_the_encoder_width_and_any_side_from_8() -> None:
    for shape in ((1, 8, 8), (3, 8, 13), (3, 28, 28)):
        encoder = ssl.Encoder(shape, torch.Generator().manual_seed(0))
        assert encoder(torch.zeros(2, *shape)).shape == (2, ssl.FEATURE_DIM)


def test_an_image_has_the_same_features_in_any_batch() -> None:
    encoder = ssl.Encoder((3, 10, 10), torch.Generator().manual_seed(0)).to(torch.float64)
    x = images(7, side=10, channels=3)
    torch.testing.assert_close(encoder(x)[2:4], encoder(x[2:4]), rtol=0, atol=1e-12)


def test_training_lowers_the_contrastive_loss() -> None:
    x, _ = digits(256)
    _, curve = ssl.train_encoder(x, epochs=4, lr=1e-3, batch_size=64, temperature=0.5, seed=0)
    assert len(curve) == 4 and curve[-1] < curve[0] - 0.1


@pytest.mark.parametrize("shape, words", [((10, 1, 7, 8), "at least 8x8"), ((10, 1, 8, 3), "at least 8x8"),
                                          ((10, 2), "(N, C, H, W)"), ((10, 1, 8), "(N, C, H, W)")])
def test_data_the_encoder_cannot_see_is_a_one_line_error(tmp_path: Path, shape: tuple, words: str) -> None:
    with pytest.raises(DataError, match=r"self-supervised encoder") as raised:
        ssl.cached_encoder(tmp_path, torch.zeros(shape), MetricConfig(**TINY), seed=0)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert not list(tmp_path.iterdir())


def test_a_single_image_is_a_one_line_error() -> None:
    with pytest.raises(DataError, match="at least 2 training images"):
        train(images(1))


# ---------------------------------------------------------------------------- cache
def test_cache_reuse_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_train = ssl.train_encoder

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ssl, "train_encoder", counting)
    x, cfg = images(), MetricConfig(**TINY)
    first = ssl.cached_encoder(tmp_path, x, cfg, seed=1)
    again = ssl.cached_encoder(tmp_path, x, cfg, seed=1)
    assert len(calls) == 1 and again.key == first.key and same_weights(again.module, first.module)
    assert again.record == first.record and again.source.endswith("self_supervised.safetensors")

    ssl.cached_encoder(tmp_path, x, MetricConfig(**{**TINY, "encoder_temperature": 0.2}), seed=1)
    assert len(calls) == 2 and calls[-1]["temperature"] == 0.2
    ssl.cached_encoder(tmp_path, x, MetricConfig(**TINY), seed=2)
    assert len(calls) == 3
    changed = x.clone()
    changed[3, 0, 2, 2] += 0.5
    ssl.cached_encoder(tmp_path, changed, cfg, seed=2)
    assert len(calls) == 4
    ssl.cached_encoder(tmp_path, changed, cfg, seed=2)
    assert len(calls) == 4

    weights = tmp_path / "self_supervised.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    ssl.cached_encoder(tmp_path, changed, cfg, seed=2)
    assert len(calls) == 5


def test_uint8_and_float_images_are_different_data() -> None:
    pixels = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert ssl.image_fingerprint(pixels) == ssl.image_fingerprint(pixels.clone())
    assert ssl.image_fingerprint(pixels) != ssl.image_fingerprint(pixels.to(torch.float64))
    assert ssl.image_fingerprint(pixels) != ssl.image_fingerprint(pixels[:3])


def test_run_encoder_is_cached_frozen_and_float64(run_factory) -> None:
    run = run_factory(data={"name": "digits", "n_train": 64, "n_valid": 40, "n_test": 40},
                      train={"epochs": 1, "batch_size": 32}, metric={**TINY, "seed": 5})
    model = load_feature_model(run, "self_supervised")
    assert (model.space, model.has_logits, model.dtype) == ("self_supervised", False, torch.float64)
    assert model.key.startswith("ssl:") and model.accuracy is None
    assert set(model.record) == {"architecture", "settings", "loss_curve", "weights_sha256"}
    assert model.record["settings"]["seed"] == 5 and model.record["settings"]["sample_shape"] == [1, 8, 8]
    assert not any(p.requires_grad for p in model.module.parameters())
    features, logits = model(run.splits.test[:5])
    assert features.dtype == torch.float64 and features.shape == (5, ssl.FEATURE_DIM)
    assert torch.equal(features, logits)

    meta = json.loads((run.path / "self_supervised.json").read_text())
    assert meta["n_train"] == 64 and len(meta["loss_curve"]) == 2 and meta["torch"] == torch.__version__
    assert meta["loss_curve"] == model.record["loss_curve"] and meta["train_seconds"] >= 0
    assert meta["weights_sha256"] == model.record["weights_sha256"]
    reopened = load_feature_model(run, "self_supervised")
    assert reopened.key == model.key and torch.equal(reopened.features(run.splits.test[:5]), features)


def test_points_are_a_one_line_error(run_factory) -> None:
    run = run_factory()
    with pytest.raises(DataError, match=r"needs images \(N, C, H, W\).*shape \(2,\)"):
        load_feature_model(run, "self_supervised")


# ---------------------------------------------------------------------------- quality
def corrupted(x: torch.Tensor, fraction: float, kind: str) -> torch.Tensor:
    """``x`` with its first ``fraction`` of images replaced by noise or by themselves, pixels shuffled."""
    out, k = x.clone(), int(round(fraction * x.shape[0]))
    g = torch.Generator().manual_seed(11)
    if kind == "noise":
        out[:k] = torch.rand(out[:k].shape, generator=g, dtype=x.dtype) * 2 - 1
    else:
        out[:k] = out[:k].flatten(1)[:, torch.randperm(x[0].numel(), generator=g)].view(out[:k].shape)
    return out


def test_frechet_distance_grows_with_the_corrupted_fraction(tmp_path: Path) -> None:
    train_images, held_out = digits(800)
    model = ssl.cached_encoder(tmp_path, train_images, MetricConfig(encoder_epochs=3, encoder_batch_size=128), seed=0)
    real = held_out[:400]
    real_features = model.evaluate(real)[0]
    for kind in ("noise", "shuffle"):
        distances = [float(frechet_inception_distance(real_features, model.evaluate(corrupted(real, f, kind))[0]))
                     for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        assert distances[0] < 1e-6, kind
        assert all(a < b for a, b in zip(distances, distances[1:])), (kind, distances)

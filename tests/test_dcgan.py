"""The small convolutional GAN: shapes, per-instance independence, gradients, init, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.errors import DataError
from gancleanse.metrics import make_metric
from gancleanse.models import build_models
from gancleanse.models.dcgan import SPECS, ChannelLayerNorm, DCGANGenerator, conv_sizes
from gancleanse.training.replay import replay


def _models(shape, **model):
    m = {"arch": "dcgan", "z_dim": 5, "g_hidden": 4, "d_hidden": 4, "activation": "sigmoid", "norm": "layer"}
    m.update(model)
    cfg = Config.from_dict({"model": m})
    return build_models(cfg, shape)


def test_spatial_sizes_are_the_papers():
    assert conv_sizes(28, *SPECS[28]) == [28, 25, 12, 10, 9, 4, 2, 1]
    assert conv_sizes(8, *SPECS[8]) == [8, 6, 4, 2, 1]


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 8, 8)])
def test_output_shapes(shape):
    models = _models(shape)
    pd, pg = models.initial_params(0, torch.float64)
    z = torch.randn(6, 5, dtype=torch.float64)
    x = models.generate(pg, z)
    assert x.shape == (6, *shape) and x.dtype == torch.float64
    assert float(x.abs().max()) < 1.0  # tanh output
    assert models.discriminate(pd, x).shape == (6,)
    # D's features end at 1x1 so the head sees exactly d_hidden numbers
    sub = {k.removeprefix("features."): v for k, v in pd.items() if k.startswith("features.")}
    feats = torch.func.functional_call(models.discriminator.features, sub, (x,))
    assert feats.shape == (6, 4, 1, 1)


def test_generator_intermediate_sides():
    g = DCGANGenerator(5, (1, 28, 28), hidden=3)
    sides = []
    h = torch.randn(2, 5, 1, 1)
    for layer in g.net:
        h = layer(h)
        if isinstance(layer, nn.ConvTranspose2d):
            sides.append(h.shape[-1])
    assert sides == [2, 4, 9, 10, 12, 25, 28]


@pytest.mark.parametrize("shape", [(2,), (1, 16, 16), (1, 28, 27), (28, 28)])
def test_unsupported_shapes_are_named(shape):
    with pytest.raises(DataError, match=rf"cannot take samples of shape {re_shape(shape)}.*8x8, 28x28"):
        _models(shape)


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_dcgan_on_2d_data_fails_at_train(tmp_path):
    cfg = Config.from_dict({"model": {"arch": "dcgan"}, "data": {"n_train": 100, "n_valid": 10, "n_test": 10}})
    with pytest.raises(DataError, match=r"shape \(2,\)"):
        gc.train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_bias_follows_config():
    with_b = dict(_models((1, 8, 8), bias=True).discriminator.named_parameters())
    without = dict(_models((1, 8, 8), bias=False).discriminator.named_parameters())
    assert "features.0.bias" in with_b and "features.2.bias" in with_b and "head.bias" in with_b
    assert not any(k.endswith("bias") for k in without)
    assert with_b["features.2.weight"].shape == (4,)  # per-channel gain, not per element
    plain = dict(_models((1, 8, 8), norm="none").discriminator.named_parameters())
    assert all(p.ndim == 4 or k.startswith("head") for k, p in plain.items())


def test_channel_layer_norm_against_manual():
    torch.manual_seed(0)
    ln = ChannelLayerNorm(3, bias=True).double()
    gain, shift = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0.1, -0.3, 0.7])
    params = {"weight": gain.double(), "bias": shift.double()}
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1
    out = torch.func.functional_call(ln, params, (x,)).numpy()
    xn = x.numpy()
    for i in range(4):
        mu, var = xn[i].mean(), xn[i].var()
        ref = (xn[i] - mu) / np.sqrt(var + 1e-5) * gain.numpy()[:, None, None] + shift.numpy()[:, None, None]
        np.testing.assert_allclose(out[i], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_instances_are_independent(shape):
    models = _models(shape, activation="softplus", bias=True)
    pd, pg = models.initial_params(1, torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    y = x.clone()
    y[1:] = torch.rand(4, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    a, b = models.discriminate(pd, x), models.discriminate(pd, y)
    assert torch.allclose(a[0], b[0], rtol=0, atol=1e-13) and not torch.allclose(a[1:], b[1:])
    assert torch.allclose(models.discriminate(pd, x[:1])[0], a[0], rtol=0, atol=1e-13)
    z = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    z2 = torch.cat([z[:1], torch.randn(4, 5, generator=gen, dtype=torch.float64)])
    assert torch.allclose(models.generate(pg, z)[0], models.generate(pg, z2)[0], rtol=0, atol=1e-13)


def test_grad_matches_finite_differences():
    models = _models((1, 8, 8), activation="softplus", bias=True, g_hidden=3, d_hidden=3, z_dim=2)
    pd, pg = models.initial_params(2, torch.float64)
    gen = torch.Generator().manual_seed(3)
    # move biases and gains off their trivial init so that every path is exercised
    pd = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in pd.items()}
    pg = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in pg.items()}
    x = torch.rand(3, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(3, 2, generator=gen, dtype=torch.float64)

    def f(pd, pg):
        real = nn.functional.softplus(-models.discriminate(pd, x))
        fake = nn.functional.softplus(models.discriminate(pd, models.generate(pg, z)))
        return (real * torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)).sum() + fake.sum()

    gd, gg = grad(f, argnums=(0, 1))(pd, pg)
    for which, params, g in (("d", pd, gd), ("g", pg, gg)):
        for _ in range(3):
            v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
            eps = 1e-6  # central differences: truncation ~ eps^2, rounding ~ 1e-16 / eps

            def shifted(sign):
                q = {k: p + sign * eps * v[k] for k, p in params.items()}
                return f(q, pg) if which == "d" else f(pd, q)

            fd = (shifted(1) - shifted(-1)) / (2 * eps)
            an = sum((g[k] * v[k]).sum() for k in params)
            assert abs(float(fd - an)) <= 1e-7 * max(1.0, abs(float(an))), (which, float(fd), float(an))
            assert abs(float(an)) > 1e-3


def test_glorot_init_for_conv_and_transposed_conv():
    models = _models((1, 28, 28), bias=True, g_hidden=6, d_hidden=5, z_dim=7)
    pd, pg = models.initial_params(0, torch.float64)
    for module, params in ((models.discriminator, pd), (models.generator, pg)):
        for name, sub in module.named_modules():
            if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                w = params[f"{name}.weight"]
                # fan_in + fan_out = (in + out) channels x kernel area, whichever way round
                # the weight stores them (ConvTranspose2d keeps (in, out, kh, kw))
                area = math.prod(w.shape[2:]) if w.ndim == 4 else 1
                c_in = sub.in_channels if hasattr(sub, "in_channels") else sub.in_features
                c_out = sub.out_channels if hasattr(sub, "out_channels") else sub.out_features
                bound = math.sqrt(6.0 / ((c_in + c_out) * area))
                assert float(w.abs().max()) <= bound
                if w.numel() >= 100:
                    assert float(w.abs().max()) > 0.9 * bound
                    assert abs(float(w.var()) / (bound ** 2 / 3) - 1) < 0.3
                assert torch.equal(params[f"{name}.bias"], torch.zeros_like(params[f"{name}.bias"]))
            elif isinstance(sub, ChannelLayerNorm):
                assert torch.equal(params[f"{name}.weight"], torch.ones_like(params[f"{name}.weight"]))


def test_itd_matches_counterfactual_on_digits(tmp_path):
    cfg = Config.from_dict({
        "data": {"name": "digits", "n_train": 200, "n_valid": 100, "n_test": 100, "seed": 1},
        "model": {"arch": "dcgan", "z_dim": 4, "g_hidden": 6, "d_hidden": 6, "activation": "softplus",
                  "norm": "layer", "bias": True, "dtype": "float64"},
        "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.002, "lr_g": 0.002, "record_from_epoch": 1,
                  "weight_decay_d": 1e-3, "weight_decay_g": 1e-3, "seed": 2, "threads": 1},
        "metric": {"n_samples": 100},
    })
    run = gc.train(cfg, tmp_path / "run", progress=False)
    assert run.splits.sample_shape == (1, 8, 8)
    scores = gc.influence(run, "loss_d", check=0, progress=False)
    assert scores.influence.shape == (200,)
    metric = make_metric("loss_d", run, "valid")
    before = metric.value(run.final_state())
    idx = [int(i) for i in np.argsort(-np.abs(scores.influence))[:3]]
    for j in idx:
        est = float(scores.influence[j])
        # the derivative itself: a tiny down-weighting of j, replayed over the same window
        w = torch.ones(run.n_train, dtype=torch.float64)
        w[j] = 1.0 - 1e-4
        slope = (metric.value(replay(run, run.window_start, weights=w)) - before) / 1e-4
        assert abs(est - slope) <= 1e-3 * abs(slope), (j, est, slope)
        # removing j altogether
        actual = gc.counterfactual(run, [j], "loss_d")["delta"]
        assert abs(est - actual) <= 0.05 * abs(actual), (j, est, actual)


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    """A float64 DCGAN on 8x8 digits with a short recorded window (the classifier is cached in the run)."""
    cfg = Config.from_dict({
        "data": {"name": "digits", "n_train": 120, "n_valid": 100, "n_test": 100, "seed": 4},
        "model": {"arch": "dcgan", "z_dim": 4, "g_hidden": 5, "d_hidden": 5, "activation": "softplus",
                  "norm": "layer", "bias": True, "dtype": "float64"},
        "train": {"epochs": 4, "batch_size": 20, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 3,
                  "weight_decay_d": 1e-3, "weight_decay_g": 1e-3, "seed": 3, "checkpoint_every": 2},
        "metric": {"n_samples": 100},  # the classifier's default training: a metric far from degenerate
    })
    return gc.train(cfg, tmp_path_factory.mktemp("dcgan") / "run", progress=False)


@pytest.mark.parametrize("metric_name", ["fid", "is"])
def test_itd_on_dcgan_equals_unrolled_autograd_and_retraining(tiny_digits_run, metric_name):
    from test_itd_exact import rel_err, unrolled_dV_dw

    from gancleanse.influence.itd import itd_influence

    run = tiny_digits_run
    metric = make_metric(metric_name, run, "valid")
    est = itd_influence(run, metric, progress=False).influence
    expected = -unrolled_dV_dw(run, metric_name)
    assert expected.abs().max() > 0
    assert rel_err(est, expected) < 1e-8
    # removing the instances with the largest estimated effect, one at a time
    for j in [int(i) for i in torch.argsort(-est.abs())[:3]]:
        actual = gc.counterfactual(run, [j], metric_name)["delta"]
        assert abs(float(est[j]) - actual) <= 0.15 * abs(actual), (j, float(est[j]), actual)

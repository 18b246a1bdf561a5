"""Metrics in chunks of generated samples equal the one-batch metric: values, gradients and ITD."""

from __future__ import annotations

import pytest
import torch

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.errors import ConfigError
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.metrics.kid import kernel_inception_distance, kid_gradient

N_SAMPLES = 23
CHUNKS = [1, 5, N_SAMPLES, 256]  # 5 does not divide 23; 256 is one chunk larger than the set


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory: pytest.TempPathFactory) -> gc.Run:
    """A float64 DCGAN on 8x8 labelled digits with a three-step window. FID has fewer samples than feature
    dimensions, so its ridge applies: at the default 1e-6 the eigenvalues under the square root come near the
    floor and one ulp of change in a feature moves dFID/dfeatures by about 3e-8 relative (measured), which
    would test the conditioning of FID, not the chunking; a ridge of 1e-2 keeps them away from it."""
    cfg = Config.from_dict({
        "data": {"name": "digits", "n_train": 60, "n_valid": 40, "n_test": 40, "seed": 2},
        "model": {"arch": "dcgan", "z_dim": 4, "g_hidden": 4, "d_hidden": 4, "activation": "softplus",
                  "norm": "layer", "bias": True, "dtype": "float64"},
        "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 1,
                  "weight_decay_d": 1e-3, "seed": 1, "checkpoint_every": 2},
        "metric": {"n_samples": N_SAMPLES, "fid_ridge": 1e-2},  # the default classifier: FID far from 0
    })
    return gc.train(cfg, tmp_path_factory.mktemp("chunks") / "run", progress=False)


def assert_trees_close(got: dict, expected: dict, rel: float) -> None:
    """Every tensor of ``got`` within ``rel`` of ``expected``, relative to the tensor's largest entry."""
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        if isinstance(want, dict):
            assert_trees_close(got[key], want, rel)
            continue
        scale = float(want.abs().max())
        assert float((got[key] - want).abs().max()) <= rel * scale, (key, scale)


@pytest.mark.parametrize("name", ["fid", "kid", "is", "log_is", "all", "loss_d"])
def test_chunked_metric_equals_full_batch(dcgan_run: gc.Run, name: str) -> None:
    state = dcgan_run.final_state()
    full = make_metric(name, dcgan_run, "valid")
    value = float(full.fn(state))  # one differentiable batch: the reference
    expected = torch.func.grad(full.fn)(state)
    assert any(float(t.abs().max()) > 0 for t in expected["g"].values())
    for chunk in CHUNKS:
        metric = make_metric(name, dcgan_run, "valid", chunk_size=chunk)
        assert metric.value(state) == pytest.approx(value, rel=1e-10, abs=0.0), chunk
        assert_trees_close(metric.gradient(state), expected, 1e-10)


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_kid_gradient_in_closed_form_equals_autograd(degree: int) -> None:
    gen = torch.Generator().manual_seed(degree)
    real = torch.rand(17, 6, generator=gen, dtype=torch.float64)
    fake = torch.rand(13, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    (expected,) = torch.autograd.grad(kernel_inception_distance(real, fake, degree), fake)
    for chunk in (1, 4, 13, 100):
        got = kid_gradient(real, fake.detach(), degree, chunk)
        assert float((got - expected).abs().max()) <= 1e-12 * float(expected.abs().max())
        value = kernel_inception_distance(real, fake.detach(), degree, chunk=chunk)
        assert float(value) == pytest.approx(float(kernel_inception_distance(real, fake.detach(), degree)), rel=1e-12)


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
@pytest.mark.parametrize("name", ["fid", "is"])
def test_itd_in_chunks_equals_unrolled_autograd(dcgan_run: gc.Run, name: str, reverse: str) -> None:
    from test_itd_exact import rel_err, unrolled_dV_dw

    expected = -unrolled_dV_dw(dcgan_run, name)  # the one-batch metric, differentiated through the window
    assert expected.abs().max() > 0
    for chunk in (5, 256):
        got = itd_influence(dcgan_run, make_metric(name, dcgan_run, chunk_size=chunk), progress=False,
                            reverse=reverse).influence
        assert rel_err(got, expected) < 1e-8


def test_chunk_size_is_checked(dcgan_run: gc.Run) -> None:
    with pytest.raises(ConfigError, match="chunk size"):
        make_metric("fid", dcgan_run, chunk_size=0)


def test_the_chunk_size_comes_from_the_config(tmp_path):
    from conftest import make_run
    from gancleanse.config import Config
    from gancleanse.errors import ConfigError
    from gancleanse.metrics import DEFAULT_CHUNK_SIZE, make_metric

    run = make_run(tmp_path, metric={"chunk_size": 7})
    assert make_metric("all", run).chunk_size == 7 and make_metric("all", run, chunk_size=3).chunk_size == 3
    assert Config().metric.chunk_size == DEFAULT_CHUNK_SIZE
    with pytest.raises(ConfigError, match=r"metric\.chunk_size = 0 is out of range"):
        Config.from_dict({"metric": {"chunk_size": 0}})


def test_metrics_of_one_network_share_its_pass_and_give_the_same_bits(dcgan_run: gc.Run, monkeypatch) -> None:
    """``values``: the metrics reading the classifier on one split's samples (FID, KID, IS, log IS, precision)
    take them from one forward pass per chunk, each split its own; the numbers are each metric's own
    ``value``, bit for bit (also with a chunk size that does not divide the samples)."""
    from gancleanse.features.base import FeatureModel
    from gancleanse.metrics import values

    state = dcgan_run.final_state()
    names = ["fid", "kid", "is", "log_is", "precision", "all", "loss_d"]
    for chunk in (5, 256):
        metrics = [make_metric(n, dcgan_run, split, chunk_size=chunk) for split in ("valid", "test") for n in names]
        alone = [m.value(state) for m in metrics]
        calls: list[int] = []
        forward = FeatureModel.__call__
        monkeypatch.setattr(FeatureModel, "__call__", lambda self, x: calls.append(len(x)) or forward(self, x))
        together = values(metrics, state)
        monkeypatch.undo()
        assert together == alone and len(set(alone)) == len(alone)
        chunks = -(-N_SAMPLES // chunk)
        assert len(calls) == 2 * chunks and sum(calls) == 2 * N_SAMPLES  # one pass per split, not one per metric

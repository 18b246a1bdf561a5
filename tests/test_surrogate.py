"""The kink-smoothed ReLU: ReLU in value and first derivative, a smoothed second derivative."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.functional import leaky_relu

from gancleanse.influence.itd import itd_influence
from gancleanse.influence.surrogate import KinkSmoothedReLU, kink_smoothed_relu, smoothed_relu
from gancleanse.metrics import make_metric
from gancleanse.training.replay import replay


def inputs() -> torch.Tensor:
    x = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:3] = torch.tensor([0.0, -0.0, 1e-300], dtype=torch.float64)
    return x


@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_forward_and_first_derivative_are_bitwise_relu(slope):
    x = inputs()
    exact = (lambda v: torch.relu(v)) if slope == 0.0 else (lambda v: leaky_relu(v, slope))
    assert torch.equal(kink_smoothed_relu(x, 0.3, slope), exact(x))
    # The first derivative is what a training step applies: it must be ReLU's own.
    weight = torch.cos(3 * x)
    got = grad(lambda v: (kink_smoothed_relu(v, 0.3, slope) * weight).sum())(x)
    ref = grad(lambda v: (exact(v) * weight).sum())(x)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("temperature", [0.05, 1.0])
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_second_derivative_is_the_smoothed_kink(temperature, slope):
    x = inputs()

    def second(f):
        return grad(lambda v: grad(lambda u: f(u).sum())(v).sum())(x)

    got = second(lambda v: kink_smoothed_relu(v, temperature, slope))
    # T * softplus(x / T) without softplus' linear cut-off, which would zero the tails.
    zero = torch.zeros((), dtype=torch.float64)
    ref = (1 - slope) * second(lambda v: temperature * torch.logaddexp(zero, v / temperature))
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    # The same through classic autograd and under vmap.
    xr = x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(kink_smoothed_relu(xr, temperature, slope).sum(), xr, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), xr)
    torch.testing.assert_close(g2, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
    per_row = vmap(lambda r: grad(lambda v: grad(lambda u: kink_smoothed_relu(u, temperature, slope).sum())(v).sum())(r))
    torch.testing.assert_close(per_row(x.reshape(40, 50)).reshape(-1), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.1)))
        self.discriminator = nn.Sequential(nn.Linear(2, 3), nn.Softplus(), nn.ReLU())


def _activations(m: _Pair) -> list[nn.Module]:
    return [m.generator[1], m.generator[2][1], m.discriminator[1], m.discriminator[2]]


def test_modules_swapped_inside_and_restored_after():
    m = _Pair()
    originals = _activations(m)
    with smoothed_relu(m, 0.1) as n:
        assert n == 3
        inside = _activations(m)
        assert [type(a) for a in inside] == [KinkSmoothedReLU, KinkSmoothedReLU, nn.Softplus, KinkSmoothedReLU]
        assert inside[1].negative_slope == pytest.approx(0.1)
    assert all(a is b for a, b in zip(_activations(m), originals))


def test_modules_restored_after_an_error():
    m = _Pair()
    originals = _activations(m)
    with pytest.raises(RuntimeError, match="inside"):
        with smoothed_relu(m, 0.1):
            raise RuntimeError("inside")
    assert all(a is b for a, b in zip(_activations(m), originals))
    with pytest.raises(ValueError):
        with smoothed_relu(m, 0.0):
            pass
    assert all(a is b for a, b in zip(_activations(m), originals))


def test_itd_under_the_surrogate(run_factory):
    run = run_factory(model={"activation": "relu"})
    metric = make_metric("all", run)
    plain = itd_influence(run, metric, progress=False).influence
    with smoothed_relu(run.models, 0.05):
        # The replayed training is the recorded one, bitwise.
        final = replay(run, run.window_start)
        assert all(torch.equal(final["d"][k], v) for k, v in run.final_state()["d"].items())
        assert all(torch.equal(final["g"][k], v) for k, v in run.final_state()["g"].items())
        smooth = itd_influence(run, metric, progress=False).influence
    # A temperature far below every pre-activation's distance to 0 gives plain ITD back.
    with smoothed_relu(run.models, 1e-12):
        tiny = itd_influence(run, metric, progress=False).influence
    scale = plain.abs().max()
    assert float((tiny - plain).abs().max() / scale) < 1e-9
    assert float((smooth - plain).abs().max() / scale) > 1e-3
    assert type(run.models.discriminator.net[1]) is nn.ReLU


def test_itd_option_and_cli_flag_use_the_surrogate_and_refuse_misuse(tmp_path, run_factory, capsys):
    import json

    import numpy as np

    import gancleanse as gc
    from gancleanse.cli import main
    from gancleanse.errors import ConfigError

    relu = run_factory(model={"activation": "relu"})
    plain = gc.influence(relu, "all", "itd", check=0, progress=False)
    smooth = gc.influence(relu, "all", "itd", relu_smoothing=0.05, check=0, progress=False)
    with smoothed_relu(relu.models, 0.05):
        expected = itd_influence(relu, make_metric("all", relu), progress=False).influence.numpy()
    assert np.array_equal(smooth.influence, expected) and not np.array_equal(smooth.influence, plain.influence)
    assert smooth.info["relu_smoothing"] == 0.05
    assert all(type(m) is not KinkSmoothedReLU for m in relu.models.discriminator.modules())  # restored
    with pytest.raises(ConfigError, match="must be a positive number"):
        gc.influence(relu, "all", "itd", relu_smoothing=float("nan"), check=0, progress=False)
    soft = run_factory()  # softplus: nothing to smooth
    with pytest.raises(ConfigError, match="no ReLU"):
        gc.influence(soft, "all", "itd", relu_smoothing=0.05, check=0, progress=False)
    out = tmp_path / "s.csv"
    assert main(["influence", str(relu.path), "--relu-smoothing", "0.05", "--check", "0", "--out", str(out), "-q"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["relu_smoothing"] == 0.05
    assert main(["influence", str(relu.path), "--method", "aid", "--relu-smoothing", "0.05", "--out",
                 str(tmp_path / "a.csv"), "-q"]) == 2
    assert "--relu-smoothing applies to --method itd" in capsys.readouterr().err


def test_a_study_scores_with_the_configured_smoothing(tmp_path):
    import json

    import numpy as np

    import gancleanse as gc
    from gancleanse.errors import ConfigError

    from conftest import tiny_config

    cleanse = {"metrics": ["all"], "methods": ["itd", "random"], "removal_rates": [0.0, 0.1], "seeds": [0],
               "check": 0, "itd_relu_smoothing": 0.05}
    cfg = tiny_config(model={"activation": "relu"}, cleanse=cleanse)
    gc.cleanse(cfg, tmp_path / "study", report=False, progress=False)
    seed_dir = tmp_path / "study" / "seeds" / "seed_0"
    assert json.loads((seed_dir / "scores" / "itd-all.json").read_text())["relu_smoothing"] == 0.05
    run = gc.Run.open(seed_dir / "run")
    expected = gc.influence(run, "all", "itd", relu_smoothing=0.05, check=0, progress=False).harmfulness
    stored = np.loadtxt(seed_dir / "scores" / "itd-all.csv", delimiter=",", skiprows=1, usecols=2)
    assert np.allclose(stored, expected, rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match="itd_relu_smoothing smooths ReLU kinks, but model.activation = 'softplus'"):
        tiny_config(cleanse=cleanse)

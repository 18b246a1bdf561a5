"""ITD against exact references: autograd through the unrolled training, and finite differences."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.training.replay import replay


def unrolled_dV_dw(run, metric_name: str, start: int | None = None) -> torch.Tensor:
    """dV/dw for all instance weights by differentiating the whole unrolled window at once."""
    dyn = run.dynamics
    metric = make_metric(metric_name, run, "valid")
    start = run.window_start if start is None else start
    state0 = run.load_state(start)

    def final_metric(w: torch.Tensor) -> torch.Tensor:
        state = state0
        for step in range(start, run.final_step):
            state, _ = dyn.step(state, run.batch(step), w[run.indices(step)])
        return metric(state)

    return grad(final_metric)(torch.ones(run.n_train, dtype=torch.float64, device=run.device)).cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu(), b.cpu()
    return float((a - b).abs().max() / b.abs().max())


CASES = [
    ("simultaneous", "sgd", {}),
    ("alternating", "sgd", {}),
    ("simultaneous", "momentum", {}),
    ("alternating", "momentum", {}),
    ("simultaneous", "adam", {"lr_d": 0.01, "lr_g": 0.01}),
    ("alternating", "adam", {"lr_d": 0.01, "lr_g": 0.01}),
    ("alternating", "adam", {"lr_d": 0.01, "lr_g": 0.01, "ema_beta": 0.9}),
    ("simultaneous", "sgd", {"weight_decay_d": 0.1, "weight_decay_g": 0.05, "lr_g": 0.02}),
    # gradient penalties: the step holds a gradient with respect to the inputs
    ("simultaneous", "sgd", {"r1_gamma": 2.0}),
    ("alternating", "sgd", {"r1_gamma": 1.0, "r2_gamma": 0.5}),
    ("simultaneous", "adam", {"lr_d": 0.01, "lr_g": 0.01, "r1_gamma": 1.0, "r1_every": 3, "ema_beta": 0.9}),
    ("alternating", "adam", {"lr_d": 0.01, "lr_g": 0.01, "r1_gamma": 1.0, "r2_gamma": 1.0, "r1_every": 2,
                             "betas": [0.0, 0.99], "ema_beta": 0.9}),
]


REVERSE = ["vjp", "hvp"]  # each way of differentiating a step must be exact on its own


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("update,optimizer,extra", CASES)
@pytest.mark.parametrize("metric_name", ["all", "loss_d"])
def test_itd_equals_unrolled_autograd(run_factory, update, optimizer, extra, metric_name, reverse):
    run = run_factory(train={"update": update, "optimizer": optimizer, **extra})
    expected = -unrolled_dV_dw(run, metric_name)
    got = itd_influence(run, make_metric(metric_name, run), progress=False, reverse=reverse).influence
    assert expected.abs().max() > 0
    assert rel_err(got, expected) < 1e-8


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("loss", ["minmax", "wasserstein", "hinge", "ls"])
def test_itd_exact_for_every_loss(run_factory, loss, reverse):
    run = run_factory(train={"loss": loss, "update": "alternating", "lr_d": 0.02, "lr_g": 0.02})
    expected = -unrolled_dV_dw(run, "all")
    got = itd_influence(run, make_metric("all", run), progress=False, reverse=reverse).influence
    assert rel_err(got, expected) < 1e-8


@pytest.mark.parametrize("reverse", REVERSE)
@pytest.mark.parametrize("penalty", [{}, {"r1_gamma": 1.0, "r1_every": 2, "r2_gamma": 0.5}])
def test_itd_matches_finite_differences_of_instance_weights(run_factory, penalty, reverse):
    run = run_factory(train={"update": "alternating", "optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01, **penalty})
    metric = make_metric("all", run)
    est = itd_influence(run, metric, progress=False, reverse=reverse).influence
    eps = 1e-5
    for j in [0, 7, 23, 41, 59]:
        values = []
        for wj in (1.0 + eps, 1.0 - eps):
            w = torch.ones(run.n_train, dtype=torch.float64)
            w[j] = wj
            values.append(metric.value(replay(run, run.window_start, weights=w)))
        fd = -(values[0] - values[1]) / (2 * eps)  # influence = -dV/dw_j
        assert abs(est[j].item() - fd) <= 1e-6 * est.abs().max().item() + 1e-7 * abs(fd), (j, est[j], fd)


@pytest.mark.parametrize("reverse", REVERSE)
def test_horizon_snapshots_equal_shorter_windows(tmp_path, reverse):
    from conftest import make_run

    long = make_run(tmp_path, "long", train={"epochs": 3, "record_from_epoch": 0})
    short = make_run(tmp_path, "short", train={"epochs": 3, "record_from_epoch": 2})
    res = itd_influence(long, make_metric("all", long), progress=False, reverse=reverse)
    assert sorted(res.horizons) == [1, 2, 3]
    assert torch.equal(res.horizons[3], res.influence)
    ref = itd_influence(short, make_metric("all", short), progress=False, reverse=reverse).influence
    assert rel_err(res.horizons[1], ref) < 1e-12
    # The k=2 snapshot is the exact derivative of training where removal starts at epoch 1.
    expected = -unrolled_dV_dw(long, "all", start=long.epoch_start_step(1))
    assert rel_err(res.horizons[2], expected) < 1e-8


@pytest.mark.parametrize("reverse", REVERSE)
def test_memory_budget_sets_the_stretch_and_never_the_result(run_factory, reverse):
    """Segments whose graphs (the hvp way: states) exceed the budget are split into stretches that fit; the
    influence and every horizon stay bit for bit those of whole segments."""
    run = run_factory(train={"update": "simultaneous", "optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01,
                             "checkpoint_every": 5})
    metric = make_metric("all", run)
    whole = itd_influence(run, metric, memory_gb=100.0, progress=False, reverse=reverse)
    assert whole.stretch == 5 and whole.graph_bytes_per_step > 0
    for steps in (1, 2, 3):  # a budget of `steps` graphs, with half a step to spare
        budget = (steps + 0.5) * whole.graph_bytes_per_step / 1e9
        split = itd_influence(run, metric, memory_gb=budget, progress=False, reverse=reverse)
        assert split.stretch == max(1, int(budget * 1e9 // split.graph_bytes_per_step)) < 5
        assert torch.equal(split.influence, whole.influence)
        assert split.horizons.keys() == whole.horizons.keys()
        assert all(torch.equal(split.horizons[k], whole.horizons[k]) for k in whole.horizons)

"""AID against the exact implicit-function answer on a linear-quadratic GAN with a unique equilibrium.

The toy: D(x) = u^T x + c, G(z) = A z, least-squares losses, weight decay on u and A. The
test writes the game's stationarity equations itself, finds the equilibrium by Newton's
method with a dense Jacobian, and differentiates it two independent ways: a dense solve of
the implicit function theorem, and re-solving the equilibrium with one instance weight
perturbed (central differences). AID, evaluated at that equilibrium, must match both.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from scipy.stats import pearsonr
from torch import nn
from torch.func import jacrev

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.errors import ConfigError
from gancleanse.influence.aid import AIDConvergenceWarning, aid_influence
from gancleanse.metrics import make_metric
from gancleanse.training.schedule import solver_draw

N, Z_DIM, WD_D, WD_G = 40, 2, 0.2, 0.3


def lq_run(tmp_path, **train):
    torch.manual_seed(0)
    models = gc.GANModules(nn.Linear(Z_DIM, 2, bias=False), nn.Linear(2, 1), z_dim=Z_DIM)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N + 40, 2, generator=gen, dtype=torch.float64) @ torch.tensor([[1.0, 0.5], [0.0, 0.6]],
                                                                                  dtype=torch.float64) + 1.0
    data = gc.Splits.random_split(x, n_valid=20, n_test=20, seed=0)
    cfg = gc.Config.from_dict({"model": {"z_dim": Z_DIM}, "metric": {"n_samples": 30},
                               "train": {"epochs": 3, "batch_size": 10, "loss": "ls", "lr_d": 0.05, "lr_g": 0.05,
                                         "weight_decay_d": WD_D, "weight_decay_g": WD_G, **train}})
    return gc.train(cfg, tmp_path / "lq", models=models, data=data, force=True, progress=False)


def unpack(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return theta[:2], theta[2], theta[3:].reshape(2, 2)


def stationarity(theta: torch.Tensor, w: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[dL_D/du, dL_D/dc, dL_G/dA], written out for the toy (not through the library's losses)."""

    def loss_d(ud: torch.Tensor, theta_g: torch.Tensor) -> torch.Tensor:
        u, c = ud[:2], ud[2]
        a = theta_g.reshape(2, 2)
        real = 0.5 * (x @ u + c - 1.0) ** 2
        fake = 0.5 * ((z @ a.T) @ u + c) ** 2
        return (w * real).sum() / N + fake.mean() + 0.5 * WD_D * (u * u).sum()

    def loss_g(theta_g: torch.Tensor, ud: torch.Tensor) -> torch.Tensor:
        u, c = ud[:2], ud[2]
        a = theta_g.reshape(2, 2)
        return (0.5 * ((z @ a.T) @ u + c - 1.0) ** 2).mean() + 0.5 * WD_G * (a * a).sum()

    ud, tg = theta[:3], theta[3:]
    return torch.cat([jacrev(loss_d)(ud, tg), jacrev(loss_g)(tg, ud)])


def equilibrium(theta: torch.Tensor, w: torch.Tensor, x, z) -> torch.Tensor:
    for _ in range(50):
        f = stationarity(theta, w, x, z)
        if f.abs().max() < 1e-14:
            break
        theta = theta - torch.linalg.solve(jacrev(stationarity)(theta, w, x, z), f)
    assert stationarity(theta, w, x, z).abs().max() < 1e-12
    return theta


def to_state(run, theta: torch.Tensor) -> dict:
    u, c, a = unpack(theta)
    state = dict(run.final_state())
    state["d"] = {"weight": u.reshape(1, 2).clone(), "bias": c.reshape(1).clone()}
    state["g"] = {"weight": a.clone()}
    if "ema_g" in state:
        state["ema_g"] = {"weight": a.clone()}  # the average equals G at a fixed point
    return state


def reference(run, metric_name: str):
    """Equilibrium, the dense implicit-function influence, and a callable V(theta)."""
    x = run.splits.train.to(torch.float64)
    z = solver_draw(0, 0, N, N, Z_DIM)[1]  # AID's fixed latents (seed 0, first draw)
    ones = torch.ones(N, dtype=torch.float64)
    s = run.final_state()
    theta0 = torch.cat([s["d"]["weight"].reshape(-1), s["d"]["bias"], s["g"]["weight"].reshape(-1)])
    theta = equilibrium(theta0.to(torch.float64), ones, x, z)
    metric = make_metric(metric_name, run)

    def value(t: torch.Tensor) -> torch.Tensor:
        return metric(to_state(run, t))

    J = jacrev(stationarity)(theta, ones, x, z)
    dF_dw = jacrev(stationarity, argnums=1)(theta, ones, x, z)  # (params, N)
    dtheta_dw = -torch.linalg.solve(J, dF_dw)
    influence = -(jacrev(value)(theta) @ dtheta_dw)  # removal: w_j 1 -> 0
    return theta, influence, value, (x, z)


@pytest.mark.parametrize("solver,options", [("gmres", {}), ("cg", {}), ("neumann", {"iterations": 20000})])
@pytest.mark.parametrize("metric_name", ["all", "loss_d"])
def test_aid_matches_dense_implicit_function(tmp_path, solver, options, metric_name):
    run = lq_run(tmp_path)
    theta, expected, _, _ = reference(run, metric_name)
    res = aid_influence(run, make_metric(metric_name, run), solver=solver, tol=1e-12, damping=0.0,
                        state=to_state(run, theta), progress=False, **options)
    assert res.converged and res.residual <= 1e-12
    assert expected.abs().max() > 0
    assert float((res.influence - expected).abs().max() / expected.abs().max()) < 1e-6


def test_aid_matches_re_solved_equilibria(tmp_path):
    """The ground truth of implicit differentiation: move w_j, solve the game again, difference."""
    run = lq_run(tmp_path)
    theta, _, value, (x, z) = reference(run, "all")
    res = aid_influence(run, make_metric("all", run), tol=1e-12, damping=0.0, state=to_state(run, theta),
                        progress=False)
    eps = 1e-5
    for j in (0, 9, 23, 39):
        vals = []
        for wj in (1.0 + eps, 1.0 - eps):
            w = torch.ones(N, dtype=torch.float64)
            w[j] = wj
            vals.append(float(value(equilibrium(theta, w, x, z))))
        fd = -(vals[0] - vals[1]) / (2 * eps)
        assert abs(res.influence[j].item() - fd) <= 1e-6 * res.influence.abs().max().item(), (j, fd)


@pytest.mark.parametrize("train", [{"update": "alternating"}, {"update": "alternating", "ema_beta": 0.9},
                                   {"optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01}])
def test_aid_is_the_same_for_every_update_rule_at_a_fixed_point(tmp_path, train):
    """Alternating updates, Adam and a generator average share the simultaneous game's fixed point."""
    run = lq_run(tmp_path, **train)
    theta, expected, _, _ = reference(run, "all")
    res = aid_influence(run, make_metric("all", run), tol=1e-12, damping=0.0, state=to_state(run, theta),
                        progress=False)
    assert float((res.influence - expected).abs().max() / expected.abs().max()) < 1e-6


@pytest.mark.parametrize("solver", ["gmres", "cg", "neumann"])
def test_default_damping_is_the_recorded_windows_time_scale(tmp_path, solver):
    """SGD with rate lr over a window of T steps: (J + I / (lr T))^T v = grad V, solved densely here."""
    run = lq_run(tmp_path, epochs=4, record_from_epoch=2)
    theta, _, value, (x, z) = reference(run, "all")
    window = run.final_step - run.window_start
    assert window == 2 * (N // 10)
    ones = torch.ones(N, dtype=torch.float64)
    J = jacrev(stationarity)(theta, ones, x, z)
    v = torch.linalg.solve((J + torch.eye(7, dtype=torch.float64) / (0.05 * window)).T, jacrev(value)(theta))
    expected = v @ jacrev(stationarity, argnums=1)(theta, ones, x, z)
    res = aid_influence(run, make_metric("all", run), solver=solver, tol=1e-12, state=to_state(run, theta),
                        progress=False)
    assert res.options["damping"] == "window" and res.options["window_steps"] == window
    assert float((res.influence - expected).abs().max() / expected.abs().max()) < 1e-6
    undamped = aid_influence(run, make_metric("all", run), tol=1e-12, damping=0.0, state=to_state(run, theta),
                             progress=False)
    assert float((undamped.influence - expected).abs().max() / expected.abs().max()) > 1e-3


def test_stochastic_neumann_estimates_the_expected_game(tmp_path):
    """Fresh minibatches and latents: the series solves the game in expectation over z ~ N(0, I),
    whose implicit derivative is computed densely here with 400k latents."""
    run = lq_run(tmp_path)
    theta, _, value, (x, _) = reference(run, "all")
    z = torch.randn(400_000, Z_DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ones = torch.ones(N, dtype=torch.float64)
    dtheta_dw = -torch.linalg.solve(jacrev(stationarity)(theta, ones, x, z),
                                    jacrev(stationarity, argnums=1)(theta, ones, x, z))
    expected = -(jacrev(value)(theta) @ dtheta_dw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AIDConvergenceWarning)  # judged on the fixed operator
        res = aid_influence(run, make_metric("all", run), solver="neumann", batch_size=10, iterations=4000,
                            step=0.05, state=to_state(run, theta), progress=False)
    assert res.options["batch_size"] == 10 and res.iterations == 4000
    assert pearsonr(res.influence, expected).statistic > 0.9  # the fixed-latent answer: -0.87


def test_non_convergence_warns_and_is_reported(tmp_path, capsys):
    run = lq_run(tmp_path)
    with pytest.warns(AIDConvergenceWarning, match="residual"):
        res = aid_influence(run, make_metric("all", run), solver="gmres", iterations=1, progress=False)
    assert not res.converged and res.residual > 1e-6
    out = tmp_path / "s.csv"
    rc = main(["influence", str(tmp_path / "lq"), "--method", "aid", "--aid-solver", "cg", "--aid-iterations", "1",
               "--out", str(out), "-q"])
    assert rc == 2  # a user-module run cannot be reopened from the command line without its modules
    assert "user-supplied modules" in capsys.readouterr().err


def test_cli_aid_writes_scores_and_solver_facts(run_factory, tmp_path, capsys):
    run = run_factory(train={"epochs": 3})
    out = tmp_path / "aid.csv"
    rc = main(["influence", str(run.path), "--method", "aid", "--metric", "all", "--aid-iterations", "2",
               "--aid-damping", "0", "--out", str(out), "-q"])
    assert rc == 0
    assert "gancleanse: warning: AID (gmres) stopped at relative residual" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[0] == "index,influence,harmfulness,key" and len(lines) == run.n_train + 1
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["method"] == "aid" and info["solver"] == "gmres" and info["converged"] is False
    assert info["residual"] > 0 and info["iterations"] == 2


def test_aid_options_are_checked(run_factory):
    run = run_factory()
    m = make_metric("all", run)
    for kw, msg in [({"solver": "lu"}, "unknown AID solver"), ({"iterations": 0}, "--aid-iterations"),
                    ({"damping": -1.0}, "--aid-damping"), ({"batch_size": 5}, "neumann only")]:
        with pytest.raises(ConfigError, match=msg):
            aid_influence(run, m, progress=False, **kw)

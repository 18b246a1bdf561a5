"""The two ways of differentiating a step (vjp, hvp) and the per-run choice: the same adjoint and influence
in float64, the fallbacks, and the record of the way used."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from torch.func import vjp
from torch.utils._pytree import tree_leaves, tree_map

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.errors import ConfigError
from gancleanse.influence import itd, reverse
from gancleanse.influence.itd import itd_influence
from gancleanse.influence.surrogate import smoothed_relu
from gancleanse.metrics import make_metric
from gancleanse.options import ITDOptions
from gancleanse.training.adjoint import step_adjoint

from conftest import make_run, tiny_config
from test_finetune import ADAM_R1, lora_modules
from test_itd_exact import rel_err

ADAM = {"optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01}
MLP_TRAIN = {
    "simultaneous-sgd": {"update": "simultaneous"},
    "alternating-sgd": {"update": "alternating"},
    "simultaneous-momentum": {"update": "simultaneous", "optimizer": "momentum"},
    "alternating-momentum": {"update": "alternating", "optimizer": "momentum"},
    "simultaneous-adam": {"update": "simultaneous", **ADAM},
    "alternating-adam-ema": {"update": "alternating", **ADAM, "ema_beta": 0.9},
    "weight-decay": {"update": "simultaneous", "weight_decay_d": 0.1, "weight_decay_g": 0.05, "lr_g": 0.02},
    "r1": {"update": "simultaneous", "r1_gamma": 2.0},
    "r1-r2-alternating": {"update": "alternating", "r1_gamma": 1.0, "r2_gamma": 0.5},
    "lazy-r1-adam-ema": {"update": "simultaneous", **ADAM, "r1_gamma": 1.0, "r1_every": 3, "ema_beta": 0.9},
    "lazy-r1-r2-alternating": {"update": "alternating", **ADAM, "r1_gamma": 1.0, "r2_gamma": 1.0, "r1_every": 2,
                               "betas": [0.0, 0.99], "ema_beta": 0.9},
    **{f"loss-{loss}": {"loss": loss, "update": "alternating", "lr_d": 0.02, "lr_g": 0.02}
       for loss in ("minmax", "wasserstein", "hinge", "ls")},
}


def labelled_points() -> gc.Splits:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (160,), generator=gen)
    x = torch.stack([y.double(), -y.double()], 1) + 0.3 * torch.randn(160, 2, generator=gen, dtype=torch.float64)
    return gc.Splits.random_split(x, n_valid=50, n_test=50, seed=0, y=y)


def digits_config(norm: str, activation: str, **train) -> Config:
    """A tiny float64 DCGAN on 8x8 digits."""
    return Config.from_dict({
        "data": {"name": "digits", "n_train": 60, "n_valid": 40, "n_test": 40, "seed": 4},
        "model": {"arch": "dcgan", "z_dim": 3, "g_hidden": 4, "d_hidden": 4, "activation": activation,
                  "norm": norm, "bias": True, "dtype": "float64"},
        "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 1, "seed": 3,
                  "checkpoint_every": 2, **train},
        "metric": {"n_samples": 40},
    })


def build(name: str, path) -> gc.Run:
    """The configuration ``name`` of ``CONFIGS``, trained under ``path``."""
    if name in MLP_TRAIN:
        return make_run(path, name, train=MLP_TRAIN[name])
    if name.startswith("frozen-"):
        train = {"update": "alternating"} if name == "frozen-alternating" else {"update": "simultaneous", **ADAM_R1}
        return make_run(path, name, model={"frozen": ["g/net.0.*", "d/net.2.weight"]}, train=train)
    if name == "lora-config":
        return make_run(path, name, model={"lora_rank": 2, "lora_targets": ["net.0", "net.2"]},
                        train={"update": "simultaneous", **ADAM_R1, "r1_every": 2})
    if name == "user-modules-lora":
        data = gc.Splits.random_split(torch.randn(60, 2, dtype=torch.float64), n_valid=20, n_test=20, seed=0)
        return gc.train(tiny_config(train={"update": "simultaneous", **ADAM_R1, "r2_gamma": 0.5}), path / name,
                        models=lora_modules(), data=data, progress=False)
    if name == "conditional":
        cfg = tiny_config(model={"conditional": True}, train={"update": "alternating", **ADAM, "r1_gamma": 1.0,
                                                              "r2_gamma": 0.5, "ema_beta": 0.9})
        return gc.train(cfg, path / name, data=labelled_points(), progress=False)
    if name == "dcgan-layernorm":
        return gc.train(digits_config("layer", "softplus", weight_decay_d=1e-3, update="alternating"), path / name,
                        progress=False)
    if name == "dcgan-r1":
        return gc.train(digits_config("none", "sigmoid", r1_gamma=0.5, optimizer="adam", lr_d=0.01, lr_g=0.01),
                        path / name, progress=False)
    raise KeyError(name)


CONFIGS = [*MLP_TRAIN, "frozen-alternating", "frozen-adam-r1", "lora-config", "user-modules-lora", "conditional",
           "dcgan-layernorm", "dcgan-r1"]


def block_gaps(got: dict, expected: dict) -> dict[str, float]:
    """max |got - expected| / max |expected| for each top-level block of an adjoint state."""
    gaps = {}
    for key in expected:
        a, b = tree_leaves(got[key]), tree_leaves(expected[key])
        if b:
            a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
            assert b.abs().max() > 0, key
            gaps[key] = float((a - b).abs().max() / b.abs().max())
    return gaps


@pytest.mark.parametrize("name", CONFIGS)
def test_step_adjoint_equals_the_vjp_of_the_step(tmp_path, name):
    """Hessian-vector products against reverse-over-reverse on random adjoints: every block of the state and
    the per-instance terms, on the first two steps of the window (with and without lazy penalties)."""
    run = build(name, tmp_path)
    dyn, ones = run.dynamics, torch.ones(run.cfg.train.batch_size, dtype=torch.float64)
    state = run.load_state(run.window_start)
    generator = torch.Generator().manual_seed(1)
    for step in (run.window_start, run.window_start + 1):
        batch = run.batch(step)
        new, _, gradients = dyn.step_with_gradients(state, batch, ones)
        u = tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype), new)
        want_u, want_w = vjp(lambda s, w: dyn.step(s, batch, w), state, ones, has_aux=True)[1](u)
        got_u, got_w = step_adjoint(dyn, state, batch, ones, gradients, new["d"], u)
        assert max(block_gaps(got_u, want_u).values()) < 1e-10
        assert want_w.abs().max() > 0 and rel_err(got_w, want_w) < 1e-10
        state = new


@pytest.mark.parametrize("name", CONFIGS)
def test_the_two_ways_give_the_same_influence(tmp_path, name):
    run = build(name, tmp_path)
    metric = make_metric("all", run)
    by_vjp = itd_influence(run, metric, progress=False, reverse="vjp")
    by_hvp = itd_influence(run, metric, progress=False, reverse="hvp")
    assert by_vjp.reverse == {"reverse": "vjp"}
    assert by_hvp.reverse == {"reverse": "hvp", "vjp_fallback_steps": 0}  # every step by Hessian-vector products
    assert by_vjp.influence.abs().max() > 0 and rel_err(by_hvp.influence, by_vjp.influence) < 1e-10
    assert by_hvp.horizons.keys() == by_vjp.horizons.keys()
    assert all(rel_err(by_hvp.horizons[k], by_vjp.horizons[k]) < 1e-10 for k in by_vjp.horizons)


def test_layer_norm_under_gradient_penalties_runs_by_hessian_vector_products(tmp_path):
    """models.layer_norm is right in forward and reverse mode: steps applying R1 run the hvp way too."""
    run = gc.train(digits_config("layer", "softplus", r1_gamma=0.5, r1_every=2, epochs=3, record_from_epoch=1),
                   tmp_path / "run", progress=False)
    metric = make_metric("all", run)
    by_vjp = itd_influence(run, metric, progress=False, reverse="vjp")
    by_hvp = itd_influence(run, metric, progress=False, reverse="hvp")
    assert by_hvp.reverse == {"reverse": "hvp", "vjp_fallback_steps": 0}
    assert rel_err(by_hvp.influence, by_vjp.influence) < 1e-10


def test_operations_without_forward_mode_fall_back_bitwise(tmp_path):
    """The kink-smoothed ReLU is an autograd.Function without a forward-mode rule: every step falls back to
    the VJP, which gives the vjp way's influence bit for bit; the reason is recorded."""
    run = make_run(tmp_path, model={"activation": "relu"})
    metric = make_metric("all", run)
    with smoothed_relu(run.models, 0.3):
        by_vjp = itd_influence(run, metric, progress=False, reverse="vjp")
        by_hvp = itd_influence(run, metric, progress=False, reverse="hvp")
        auto = itd_influence(run, metric, progress=False, reverse="auto")
    assert by_hvp.reverse["vjp_fallback_steps"] == run.final_step - run.window_start
    assert "jvp" in by_hvp.reverse["vjp_fallback_reason"]
    assert torch.equal(by_hvp.influence, by_vjp.influence)
    assert auto.reverse["reverse"] == "vjp" and torch.equal(auto.influence, by_vjp.influence)


@pytest.mark.parametrize("slowed", ["vjp", "hvp"])
def test_auto_keeps_the_faster_way(run_factory, monkeypatch, slowed):
    """Where auto times both ways (CUDA; here the CPU made one of them): kept, the vjp way gives its own influence
    bit for bit; taking over after the trial's segment, the hvp way agrees with its own to rounding."""
    monkeypatch.setattr(itd, "TRIAL_DEVICES", frozenset({"cpu", "cuda"}))
    run = run_factory(train={"update": "alternating", **ADAM, "ema_beta": 0.9, "r1_gamma": 1.0, "r1_every": 2,
                             "checkpoint_every": 5})
    metric = make_metric("all", run)
    target = (reverse.VJPPass, "pullback") if slowed == "vjp" else (reverse.HVPPass, "adjoint")
    original = getattr(*target)

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return original(*args, **kwargs)

    monkeypatch.setattr(*target, slow)
    adjoints = []
    monkeypatch.setattr(reverse, "step_adjoint", lambda *args: adjoints.append(1) or step_adjoint(*args))
    auto = itd_influence(run, metric, progress=False, reverse="auto")
    chosen = "hvp" if slowed == "vjp" else "vjp"
    assert auto.reverse["reverse"] == chosen
    trial = auto.reverse["reverse_trial_seconds"]
    assert trial[slowed] > 0.25 > trial[chosen]
    forced = itd_influence(run, metric, progress=False, reverse=chosen)
    if chosen == "vjp":
        assert torch.equal(auto.influence, forced.influence)
        assert all(torch.equal(auto.horizons[k], forced.horizons[k]) for k in forced.horizons)
    else:  # every step before the trial's segment (the last, 10..12) by Hessian-vector products
        assert run.checkpoint_steps[-2:] == [10, 12] and len(adjoints) > 10
        assert auto.reverse["vjp_fallback_steps"] == 0
        assert rel_err(auto.influence, forced.influence) < 1e-10
        assert all(rel_err(auto.horizons[k], forced.horizons[k]) < 1e-10 for k in forced.horizons)


def test_auto_charges_the_vjp_way_its_second_replay(run_factory, monkeypatch):
    """Where the vjp way's graphs do not fit a segment, it replays each segment twice: its trial time gains one
    step without graph (here made to take 10 s, by a stand-in clock for the hvp way's forward step)."""
    run = run_factory()
    ones = torch.ones(run.cfg.train.batch_size, dtype=torch.float64)
    vjp_pass, hvp_pass = reverse.VJPPass(run.dynamics, run.batch, ones), reverse.HVPPass(run.dynamics, run.batch, ones)
    state = run.load_state(run.window_start)
    _, pullback = vjp_pass.forward(state, run.window_start)
    u = tree_map(torch.randn_like, state)
    forward = hvp_pass.forward

    def ten_second_forward(*args):
        new, point = forward(*args)
        return new, dataclasses.replace(point, seconds=10.0)

    monkeypatch.setattr(hvp_pass, "forward", ten_second_forward)
    kept, result, once = reverse.choose(vjp_pass, hvp_pass, pullback, u, False)
    assert kept is vjp_pass and once["vjp"] < 10.0 <= once["hvp"]
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(result), tree_leaves(pullback.apply(u))))
    _, _, twice = reverse.choose(vjp_pass, hvp_pass, pullback, u, True)
    assert twice["vjp"] >= 10.0


def test_an_error_on_a_checked_kind_of_step_is_raised(run_factory, monkeypatch):
    """Only the check falls back: a failure once a kind of step has passed it is a real error."""
    run = run_factory()
    calls = []

    def failing_later(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("something broke")
        return step_adjoint(*args, **kwargs)

    monkeypatch.setattr(reverse, "step_adjoint", failing_later)
    with pytest.raises(RuntimeError, match="something broke"):
        itd_influence(run, make_metric("all", run), progress=False, reverse="hvp")


def test_the_way_is_an_option_and_recorded_in_the_scores(run_factory, tmp_path):
    run = run_factory()
    scores = gc.influence(run, "all", "itd", check=0, progress=False, reverse="hvp")
    assert scores.info["reverse_requested"] == "hvp" and scores.info["reverse"] == "hvp"
    assert scores.info["vjp_fallback_steps"] == 0
    auto = gc.influence(run, "all", "itd", check=0, progress=False)
    assert auto.info["reverse_requested"] == "auto" and auto.info["reverse"] == "vjp"
    assert auto.info["reverse_rule"] == "cpu: vjp" and "reverse_trial_seconds" not in auto.info
    out = tmp_path / "itd.csv"
    assert main(["influence", str(run.path), "--method", "itd", "--metric", "all", "--reverse", "vjp",
                 "--check", "0", "--out", str(out), "-q"]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["reverse_requested"] == "vjp" and info["reverse"] == "vjp"
    assert rel_err(torch.tensor(scores.influence), torch.tensor(auto.influence)) < 1e-10


def test_an_unknown_way_is_a_one_line_error(run_factory):
    with pytest.raises(ConfigError, match=r"unknown reverse pass 'fast' \(available: auto, vjp, hvp\) \(--reverse\)"):
        ITDOptions(reverse="fast")
    run = run_factory()
    with pytest.raises(ConfigError, match="unknown reverse pass"):
        itd_influence(run, make_metric("all", run), progress=False, reverse="fast")

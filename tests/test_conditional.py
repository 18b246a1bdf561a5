"""Class-conditional GANs: an instance is the pair (x, y); ITD exact; labels recorded and verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.errors import ConfigError, DataError
from gancleanse.influence.aid import aid_influence
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.training.dynamics import StepBatch

from conftest import tiny_config
from test_integrity import changed, resealed
from test_itd_exact import rel_err, unrolled_dV_dw


def labelled_points(n: int = 160, classes: int = 3, seed: int = 0) -> gc.Splits:
    """2D points in ``classes`` clusters, the cluster as label (unequal class sizes)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor([0.2, 0.3, 0.5][:classes], dtype=torch.float64), n, True, generator=gen)
    centre = torch.stack([y.to(torch.float64), -y.to(torch.float64)], 1)
    x = centre + 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return gc.Splits.random_split(x, n_valid=50, n_test=50, seed=0, y=y)


def conditional_run(tmp_path, name="run", data=None, **sections):
    cfg = tiny_config(model={"conditional": True, **sections.pop("model", {})}, **sections)
    return gc.train(cfg, tmp_path / name, data=data or labelled_points(), progress=False)


CASES = [
    {"update": "simultaneous"},
    {"update": "alternating", "optimizer": "momentum"},
    {"update": "simultaneous", "optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01, "r1_gamma": 1.0, "r1_every": 2,
     "ema_beta": 0.9},
    {"update": "alternating", "optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01, "r1_gamma": 1.0, "r2_gamma": 0.5,
     "betas": [0.0, 0.99], "ema_beta": 0.9},
]


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
@pytest.mark.parametrize("train", CASES)
@pytest.mark.parametrize("metric_name", ["all", "loss_d"])
def test_conditional_itd_equals_unrolled_autograd(tmp_path, train, metric_name, reverse):
    run = conditional_run(tmp_path, train=train)
    expected = -unrolled_dV_dw(run, metric_name)
    got = itd_influence(run, make_metric(metric_name, run), progress=False, reverse=reverse).influence
    assert expected.abs().max() > 0
    assert rel_err(got, expected) < 1e-8


def test_built_in_nets_take_the_label(tmp_path):
    run = conditional_run(tmp_path, train={"epochs": 1})
    state = run.final_state()
    z = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    zeros, twos = torch.zeros(4, dtype=torch.long), torch.full((4,), 2, dtype=torch.long)
    models = run.models
    assert set(state["g"]) >= {"embed.weight"} and set(state["d"]) >= {"embed.weight"}
    assert not torch.allclose(models.generate(state["g"], z, zeros), models.generate(state["g"], z, twos))
    assert not torch.allclose(models.discriminate(state["d"], x, zeros), models.discriminate(state["d"], x, twos))
    with pytest.raises(ValueError, match="labels"):
        models.generate(state["g"], z)


def test_a_removed_instance_takes_its_label_with_it(tmp_path):
    """With w_j = 0 the step does not depend on y_j at all (real term and R1 term alike)."""
    run = conditional_run(tmp_path, train={"r1_gamma": 1.0, "update": "alternating", "epochs": 1})
    state, batch = run.load_state(0), run.batch(0)
    w = torch.ones(batch.x.shape[0], dtype=torch.float64)
    w[3] = 0.0
    other = batch.y.clone()
    other[3] = (other[3] + 1) % 3
    a, _ = run.dynamics.step(state, batch, w)
    b, _ = run.dynamics.step(state, StepBatch(batch.x, batch.z_d, batch.z_g, batch.count, other, batch.c_d,
                                              batch.c_g), w)
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("d", "g") for k in a[p])
    c, _ = run.dynamics.step(state, StepBatch(batch.x, batch.z_d, batch.z_g, batch.count, other, batch.c_d,
                                              batch.c_g), torch.ones_like(w))
    assert not torch.equal(c["d"]["embed.weight"], run.dynamics.step(state, batch, torch.ones_like(w))[0]["d"]["embed.weight"])


def test_generated_labels_follow_the_training_frequencies_and_are_recorded(tmp_path):
    data = labelled_points(n=600)
    run = conditional_run(tmp_path, data=data, train={"epochs": 6, "record_from_epoch": 3, "batch_size": 20})
    freq = torch.bincount(data.y_train, minlength=3).to(torch.float64) / data.y_train.numel()
    assert run.meta["labels"] == {"classes": 3, "frequencies": freq.tolist()}
    drawn = torch.cat([run.batch(s).c_d for s in range(run.final_step)])
    assert drawn.numel() == 6 * 25 * 20
    assert (torch.bincount(drawn, minlength=3) / drawn.numel() - freq).abs().max() < 0.03
    # the window's labels are the recorded ones, earlier steps regenerate the same stream
    sched = run.read_tensors("schedule.safetensors")
    assert sched["c_d"].shape == (75, 20) and "c_g" not in sched  # simultaneous: one latent batch, one label batch
    assert torch.equal(sched["c_d"][0], run.schedule.labels(run.window_start)[0])
    assert torch.equal(run.batch(5).y, data.y_train[run.indices(5)])
    labels = run.eval_labels("valid")
    assert labels.shape == (run.cfg.metric.n_samples,) and not torch.equal(labels, run.eval_labels("test"))


def test_alternating_updates_record_each_players_labels(tmp_path):
    run = conditional_run(tmp_path, train={"update": "alternating"})
    sched = run.read_tensors("schedule.safetensors")
    assert sched["c_g"].shape == sched["c_d"].shape and not torch.equal(sched["c_g"], sched["c_d"])
    assert torch.equal(run.batch(2).c_g, sched["c_g"][2])


@pytest.mark.parametrize("name,key", [("schedule.safetensors", "c_d"), ("eval_latents.safetensors", "test_labels")])
def test_verify_catches_relabelled_fakes(tmp_path, capsys, name, key):
    run = conditional_run(tmp_path)
    resealed(name, lambda d: changed(d, key, lambda t: (t + 1) % 3))(run.path)
    assert main(["verify", str(run.path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err


def test_verify_refuses_labels_outside_the_classes(tmp_path, capsys):
    run = conditional_run(tmp_path)
    resealed("schedule.safetensors", lambda d: changed(d, "c_d", lambda t: t + 3))(run.path)
    assert main(["influence", str(run.path), "--metric", "all", "--out", str(tmp_path / "s.csv"), "--check", "0"]) == 2
    assert "c_d must hold int64 labels in 0..2" in capsys.readouterr().err


class CondGenerator(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(classes, 2)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Softplus(), nn.Linear(8, 2))

    def forward(self, z, y):
        return self.net(torch.cat([z, self.embed(y)], 1))


class CondDiscriminator(nn.Module):
    """A projection discriminator of the user's own."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Softplus())
        self.head = nn.Linear(8, 1)
        self.embed = nn.Embedding(classes, 8)

    def forward(self, x, y):
        h = self.body(x)
        return self.head(h).reshape(-1) + (self.embed(y) * h).sum(1)


def user_modules(seed: int = 0) -> gc.GANModules:
    torch.manual_seed(seed)
    return gc.GANModules(gc.lora(CondGenerator().double(), rank=2, seed=1),
                         gc.lora(CondDiscriminator().double(), rank=2, seed=2), z_dim=3, conditional=True,
                         train_only=("*lora_*", "*embed*"))


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
def test_r1_lora_and_conditional_together_are_exact_and_agree_with_retraining(tmp_path, reverse):
    data = labelled_points(n=180, seed=1)
    cfg = tiny_config(train={"update": "alternating", "epochs": 3, "lr_d": 0.1, "lr_g": 0.1, "r1_gamma": 0.5,
                             "record_from_epoch": 2})
    run = gc.train(cfg, tmp_path / "run", models=user_modules(), data=data, progress=False)
    assert run.cfg.model.conditional and run.cfg.model.arch == "custom"
    assert all(k.endswith(("lora_a", "lora_b", "embed.weight")) for p in ("d", "g") for k in run.final_state()[p])
    est = itd_influence(run, make_metric("all", run), progress=False, reverse=reverse).influence
    expected = -unrolled_dV_dw(run, "all")
    assert expected.abs().max() > 0 and rel_err(est, expected) < 1e-8
    chosen = [int(i) for i in torch.argsort(-est.abs())[:6]] + [0, 5, 11, 17]
    actual = [gc.counterfactual(run, [j], "all")["delta"] for j in chosen]
    assert np.corrcoef(est[chosen].numpy(), actual)[0, 1] >= 0.95
    # reopened with the same kind of modules: the same retrain; unconditional ones are refused
    again = gc.Run.open(run.path, models=user_modules(seed=5))
    assert gc.counterfactual(again, [chosen[0]], "all") == gc.counterfactual(run, [chosen[0]], "all")
    plain = gc.GANModules(again.models.generator, again.models.discriminator, z_dim=3)
    with pytest.raises(ConfigError, match="trained with conditional modules"):
        gc.Run.open(run.path, models=plain)


def test_aid_and_the_discriminator_ranking_use_the_labels(tmp_path):
    run = conditional_run(tmp_path, train={"epochs": 3})
    res = aid_influence(run, make_metric("all", run), progress=False)
    assert torch.isfinite(res.influence).all() and res.influence.abs().max() > 0
    ranked = gc.influence(run, "all", method="discriminator", check=0, progress=False)
    state = run.final_state()
    logits = run.models.discriminate(state["d"], run.x_train, run.y_train)
    assert np.allclose(ranked.harmfulness, -logits.detach().numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
def test_a_conditional_dcgan_on_digits_is_exact_for_fid(tmp_path, reverse):
    cfg = Config.from_dict({
        "data": {"name": "digits", "n_train": 60, "n_valid": 60, "n_test": 60, "seed": 4},
        "model": {"arch": "dcgan", "z_dim": 3, "g_hidden": 4, "d_hidden": 4, "activation": "softplus",
                  "norm": "layer", "bias": True, "dtype": "float64", "conditional": True},
        "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 1, "seed": 3,
                  "checkpoint_every": 2, "r1_gamma": 0.5},
        "metric": {"n_samples": 60, "classifier_epochs": 5},
    })
    run = gc.train(cfg, tmp_path / "run", progress=False)
    assert run.meta["labels"]["classes"] == 10
    est = itd_influence(run, make_metric("fid", run), progress=False, reverse=reverse).influence
    expected = -unrolled_dV_dw(run, "fid")
    assert expected.abs().max() > 0 and rel_err(est, expected) < 1e-8


def test_labels_are_needed_and_their_absence_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nconditional = true\n[train]\nepochs = 1\n')
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.conditional = true needs labelled data" in err and "gaussian2d" in err
    assert not (tmp_path / "r").exists()
    x = torch.randn(80, 2, dtype=torch.float64)
    with pytest.raises(DataError, match="needs labels on every split"):
        gc.train(tiny_config(model={"conditional": True}), tmp_path / "u",
                 data=gc.Splits.random_split(x, n_valid=20, n_test=20), progress=False)
    with pytest.raises(ConfigError, match="the modules are not"):
        gc.train(tiny_config(model={"conditional": True}), tmp_path / "v",
                 models=gc.GANModules(nn.Linear(3, 2), nn.Linear(2, 1), z_dim=3), data=labelled_points(),
                 progress=False)
    bad = labelled_points()
    bad = gc.Splits.from_tensors(bad.train, bad.valid, bad.test, bad.y_train - 1, bad.y_valid, bad.y_test)
    with pytest.raises(DataError, match="class labels 0, 1"):
        gc.train(tiny_config(model={"conditional": True}), tmp_path / "w", data=bad, progress=False)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros((30, 8, 8), dtype=np.uint8))
    cfg.write_text(f'[data]\nname = "npz"\npath = "{npz}"\nn_valid = 5\nn_test = 5\n[model]\narch = "dcgan"\n'
                   'conditional = true\n[train]\nepochs = 1\nbatch_size = 5\n')
    assert main(["train", str(cfg), "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs labels on every split" in err


def test_a_conditional_study_runs_and_reports(tmp_path):
    cfg = tiny_config(model={"conditional": True}, train={"epochs": 2, "record_from_epoch": 1},
                      cleanse={"metrics": ["all"], "methods": ["itd", "discriminator", "random"],
                               "removal_rates": [0.0, 0.1], "seeds": [0], "check": 0})
    summary = gc.cleanse(cfg, tmp_path / "study", data=labelled_points(), progress=False)
    rows = (tmp_path / "study" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("seed,method,score_metric,eval_metric,removal_rate,n_removed,before,after,delta")
    assert {r.split(",")[1] for r in rows[1:]} == {"itd", "discriminator", "random"}
    assert json.loads((tmp_path / "study" / "summary.json").read_text()) and summary

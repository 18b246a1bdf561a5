"""Fine-tuning setups: frozen subsets, low-rank adapters, pretrained starts; ITD exact on each."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.errors import ConfigError
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric

from conftest import make_run, tiny_config
from test_itd_exact import rel_err, unrolled_dV_dw

ADAM_R1 = {"optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01, "betas": [0.0, 0.99], "r1_gamma": 1.0,
           "ema_beta": 0.9}


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
@pytest.mark.parametrize("train", [{"update": "alternating"}, {"update": "simultaneous", **ADAM_R1}])
def test_frozen_subset_state_holds_only_what_trains_and_itd_is_exact(tmp_path, train, reverse):
    run = make_run(tmp_path, model={"frozen": ["g/net.0.*", "d/net.2.weight"]}, train=train)
    state = run.final_state()
    assert not any(k.startswith("net.0.") for k in state["g"]) and "net.2.weight" not in state["d"]
    assert set(state["opt_g"].get("m", state["g"])) == set(state["g"])
    frozen = run.read_tensors("frozen.safetensors")
    assert sorted(frozen) == ["d/net.2.weight", "g/net.0.weight"]
    assert run.meta["parameters"]["g"]["frozen"] == sum(v.numel() for k, v in frozen.items() if k.startswith("g/"))
    # the frozen values are the initial ones and the modules compute with them
    assert torch.equal(dict(run.models.generator.named_parameters())["net.0.weight"], frozen["g/net.0.weight"])
    expected = -unrolled_dV_dw(run, "all")
    got = itd_influence(run, make_metric("all", run), progress=False, reverse=reverse).influence
    assert expected.abs().max() > 0 and rel_err(got, expected) < 1e-8


@dataclasses.dataclass(frozen=True)
class MaskedSGD:
    """SGD with a zero learning rate on some parameters: they stay what they were."""

    lr: float
    still: tuple[str, ...]

    def init(self, params):
        return {}

    def update(self, grads, state, params, count):
        return {k: p if k in self.still else p - self.lr * grads[k] for k, p in params.items()}, state


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
def test_zero_learning_rate_on_a_subset_gives_the_frozen_influence(tmp_path, monkeypatch, reverse):
    """Everything trainable, but G's first layer with learning rate 0: the same influence as
    with that layer frozen (its adjoint never reaches the instance weights)."""
    frozen = make_run(tmp_path, "frozen", model={"frozen": ["g/net.0.*"]})
    reference = itd_influence(frozen, make_metric("all", frozen), progress=False, reverse=reverse).influence

    from gancleanse.training import dynamics

    original, calls = dynamics.make_optimizer, []

    def d_as_configured_g_masked(t, lr):  # Dynamics.from_config asks for D's optimizer, then G's
        calls.append(lr)
        return original(t, lr) if len(calls) % 2 == 1 else MaskedSGD(lr, ("net.0.weight",))

    monkeypatch.setattr(dynamics, "make_optimizer", d_as_configured_g_masked)
    everything = make_run(tmp_path, "everything")
    state = everything.final_state()
    assert torch.equal(state["g"]["net.0.weight"], everything.load_state(0)["g"]["net.0.weight"])
    got = itd_influence(everything, make_metric("all", everything), progress=False, reverse=reverse).influence
    assert reference.abs().max() > 0 and rel_err(got, reference) < 1e-10


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Softplus(), nn.Linear(8, 2))

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Softplus(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)


def lora_modules(seed: int = 0) -> gc.GANModules:
    torch.manual_seed(seed)
    g, d = Generator().double(), Discriminator().double()
    return gc.GANModules(gc.lora(g, rank=2, seed=1), gc.lora(d, rank=2, seed=2), z_dim=3)


def test_lora_starts_as_the_wrapped_module_and_keeps_its_hyperparameters():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ConvTranspose2d(4, 2, 4, 2, 1), nn.Flatten(),
                          nn.Linear(2 * 8 * 8, 3)).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    before = plain(x)
    wrapped = gc.lora(plain, rank=2)
    assert torch.equal(wrapped(x), before)  # B = 0
    names = [n for n, _ in wrapped.named_parameters()]
    assert sum(n.endswith(("lora_a", "lora_b")) for n in names) == 6
    with torch.no_grad():
        wrapped[0].lora_b.fill_(0.1)
    assert not torch.equal(wrapped(x), before)
    with pytest.raises(ConfigError, match="no Linear or convolution layer"):
        gc.lora(nn.Sequential(nn.Tanh()), rank=2)
    with pytest.raises(ConfigError, match="no layer matching"):
        gc.lora(Generator(), rank=2, targets=["nothing*"])


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
@pytest.mark.parametrize("train", [{"update": "alternating"}, {"update": "simultaneous", **ADAM_R1, "r2_gamma": 0.5}])
def test_lora_trains_only_adapters_and_itd_is_exact(tmp_path, train, reverse):
    data = gc.Splits.random_split(torch.randn(60, 2, dtype=torch.float64), n_valid=20, n_test=20, seed=0)
    cfg = tiny_config(train=train)
    models = lora_modules()
    base = {n: p.detach().clone() for n, p in models.generator.named_parameters() if "base" in n}
    run = gc.train(cfg, tmp_path / "run", models=models, data=data, progress=False)
    state = run.final_state()
    assert all(k.endswith(("lora_a", "lora_b")) for p in ("d", "g") for k in state[p])
    assert run.meta["parameters"]["g"] == {"trainable": (2 * 3 + 8 * 2) + (2 * 8 + 2 * 2), "frozen": 3 * 8 + 8 + 8 * 2 + 2}
    assert all(torch.equal(v, run.models.generator.get_parameter(n)) for n, v in base.items())  # not trained
    expected = -unrolled_dV_dw(run, "all")
    got = itd_influence(run, make_metric("all", run), progress=False, reverse=reverse).influence
    assert expected.abs().max() > 0 and rel_err(got, expected) < 1e-8
    # reopened with fresh modules of another seed: the run's frozen weights are put back in
    again = gc.Run.open(run.path, models=lora_modules(seed=9))
    assert all(torch.equal(dict(again.models.generator.named_parameters())[n], v) for n, v in base.items())
    assert gc.counterfactual(again, [3], "all") == gc.counterfactual(run, [3], "all")


def test_lora_with_frozen_subsets_and_r1_agrees_with_retraining(tmp_path):
    data = gc.Splits.random_split(torch.randn(100, 2, dtype=torch.float64) * 0.5 + 1, n_valid=40, n_test=40,
                                  seed=0)
    cfg = tiny_config(train={"update": "alternating", "epochs": 3, "lr_d": 0.1, "lr_g": 0.1, "r1_gamma": 0.5,
                             "record_from_epoch": 2})
    run = gc.train(cfg, tmp_path / "run", models=lora_modules(), data=data, progress=False)
    est = itd_influence(run, make_metric("all", run), progress=False).influence
    chosen = [int(i) for i in torch.argsort(-est.abs())[:6]] + [0, 5, 11, 17]
    actual = [gc.counterfactual(run, [j], "all")["delta"] for j in chosen]
    assert np.corrcoef(est[chosen].numpy(), actual)[0, 1] >= 0.95


def test_trainable_patterns_that_mean_nothing_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train_only pattern 'g/nothing' matches no parameter"):
        make_run(tmp_path, "a", model={"train_only": ["d/*", "g/nothing"]})
    with pytest.raises(ConfigError, match="leave the discriminator nothing to train"):
        make_run(tmp_path, "b", model={"frozen": ["d/*"]})
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(model={"frozen": ["x/*"]}).to_toml())
    assert main(["train", str(cfg), "--out", str(tmp_path / "c"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "frozen pattern 'x/*' matches no parameter" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_pretrained_start_from_safetensors(tmp_path):
    first = make_run(tmp_path, "first")
    final = first.final_state()
    weights = {**{f"generator.{k}": v for k, v in final["g"].items()},
               **{f"discriminator.{k}": v for k, v in final["d"].items()}}
    path = tmp_path / "pretrained.safetensors"
    save_file(weights, str(path))
    second = make_run(tmp_path, "second", model={"init": str(path)}, train={"seed": 7})
    start = second.load_state(0)
    assert all(torch.equal(start[p][k], final[p][k]) for p in ("d", "g") for k in final[p])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert second.meta["init"]["generator"] == {"path": str(path), "sha256": digest}
    # the generator alone, plain names
    g_only = tmp_path / "g.safetensors"
    save_file(dict(final["g"]), str(g_only))
    third = make_run(tmp_path, "third", model={"init_g": str(g_only)})
    assert all(torch.equal(third.load_state(0)["g"][k], v) for k, v in final["g"].items())
    assert not torch.equal(third.load_state(0)["d"]["net.0.weight"], final["d"]["net.0.weight"])
    # what is wrong with a file is named
    save_file({k: v for k, v in weights.items() if k != "generator.net.2.weight"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match=r"model.init: .*short.safetensors has no generator.net.2.weight"):
        make_run(tmp_path, "x", model={"init": str(tmp_path / "short.safetensors")})
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        make_run(tmp_path, "y", model={"init_d": str(tmp_path / "first" / "run.json")})
    with pytest.raises(ConfigError, match="file not found"):
        make_run(tmp_path, "z", model={"init_d": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ConfigError, match="model.init names both"):
        tiny_config(model={"init": str(path), "init_g": str(g_only)})
    assert json.loads((tmp_path / "second" / "run.json").read_text())["init"]["discriminator"]["sha256"] == digest


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
def test_config_lora_on_a_pretrained_start_trains_adapters_only_and_itd_is_exact(tmp_path, reverse):
    """[model] lora_rank on the built-in net, started from a plain pretrained file: the
    pretrained weights land under the adapters (as constants), which alone train."""
    first = make_run(tmp_path, "first")
    final = first.final_state()
    path = tmp_path / "pretrained.safetensors"
    save_file({**{f"generator.{k}": v for k, v in final["g"].items()},
               **{f"discriminator.{k}": v for k, v in final["d"].items()}}, str(path))
    run = make_run(tmp_path, "ft", model={"init": str(path), "lora_rank": 2, "lora_targets": ["net.0", "net.2"]},
                   train={"update": "simultaneous", **ADAM_R1, "r1_every": 2})
    start = run.load_state(0)
    assert sorted(start["g"]) == ["net.0.lora_a", "net.0.lora_b", "net.2.lora_a", "net.2.lora_b"]
    assert all(not v.any() for k, v in start["g"].items() if k.endswith("lora_b"))
    frozen = run.read_tensors("frozen.safetensors")
    assert torch.equal(frozen["g/net.0.base.weight"], final["g"]["net.0.weight"])
    assert torch.equal(frozen["g/net.4.weight"], final["g"]["net.4.weight"])  # not a target: frozen as it was
    # at the start the adapted generator is the pretrained one
    z = run.eval_latents("valid")
    pre = first.models.generate(final["g"], z)
    assert torch.allclose(run.models.generate(start["g"], z), pre, rtol=1e-12, atol=1e-12)
    expected = -unrolled_dV_dw(run, "all")
    got = itd_influence(run, make_metric("all", run), progress=False, reverse=reverse).influence
    assert expected.abs().max() > 0 and rel_err(got, expected) < 1e-8


def test_journal_protocol_example_prepares_a_config_that_fine_tunes_adapters(tmp_path):
    from gancleanse.examples.finetune_digits import prepare

    config = prepare(tmp_path / "ft", size=8, pretrain_epochs=1, finetune_epochs=1, progress=False)
    cfg = gc.load_config(config)
    assert cfg.model.lora_rank == 4 and cfg.train.r1_gamma == 10.0 and cfg.train.betas == [0.0, 0.99]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, g_hidden=4, d_hidden=4))
    with pytest.raises(ConfigError, match="has shape"):  # the pretrained weights fit the config's widths only
        gc.train(cfg, tmp_path / "narrow", progress=False)
    run = gc.train(gc.load_config(config), tmp_path / "run", progress=False)
    params = run.meta["parameters"]
    assert 0 < params["g"]["trainable"] < params["g"]["frozen"] and 0 < params["d"]["trainable"] < params["d"]["frozen"]
    digest = hashlib.sha256((tmp_path / "ft" / "pretrained.safetensors").read_bytes()).hexdigest()
    assert run.meta["init"]["generator"]["sha256"] == digest
    planted = (tmp_path / "ft" / "finetune" / "planted.csv").read_text().splitlines()[1:]
    assert planted and all(int(line.split("/")[0]) >= 5 for line in planted)  # fine-tuned on the digits 5-9

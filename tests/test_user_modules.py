"""The README's Python API example with a user-defined GAN, run as a test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gancleanse as gc
from gancleanse.errors import ConfigError, RunDirError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- user-gan-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its user-GAN example block"
    return m.group(1)


def test_readme_user_gan_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    run, scores, cf = namespace["run"], namespace["scores"], namespace["cf"]
    assert scores.influence.shape == (run.n_train,)
    assert cf["removed"] == scores.most_harmful(5)
    assert (tmp_path / "runs" / "mine" / "data.safetensors").is_file()
    # the estimate agrees with retraining on the user's own model
    idx = list(range(0, 40, 4))
    actual = [gc.counterfactual(run, [j], "all")["delta"] for j in idx]
    assert np.corrcoef(scores.influence[idx], actual)[0, 1] > 0.98


class TinyG(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, z):
        return self.net(z)


class BNDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def test_batchnorm_in_discriminator_is_refused():
    with pytest.raises(ConfigError, match="BatchNorm"):
        gc.GANModules(TinyG(), BNDiscriminator(), z_dim=4)


def test_user_run_needs_its_modules_to_reopen_and_pickles(tmp_path):
    import pickle

    D = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    models = gc.GANModules(TinyG(), D, z_dim=4)
    data = gc.Splits.random_split(torch.randn(120, 2, dtype=torch.float64), n_valid=30, n_test=30, seed=0)
    cfg = gc.Config.from_dict({"train": {"epochs": 1, "batch_size": 20, "lr_d": 0.01, "lr_g": 0.01}})
    run = gc.train(cfg, tmp_path / "run", models=models, data=data, progress=False)
    assert run.cfg.model.arch == "custom" and run.cfg.data.name == "custom" and run.n_train == 60
    data_only = gc.Run.open(tmp_path / "run")  # data and files can be read without the modules
    assert torch.equal(data_only.splits.train, data.train)
    with pytest.raises(RunDirError, match="user-supplied modules"):
        gc.counterfactual(data_only, [1], "all")
    again = pickle.loads(pickle.dumps(gc.Run.open(tmp_path / "run", models=models)))
    assert torch.equal(again.splits.train, data.train)
    before = gc.counterfactual(again, [1], "all")
    assert before == gc.counterfactual(run, [1], "all")


def test_user_data_is_checked():
    with pytest.raises(gc.GancleanseError, match="sample shape"):
        gc.Splits.from_tensors(torch.zeros(10, 2), torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(gc.GancleanseError, match="NaN"):
        gc.Splits.from_tensors(torch.full((10, 2), float("nan")), torch.zeros(5, 2), torch.zeros(5, 2))

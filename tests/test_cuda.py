"""CUDA end to end: exactness, bitwise replay, agreement with the CPU, a study.

Skipped where no CUDA device is present; the same checks run on the CPU elsewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.errors import GancleanseWarning
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.training.replay import replay
from gancleanse.verify import verify_run

from conftest import tiny_config
from test_itd_exact import rel_err, unrolled_dV_dw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

ADAM = {"optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01}


def cuda_run(tmp_path, name: str = "run", **sections):
    return gc.train(tiny_config(**sections), tmp_path / name, device="cuda", progress=False)


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
def test_itd_equals_unrolled_autograd_on_cuda(tmp_path, update):
    run = cuda_run(tmp_path, train={"update": update, "ema_beta": 0.9, **ADAM})
    assert run.device.type == "cuda" and run.meta["device"] == "cuda" and run.meta["cuda"]
    assert all(t.is_cuda for t in run.final_state()["d"].values())
    expected = -unrolled_dV_dw(run, "all")
    got = itd_influence(run, make_metric("all", run), progress=False).influence
    assert expected.abs().max() > 0
    assert rel_err(got, expected) < 1e-8


def test_replay_on_cuda_is_bitwise(tmp_path):
    run = cuda_run(tmp_path, train=ADAM)
    lines = verify_run(run, report=lambda line: None)
    assert any("bitwise (device cuda" in line for line in lines)
    a, b = replay(run, run.window_start), replay(run, run.window_start)
    assert all(torch.equal(a[p][k], b[p][k]) for p in ("d", "g") for k in a[p])


def test_cpu_and_cuda_influences_agree(tmp_path):
    cpu = gc.train(tiny_config(train=ADAM), tmp_path / "run", device="cpu", progress=False)
    on_cpu = itd_influence(cpu, make_metric("all", cpu), progress=False).influence
    with pytest.warns(GancleanseWarning, match="not bitwise"):
        on_cuda_run = gc.Run.open(cpu.path, device="cuda")
    on_cuda = itd_influence(on_cuda_run, make_metric("all", on_cuda_run), progress=False).influence
    assert rel_err(on_cuda, on_cpu) < 1e-6


def test_dcgan_trains_replays_and_scores_on_cuda(tmp_path):
    cfg = Config.from_dict({
        "data": {"name": "digits", "n_train": 120, "n_valid": 100, "n_test": 100, "image_size": 28},
        "model": {"arch": "dcgan", "z_dim": 8, "g_hidden": 8, "d_hidden": 8, "activation": "sigmoid",
                  "norm": "layer", "bias": True, "dtype": "float32"},
        "train": {"epochs": 2, "batch_size": 20, "checkpoint_every": 3, **ADAM},
        "metric": {"n_samples": 100, "classifier_epochs": 2},
    })
    run = gc.train(cfg, tmp_path / "run", device="cuda", progress=False)
    assert any("bitwise (device cuda" in line for line in verify_run(run, report=lambda line: None))
    scores = gc.influence(run, "fid", "itd", check=4, progress=False)
    assert scores.influence.shape == (120,) and scores.info["check"]["k"] == 4


def test_a_study_runs_on_cuda_in_one_process(tmp_path):
    study = {"data": {"n_train": 100, "n_valid": 50, "n_test": 50},
             "model": {"activation": "elu", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
             "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.01, "lr_g": 0.01, "device": "cuda"},
             "cleanse": {"metrics": ["all"], "methods": ["itd", "random"], "removal_rates": [0.0, 0.1],
                         "seeds": [0, 1], "check": 4}}
    with pytest.warns(GancleanseWarning, match="one CUDA context"):
        summary = gc.cleanse(Config.from_dict(study), tmp_path / "study", workers=2, report=False, progress=False)
    assert summary["by_rate"]
    for seed in (0, 1):
        meta = json.loads((tmp_path / "study" / "seeds" / f"seed_{seed}" / "run" / "run.json").read_text())
        assert meta["device"] == "cuda"

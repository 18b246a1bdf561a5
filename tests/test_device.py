"""Device choice on any machine: config and CLI errors, what run.json records, the warnings."""

from __future__ import annotations

import json

import pytest
import torch

import gancleanse as gc
from gancleanse import device as devices
from gancleanse.cli import main
from gancleanse.errors import ConfigError, GancleanseWarning

from conftest import tiny_config


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "CUDA", "cuda:x", "mps"])
def test_a_device_that_is_not_one_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match=rf"train.device = '{bad}' is not one of auto, cpu, cuda, cuda:N"):
        tiny_config(train={"device": bad})


def test_run_json_records_the_device_and_a_run_reopens_on_the_chosen_one(run_factory):
    run = run_factory(train={"device": "cpu"})
    assert run.meta["device"] == "cpu" and run.meta["device_name"] and run.meta["cuda"] is None
    assert run.device == torch.device("cpu")
    assert gc.Run.open(run.path, device="cpu").device == torch.device("cpu")
    assert gc.Run.open(run.path).device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    state = run.final_state()
    assert all(t.device.type == "cpu" for p in ("d", "g") for t in state[p].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_cuda_where_there_is_none_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config().to_toml())
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda': CUDA is not available here" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    with pytest.raises(ConfigError, match="CUDA is not available"):
        gc.train(tiny_config(), tmp_path / "run", device="cuda:0", progress=False)


def test_replaying_on_another_device_kind_warns_that_it_is_not_bitwise():
    with pytest.warns(GancleanseWarning, match="trained on cuda and is replayed on cpu: .* not bitwise"):
        devices.warn_if_other_kind("cuda", torch.device("cpu"), "runs/x")


def test_local_workers_on_the_cpu_are_kept():
    assert devices.local_workers("cpu", 4, "local") == 4
    assert devices.local_workers("cpu", 1, "ray") == 1


def test_device_option_overrides_the_config_and_is_recorded(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(train={"device": "auto"}).to_toml())
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu", "-q"]) == 0
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["device"] == "cpu"
    assert 'device = "cpu"' in (tmp_path / "run" / "config.toml").read_text()
    assert main(["influence", str(tmp_path / "run"), "--device", "cpu", "--check", "0",
                 "--out", str(tmp_path / "s.csv"), "-q"]) == 0

"""Every step's state of the recorded window, kept by ``train`` by default where the states fit 2 GB: ITD then
holds one step's graph at a time and replays each step exactly once, with the influence of a run checkpointed
sparsely, bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils._pytree import tree_leaves

import gancleanse as gc
from gancleanse import run_format
from gancleanse.errors import RunDirError
from gancleanse.influence import reverse
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.run_format import check_meta_against_config, default_checkpoint_interval

from conftest import tiny_config


def test_the_default_interval_keeps_every_step_while_the_states_fit():
    assert default_checkpoint_interval(500, 430_000) == 1  # the 28x28 DCGAN over a 50k-image epoch: 0.2 GB
    assert default_checkpoint_interval(100, 10**8) == 5  # 10 GB of states: every 5th fits 2 GB
    assert default_checkpoint_interval(500, 10**8) == 25  # 50 GB: every 25th, the longest default
    assert default_checkpoint_interval(10**5, 10**9) == 25
    assert default_checkpoint_interval(100, 40_000) == 25  # a small state: its graphs are small, its load is not


@pytest.fixture
def large_states(monkeypatch):
    """The tiny runs' states (a few KB) counted as large, so that checkpoint_every's default keeps every step."""
    monkeypatch.setattr(run_format, "SMALL_STATE_BYTES", 0)


def default_run(tmp_path, name: str, **train) -> gc.Run:
    """The tiny run with checkpoint_every's default."""
    cfg = tiny_config(train=train)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=None))
    return gc.train(cfg, tmp_path / name, progress=False)


@pytest.mark.usefixtures("large_states")
@pytest.mark.parametrize("way", ["vjp", "hvp"])
def test_itd_over_every_steps_state_replays_each_step_once_and_equals_sparse_checkpoints(tmp_path, monkeypatch,
                                                                                         way):
    """By default the run keeps every step of its window (config.toml records the interval); ITD holds one step
    at a time and replays each step once (the probe that sizes its stretches is the sweep's first step), and its
    influence is bitwise that of the same training checkpointed every 4 steps."""
    run = default_run(tmp_path, "dense")
    assert run.cfg.train.checkpoint_every == 1
    assert "checkpoint_every = 1" in (run.path / "config.toml").read_text()
    assert run.checkpoint_steps == list(range(run.window_start, run.final_step + 1))
    sparse = gc.train(tiny_config(), tmp_path / "sparse", progress=False)
    assert sparse.cfg.train.checkpoint_every == 4
    assert torch.equal(run.load_state(run.final_step)["g"]["net.0.weight"],
                       sparse.load_state(sparse.final_step)["g"]["net.0.weight"])
    pass_class = reverse.VJPPass if way == "vjp" else reverse.HVPPass
    forwards: list[int] = []
    original = pass_class.forward
    monkeypatch.setattr(pass_class, "forward", lambda self, state, step: forwards.append(step) or
                        original(self, state, step))
    dense_result = itd_influence(run, make_metric("all", run), progress=False, reverse=way)
    assert dense_result.stretch == 1
    assert sorted(forwards) == list(range(run.window_start, run.final_step))  # each step once
    sparse_result = itd_influence(sparse, make_metric("all", sparse), progress=False, reverse=way)
    assert torch.equal(dense_result.influence, sparse_result.influence)


@pytest.mark.usefixtures("large_states")
def test_a_window_whose_states_do_not_fit_is_checkpointed_sparser(tmp_path, monkeypatch):
    """A budget of 2.5 states over the 12-step window: every ceil(12 / 2.5) = 5 steps (and the epoch start, 6)."""
    state_bytes = sum(t.numel() * t.element_size() for t in tree_leaves(default_run(tmp_path, "probe").load_state(0)))
    monkeypatch.setattr(run_format, "STATES_BUDGET_BYTES", int(2.5 * state_bytes))
    run = default_run(tmp_path, "run")
    assert run.cfg.train.checkpoint_every == 5
    assert json.loads((run.path / "run.json").read_text())["checkpoints"] == [0, 5, 6, 10, 12]


def test_a_run_config_without_the_interval_is_refused(tmp_path):
    run = gc.train(tiny_config(), tmp_path / "run", progress=False)
    meta = json.loads((run.path / "run.json").read_text())
    cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, checkpoint_every=None))
    with pytest.raises(RunDirError, match="config.toml has no train.checkpoint_every"):
        check_meta_against_config(meta, cfg, "RUN")

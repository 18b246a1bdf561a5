"""Resumable training: a killed ``train`` rerun with the same config continues from its last resume checkpoint and
finishes with bitwise the files of a training never stopped; another config or data is refused by name, and force
starts over."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.errors import ConfigError, RunDirError, TrainingDivergedError
from gancleanse.training import recorder
from gancleanse.training.dynamics import Dynamics
from gancleanse.training.resume import RESUME_FILE, read_header
from conftest import tiny_config

CLI = "import sys; from gancleanse.cli import main; sys.exit(main())"  # what the console script runs

# 1200 steps of a small 2D GAN (a few seconds here), with everything a resumed state must carry: Adam's moments, the
# generator average, weight decay (a sum over parameters), alternating updates (two latent batches) and a window that
# starts after several resume checkpoints.
KILLED = """
[data]
n_train = 200
n_valid = 50
n_test = 50
[model]
activation = "softplus"
g_hidden = 8
d_hidden = 8
z_dim = 3
[train]
epochs = 60
batch_size = 10
optimizer = "adam"
lr_d = 0.01
lr_g = 0.01
update = "alternating"
weight_decay_d = 0.001
ema_beta = 0.9
record_from_epoch = 50
checkpoint_every = 7
resume_every = 25
[metric]
n_samples = 40
"""


def files_of(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def assert_same_run(reference: Path, run: Path) -> None:
    """Same file list; every tensor, loss and byte alike; run.json alike but for its wall-clock times (and seal)."""
    assert files_of(run) == files_of(reference)
    for name in files_of(reference):
        if name.endswith(".safetensors"):
            want, got = load_file(str(reference / name)), load_file(str(run / name))
            assert sorted(got) == sorted(want), name
            for key in want:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), f"{name}: {key}"
        if name == "losses.jsonl":
            want_lines = (reference / name).read_text().splitlines()
            assert [json.loads(line) for line in (run / name).read_text().splitlines()] == [
                json.loads(line) for line in want_lines]
        if name != "run.json":
            assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    want, got = (json.loads((d / "run.json").read_text()) for d in (reference, run))
    assert {k: v for k, v in got.items() if k not in ("seconds", "seal")} == {
        k: v for k, v in want.items() if k not in ("seconds", "seal")}


def count_steps(monkeypatch) -> list[int]:
    """The step counts that ``Dynamics.step`` is called with, from now on."""
    taken: list[int] = []
    real = Dynamics.step

    def step(self, state, batch, weights):  # noqa: ANN001, ANN202
        taken.append(batch.count)
        return real(self, state, batch, weights)
    monkeypatch.setattr(Dynamics, "step", step)
    return taken


def interrupted_at(monkeypatch, stop: int) -> None:
    """Make the next training stop (as Ctrl-C would) right after its resume checkpoint at step ``stop``."""
    real = recorder.save_resume

    def save_then_stop(stage, state, progress, current):  # noqa: ANN001, ANN202
        real(stage, state, progress, current)
        if progress.step == stop:
            raise KeyboardInterrupt
    monkeypatch.setattr(recorder, "save_resume", save_then_stop)


def interrupt(monkeypatch, cfg: Config, out: Path, stop: int, **kwargs) -> None:
    """Train ``cfg`` at ``out`` until its resume checkpoint at ``stop``, then interrupt it: its stage is kept."""
    with monkeypatch.context() as patch:
        interrupted_at(patch, stop)
        with pytest.raises(KeyboardInterrupt):
            gc.train(cfg, out, progress=False, **kwargs)
    assert read_header(out.with_name(out.name + ".partial") / RESUME_FILE)["step"] == stop


# ---------------------------------------------------------------- killed for real, several times, through the CLI
def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def test_a_train_killed_several_times_finishes_bitwise_as_one_never_stopped(tmp_path, capsys):
    from gancleanse.cli import main

    cfg = tmp_path / "cfg.toml"
    cfg.write_text(KILLED)
    reference = tmp_path / "reference"
    gc.train(gc.load_config(cfg), reference, progress=False)
    total = json.loads((reference / "run.json").read_text())["total_steps"]
    out, stage = tmp_path / "run", tmp_path / "run.partial"
    command = [sys.executable, "-c", CLI, "train", str(cfg), "--out", str(out), "-q"]
    rng, resumed_from, first_checkpoint = random.Random(7), [0], None
    for _ in range(3):
        target = rng.randint(resumed_from[-1] + 60, resumed_from[-1] + 300)  # a random step a few resumes on
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while line_count(stage / "losses.jsonl") < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"the training ended before it was killed: {err.decode()}"
        assert not out.exists() and (stage / RESUME_FILE).is_file()
        resumed_from.append(read_header(stage / RESUME_FILE)["step"])
        if first_checkpoint is None:  # written once at step 0: a training that started over would write it again
            first_checkpoint = os.stat(stage / "checkpoints" / "step_00000000.safetensors")
    assert resumed_from == sorted(resumed_from) and 0 < resumed_from[-1] < total, resumed_from
    changed = tmp_path / "changed.toml"
    changed.write_text(KILLED.replace("lr_g = 0.01", "lr_g = 0.02"))
    capsys.readouterr()
    assert main(["train", str(changed), "--out", str(out), "-q"]) == 2  # refused, the stage left as it is
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr_g (0.01 then, 0.02 now)" in err[0] and "--force starts over" in err[0], err
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not stage.exists()
    again = os.stat(out / "checkpoints" / "step_00000000.safetensors")
    assert (again.st_ino, again.st_mtime_ns) == (first_checkpoint.st_ino, first_checkpoint.st_mtime_ns)
    assert_same_run(reference, out)
    print(f"killed at resume steps {resumed_from[1:]} of {total}")


# ---------------------------------------------------------------- every resume checkpoint, in process
def test_resuming_from_each_resume_checkpoint_gives_the_same_run(tmp_path, monkeypatch):
    # Five hidden layers: parameter names net.0 ... net.10, whose sorted order is not the module's, and weight decay
    # sums over them; resume_every unset: every epoch (6 steps).
    cfg = tiny_config(model={"layers": 5}, train={"epochs": 5, "record_from_epoch": 2, "optimizer": "momentum",
                                                  "ema_beta": 0.5, "weight_decay_d": 0.01, "weight_decay_g": 0.01})
    reference = tmp_path / "reference"
    gc.train(cfg, reference, progress=False)
    total = 30
    for stop in (6, 12, 18, 24):
        out = tmp_path / f"run{stop}"
        interrupt(monkeypatch, cfg, out, stop)
        with monkeypatch.context() as patch:
            taken = count_steps(patch)
            gc.train(cfg, out, progress=False)
        assert taken == list(range(stop, total))
        assert_same_run(reference, out)


def test_a_kill_while_writing_a_resume_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_config(train={"epochs": 4, "resume_every": 5})
    reference = tmp_path / "reference"
    gc.train(cfg, reference, progress=False)
    out = tmp_path / "run"
    interrupt(monkeypatch, cfg, out, 10)
    stage = tmp_path / "run.partial"
    half = (stage / RESUME_FILE).read_bytes()[:100]  # what a kill during the next one's write leaves beside it
    (stage / f".{RESUME_FILE}.0123456789ab.tmp").write_bytes(half)
    with monkeypatch.context() as patch:
        taken = count_steps(patch)
        gc.train(cfg, out, progress=False)
    assert taken[0] == 10
    assert_same_run(reference, out)


# ---------------------------------------------------------------- refusals and force
def test_a_changed_config_or_data_is_refused_by_name_and_force_starts_over(tmp_path, monkeypatch):
    cfg = tiny_config(train={"epochs": 3})
    out, stage = tmp_path / "run", tmp_path / "run.partial"
    interrupt(monkeypatch, cfg, out, 6)
    kept = (stage / RESUME_FILE).read_bytes()
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_d=0.01))
    with pytest.raises(ConfigError, match=r"train\.lr_d \(0\.05 then, 0\.01 now\).*--force starts over"):
        gc.train(changed, out, progress=False)
    other_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=4))
    with pytest.raises(ConfigError, match=r"data\.seed"):
        gc.train(other_data, out, progress=False)
    assert (stage / RESUME_FILE).read_bytes() == kept and not out.exists()  # a refusal leaves the stage alone
    with monkeypatch.context() as patch:
        taken = count_steps(patch)
        gc.train(changed, out, force=True, progress=False)
    assert taken == list(range(18)) and not stage.exists()
    reference = tmp_path / "reference"
    gc.train(changed, reference, progress=False)
    assert_same_run(reference, out)


def test_user_data_that_changed_is_refused(tmp_path, monkeypatch):
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = tiny_config(train={"epochs": 3})
    out = tmp_path / "run"
    interrupt(monkeypatch, cfg, out, 6, data=gc.Splits.from_tensors(x[:60], x[60:80], x[80:]))
    moved = x.clone()
    moved[0, 0] += 1.0
    with pytest.raises(ConfigError, match="differs in the data:"):
        gc.train(cfg, out, data=gc.Splits.from_tensors(moved[:60], moved[60:80], moved[80:]), progress=False)


def test_a_setting_that_does_not_shape_the_training_resumes(tmp_path, monkeypatch):
    cfg = tiny_config(train={"epochs": 3, "resume_every": 3})
    out = tmp_path / "run"
    interrupt(monkeypatch, cfg, out, 9)
    later = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume_every=4),
                                cleanse=dataclasses.replace(cfg.cleanse, removal_rates=[0.0, 0.2]))
    with monkeypatch.context() as patch:
        taken = count_steps(patch)
        gc.train(later, out, progress=False)
    assert taken[0] == 9
    reference = tmp_path / "reference"
    gc.train(later, reference, progress=False)
    assert_same_run(reference, out)  # config.toml included: the run records the config that finished it


def test_force_replaces_a_finished_run_and_discards_a_stale_partial(tmp_path, monkeypatch):
    cfg = tiny_config(train={"epochs": 3})
    out = tmp_path / "run"
    gc.train(cfg, out, progress=False)
    interrupt(monkeypatch, cfg, out, 6, force=True)  # a replacement killed part-way
    with pytest.raises(RunDirError, match="already exists"):
        gc.train(cfg, out, progress=False)
    with monkeypatch.context() as patch:
        taken = count_steps(patch)
        gc.train(cfg, out, force=True, progress=False)
    assert taken == list(range(18)) and not (tmp_path / "run.partial").exists()


def test_a_diverged_training_leaves_no_partial_though_it_wrote_resume_checkpoints(tmp_path, monkeypatch):
    cfg = tiny_config(model={"activation": "elu"}, train={"lr_d": 1e30, "lr_g": 1e30, "epochs": 3, "resume_every": 1})
    written: list[int] = []
    real = recorder.save_resume

    def save(stage, state, progress, current):  # noqa: ANN001, ANN202
        written.append(progress.step)
        real(stage, state, progress, current)
    monkeypatch.setattr(recorder, "save_resume", save)
    with pytest.raises(TrainingDivergedError):
        gc.train(cfg, tmp_path / "run", progress=False)
    assert written and list(tmp_path.iterdir()) == []  # resuming would only diverge again


# ---------------------------------------------------------------- a study resumes its replicate's training
def test_a_study_interrupted_during_a_training_resumes_it(tmp_path, monkeypatch):
    from gancleanse.study.cleanse import train_and_score

    cfg = tiny_config(train={"epochs": 4}, cleanse={"check": 0})
    seed_dir = tmp_path / "seed_0"
    interrupt(monkeypatch, cfg, seed_dir / "run", 12)
    with monkeypatch.context() as patch:
        taken = count_steps(patch)
        run = train_and_score(cfg, seed_dir, 0, scorers=[])
    assert taken == list(range(12, 24))
    reference = tmp_path / "reference"
    gc.train(cfg, reference, progress=False)
    assert run.path == seed_dir / "run"
    assert_same_run(reference, seed_dir / "run")

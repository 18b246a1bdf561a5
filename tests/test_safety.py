"""No user data lost, nothing non-finite written, parts never reused across runs, no code
loaded from a run directory's own say-so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.errors import ConfigError, NonFiniteError, RunDirError
from gancleanse.metrics import make_metric

from conftest import tiny_config, train_toml

SMALL = """
[data]
n_train = 40
n_valid = 20
n_test = 20
[model]
activation = "softplus"
g_hidden = 6
d_hidden = 6
z_dim = 2
[train]
epochs = 2
batch_size = 10
lr_d = 0.05
lr_g = 0.05
record_from_epoch = 1
[metric]
n_samples = 20
"""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(SMALL)
    return p


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gancleanse: error:") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ---------------------------------------------------------------------- --force
def test_force_never_replaces_a_users_directory(cfg_file, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    assert main(["train", str(cfg_file), "--out", str(mine), "--force", "-q"]) == 2
    one_line_error(capsys, str(mine), "not a gancleanse run directory")
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    assert not (tmp_path / "photos.partial").exists()


def test_force_never_replaces_a_file(cfg_file, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(["train", str(cfg_file), "--out", str(f), "--force", "-q"]) == 2
    one_line_error(capsys, "not a directory")
    assert f.read_text() == "keep me"


def test_force_replaces_a_run_directory(cfg_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(cfg_file), "--out", str(out), "-q"]) == 0
    first = json.loads((out / "run.json").read_text())["files"]
    assert main(["train", str(cfg_file), "--out", str(out), "-q"]) == 2
    one_line_error(capsys, "already exists")
    assert main(["train", str(cfg_file), "--out", str(out), "--force", "-q"]) == 0
    assert json.loads((out / "run.json").read_text())["files"] == first  # deterministic: the same bytes
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / ".run.lock").exists()
    assert not (out / ".gancleanse-stage").exists()


def test_a_foreign_partial_directory_is_left_alone(cfg_file, tmp_path, capsys):
    foreign = tmp_path / "run.partial"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("draft")
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "run"), "-q"]) == 2
    one_line_error(capsys, "run.partial", "not left by gancleanse")
    assert (foreign / "thesis.tex").read_text() == "draft"


def test_a_dead_writers_stage_is_taken_over(cfg_file, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stage = tmp_path / "run.partial"
    stage.mkdir()
    (stage / "half_written.safetensors").write_bytes(b"x")
    (stage / ".gancleanse-stage").write_text(dead.stdout)
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert not stage.exists() and not (tmp_path / "run" / "half_written.safetensors").exists()
    assert not (tmp_path / ".run.lock").exists()
    gc.Run.open(tmp_path / "run")


def test_a_failed_training_leaves_nothing(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(SMALL.replace("lr_d = 0.05", "lr_d = 1e30"))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 2
    one_line_error(capsys, "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # no stage, no lock


# ----------------------------------------------------------------------- --out
@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    return train_toml(tmp_path_factory.mktemp("safety"), SMALL)


@pytest.mark.parametrize("command, name, words", [
    ("influence", "scores.json", "must end in .csv"),
    ("influence", "scores", "must end in .csv"),
    ("validate", "valid.csv", "must end in .json"),
])
def test_out_must_have_its_suffix(small_run, tmp_path, capsys, command, name, words):
    out = tmp_path / name
    args = [command, str(small_run), "--out", str(out), "-q"] + (["--instances", "2"] if command == "validate" else [])
    assert main(args) == 2
    one_line_error(capsys, words)
    assert list(tmp_path.iterdir()) == []


def test_out_never_overwrites_without_force(small_run, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    out.write_text("my spreadsheet")
    assert main(["influence", str(small_run), "--out", str(out), "-q"]) == 2
    one_line_error(capsys, "exists", "--force")
    assert out.read_text() == "my spreadsheet"
    assert main(["influence", str(small_run), "--out", str(out), "--force", "-q"]) == 0
    assert out.read_text().startswith("index,influence,harmfulness,key")


def test_out_naming_a_directory_is_refused(small_run, tmp_path, capsys):
    d = tmp_path / "dir.csv"
    d.mkdir()
    assert main(["influence", str(small_run), "--out", str(d), "--force", "-q"]) == 2
    one_line_error(capsys, "is a directory")


@pytest.mark.parametrize("top", ["0", "-3", "many"])
def test_top_must_be_positive(small_run, tmp_path, top):
    with pytest.raises(SystemExit) as e:  # argparse: usage line and exit 2
        main(["influence", str(small_run), "--out", str(tmp_path / "s.csv"), "--top", top])
    assert e.value.code == 2
    assert not (tmp_path / "s.csv").exists()


# ------------------------------------------------------------------ non-finite
def test_aid_damping_nan_is_refused(small_run, tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["influence", str(small_run), "--method", "aid", "--aid-damping", "nan", "--out", str(out), "-q"]) == 2
    one_line_error(capsys, "--aid-damping")
    assert not out.exists()


def test_a_nan_influence_vector_is_never_written(small_run, tmp_path, capsys, monkeypatch):
    from gancleanse.influence import itd

    real = itd.itd_influence

    def poisoned(run, metric, **kw):  # noqa: ANN001, ANN003
        res = real(run, metric, **kw)
        res.influence[3] = float("nan")
        return res

    monkeypatch.setattr(itd, "itd_influence", poisoned)
    out = tmp_path / "s.csv"
    assert main(["influence", str(small_run), "--out", str(out), "-q"]) == 2
    one_line_error(capsys, "non-finite", "instances [3]")
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_a_nan_metric_value_is_an_error(small_run, monkeypatch):
    from gancleanse.metrics import all_kde

    monkeypatch.setattr("gancleanse.metrics.average_log_likelihood", lambda *a: torch.tensor(float("nan")))
    assert all_kde  # the module the metric normally uses
    with pytest.raises(NonFiniteError, match="metric all on the valid split"):
        gc.counterfactual(small_run, [0], "all")


# --------------------------------------------------------- parts belong to their run
def test_validation_parts_of_another_run_are_not_reused(tmp_path):
    a = gc.train(tiny_config(train={"seed": 1}), tmp_path / "a", progress=False)
    b = gc.train(tiny_config(train={"seed": 2}), tmp_path / "b", progress=False)
    out = tmp_path / "valid.json"
    res_a = gc.validate(a, "all", "itd", 3, seed=0, out=out, progress=False)
    res_b = gc.validate(b, "all", "itd", 3, seed=0, out=out, progress=False)
    fresh_b = gc.validate(b, "all", "itd", 3, seed=0, progress=False)  # no stored parts at all
    assert res_b["instances"] == res_a["instances"]
    assert res_b["actual"] == fresh_b["actual"] and res_b["actual"] != res_a["actual"]
    for f in out.with_suffix(".parts").glob("*.json"):
        assert json.loads(f.read_text())["run_id"] == b.id


def test_a_damaged_validation_part_is_refused_by_name(tmp_path):
    run = gc.train(tiny_config(), tmp_path / "run", progress=False)
    out = tmp_path / "valid.json"
    gc.validate(run, "all", "itd", 2, out=out, progress=False)
    part = sorted(out.with_suffix(".parts").glob("*.json"))[0]
    rec = json.loads(part.read_text())
    part.write_text(json.dumps({**rec, "delta": float("nan")}))
    with pytest.raises(gc.GancleanseError, match=part.name):
        gc.validate(run, "all", "itd", 2, out=out, progress=False)


# ------------------------------------------------------------------- extractors
class Features(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4].repeat(1, 2)


def test_an_extractor_is_never_loaded_from_a_run_directory(tmp_path, monkeypatch, capsys):
    ext = tmp_path / "features.pt"
    torch.jit.script(Features()).save(str(ext))
    cfg = gc.Config.from_dict({
        "data": {"name": "digits", "n_train": 40, "n_valid": 20, "n_test": 20},
        "model": {"arch": "dcgan", "z_dim": 4, "g_hidden": 4, "d_hidden": 4},
        "train": {"epochs": 1, "batch_size": 10},
        "metric": {"extractor": str(ext), "n_samples": 20}})
    run = gc.train(cfg, tmp_path / "run", progress=False)  # the user's own config: explicit
    explicit = make_metric("fid", run, "valid").value(run.final_state())

    loads: list[str] = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(str(a[0])) or real_load(*a, **k))
    reopened = gc.Run.open(tmp_path / "run")
    with pytest.raises(ConfigError, match="runs code"):
        make_metric("fid", reopened, "valid")
    out = tmp_path / "s.csv"
    assert main(["influence", str(tmp_path / "run"), "--metric", "fid", "--out", str(out), "-q"]) == 2
    one_line_error(capsys, "--extractor")
    assert loads == [] and not out.exists()
    named = gc.Run.open(tmp_path / "run", extractor=ext)
    assert make_metric("fid", named, "valid").value(named.final_state()) == explicit
    assert loads == [str(ext)]


# ---------------------------------------------------------------------- studies
STUDY = SMALL + """
[cleanse]
methods = ["itd", "random"]
removal_rates = [0.0, 0.1]
check = 4
seeds = [0, 1]
"""


def test_study_refuses_a_users_directory_before_writing(tmp_path, capsys):
    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# my own\n")
    assert main(["cleanse", str(cfg), "--out", str(mine), "-q", "--no-report"]) == 2
    one_line_error(capsys, "not a gancleanse study")
    assert sorted(p.name for p in mine.iterdir()) == ["config.toml"]
    assert (mine / "config.toml").read_text() == "# my own\n"


def test_study_rejects_an_invalid_config_before_writing(tmp_path, capsys):
    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY.replace('methods = ["itd", "random"]', 'methods = ["itd"]\nmetrics = ["fid"]'))
    out = tmp_path / "study"
    assert main(["cleanse", str(cfg), "--out", str(out), "-q"]) == 2
    one_line_error(capsys, "fid")
    assert not out.exists()


def test_study_parts_of_a_retrained_replicate_are_not_reused(tmp_path):
    cfg = gc.Config.from_dict({**_toml(STUDY), "cleanse": {**_toml(STUDY)["cleanse"], "seeds": [0]}})
    out = tmp_path / "study"
    first = gc.cleanse(cfg, out, report=False, progress=False)
    part = out / "parts" / "seed0_itd-all_r0.1.json"
    rec = json.loads(part.read_text())
    assert rec["provenance"]["run_id"] == gc.Run.open(out / "seeds" / "seed_0" / "run").id
    assert main(["verify", str(out), "--no-replay", "-q"]) == 0
    # A stored retrain that claims another run is recomputed, not reported (verify names it).
    part.write_text(json.dumps({**rec, "all": {"test": 123.0, "valid": 456.0},
                                "provenance": {**rec["provenance"], "run_id": "0" * 64}}))
    assert main(["verify", str(out), "--no-replay", "-q"]) == 2
    again = gc.cleanse(cfg, out, report=False, progress=False)
    assert again == first
    assert json.loads(part.read_text()) == rec
    # A damaged one is refused by name.
    part.write_text("{\"all\": {\"test\": NaN")
    with pytest.raises(gc.GancleanseError, match=part.name):
        gc.cleanse(cfg, out, report=False, progress=False)
    part.write_text(json.dumps(rec))
    # The same for a replicate's trust check: verify names it, a resumed study recomputes it.
    check = out / "seeds" / "seed_0" / "check.json"
    stored = json.loads(check.read_text())
    check.write_text(json.dumps({**stored, "run_id": "0" * 64}))
    assert main(["verify", str(out), "--no-replay", "-q"]) == 2
    gc.cleanse(cfg, out, report=False, progress=False)
    again_check = json.loads(check.read_text())
    assert again_check["run_id"] == stored["run_id"] and again_check["checks"].keys() == stored["checks"].keys()
    timing = {"seconds": 0.0, "cost_epochs": 0.0}  # the only fields that differ between two computations
    for k, v in stored["checks"].items():
        assert {**again_check["checks"][k], **timing} == {**v, **timing}


def _toml(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


def test_scores_json_names_the_run(small_run, tmp_path):
    out = tmp_path / "s.csv"
    assert main(["influence", str(small_run), "--out", str(out), "-q"]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["run_id"] == gc.Run.open(small_run).id
    assert np.isfinite([float(r.split(",")[1]) for r in out.read_text().splitlines()[1:]]).all()


def test_unreadable_run_file_is_one_line(small_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "schedule.safetensors").unlink()
    (run / "schedule.safetensors").mkdir()  # unreadable as a file, whoever runs the tests
    assert main(["influence", str(run), "--out", str(tmp_path / "s.csv"), "-q"]) == 2
    one_line_error(capsys, "schedule.safetensors")
    with pytest.raises(RunDirError, match="schedule.safetensors"):
        gc.Run.open(run)._schedule


def test_export_refuses_scores_of_an_earlier_training(cfg_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cfg_file), "--out", str(run), "-q"]) == 0
    assert main(["influence", str(run), "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    assert main(["train", str(cfg_file), "--out", str(run), "--force", "-q"]) == 0  # a new training, same path
    capsys.readouterr()
    assert main(["export", str(tmp_path / "s.csv"), "--count", "2", "--out", str(tmp_path / "clean")]) == 2
    one_line_error(capsys, "another training")
    assert not (tmp_path / "clean").exists()


def test_a_second_writer_of_a_study_is_refused_by_name(tmp_path, capsys):
    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY)
    out = tmp_path / "study"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                               "started": "now", "command": "gancleanse cleanse"}))
        assert main(["cleanse", str(cfg), "--out", str(out), "-q", "--no-report"]) == 2
        one_line_error(capsys, str(holder.pid), str(out))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert main(["cleanse", str(cfg), "--out", str(out), "-q", "--no-report"]) == 0  # stale: taken over
    assert not (out / ".lock").exists()


def test_a_second_writer_of_a_run_is_refused_by_name(cfg_file, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".run.lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        assert main(["train", str(cfg_file), "--out", str(tmp_path / "run"), "-q"]) == 2
        one_line_error(capsys, f"process {holder.pid}")
        assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    finally:
        holder.kill()
        holder.wait()

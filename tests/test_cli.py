"""The command line end to end, including bad inputs: clear errors, exit 2, nothing half-written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from gancleanse.cli import main

SMALL = """
[data]
n_train = 80
n_valid = 40
n_test = 40
[model]
activation = "elu"
g_hidden = 8
d_hidden = 8
[train]
epochs = 2
batch_size = 20
lr_d = 0.01
lr_g = 0.01
record_from_epoch = 0
"""


def gancleanse(*args):
    """Run the installed console script as a user would."""
    exe = [sys.executable, "-m", "gancleanse.cli"]
    return subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "small.toml"
    cfg.write_text(SMALL)
    assert main(["train", str(cfg), "--out", str(d / "run"), "-q"]) == 0
    return d


def read_scores(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    numeric = 3 if rows[0][-1] == "key" else len(rows[0])  # SCORES.csv ends with the instance key
    return rows[0], np.array([[float(v) for v in r[:numeric]] for r in rows[1:]])


def test_influence_csv_contract(trained, capsys):
    out = trained / "scores.csv"
    assert main(["influence", str(trained / "run"), "--metric", "loss_d", "--method", "itd",
                 "--out", str(out), "--top", "3", "-q"]) == 0
    header, rows = read_scores(out)
    assert header == ["index", "influence", "harmfulness", "key"]
    assert rows.shape == (80, 3)
    with open(out) as f:
        assert [r[3] for r in csv.reader(f)][1:] == [f"#{i}" for i in range(80)]  # 2D points have no file
    assert (rows[:, 0] == np.arange(80)).all()
    np.testing.assert_array_equal(rows[:, 2], -rows[:, 1])  # loss_d: lower is better
    info = json.loads((trained / "scores.json").read_text())
    assert info["metric"] == "loss_d" and info["n_train"] == 80
    printed = capsys.readouterr().out
    top = int(np.argmax(rows[:, 2]))
    assert f"{top:>7}" in printed.splitlines()[2]


def test_influence_horizons_file(trained):
    out = trained / "h.csv"
    assert main(["influence", str(trained / "run"), "--metric", "all", "--out", str(out),
                 "--horizons", "-q"]) == 0
    header, rows = read_scores(trained / "h.horizons.csv")
    assert header == ["index", "epochs_traced", "influence", "harmfulness"]
    _, main_rows = read_scores(out)
    k2 = rows[rows[:, 1] == 2]
    np.testing.assert_array_equal(k2[:, 2], main_rows[:, 1])  # tracing the whole window
    assert set(rows[:, 1]) == {1.0, 2.0}


def test_counterfactual_prints_one_json_object(trained):
    r = gancleanse("counterfactual", trained / "run", "--remove", "1,5", "--metric", "all", "-q")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["removed"] == [1, 5] and obj["metric"] == "all"
    assert obj["delta"] == obj["after"] - obj["before"] and obj["delta"] != 0


@pytest.mark.parametrize("args,needle", [
    (["counterfactual", "{run}", "--remove", "3,80"], "index out of range: [80]"),
    (["counterfactual", "{run}", "--remove", "3,x"], "comma-separated integers"),
    (["counterfactual", "{run}", "--remove", "3", "--from-epoch", "7"], "outside the recorded window"),
    (["influence", "{missing}", "--out", "{tmp}/s.csv"], "run directory not found"),
    (["train", "{missing}.toml", "--out", "{tmp}/x"], "config file not found"),
])
def test_bad_inputs_are_clear_errors(trained, tmp_path, args, needle):
    fmt = {"run": trained / "run", "missing": tmp_path / "nope", "tmp": tmp_path}
    r = gancleanse(*[a.format(**fmt) for a in args])
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_key_leaves_nothing(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(SMALL.replace("epochs = 2", "epochs = 2\nlearning_rate = 3"))
    r = gancleanse("train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and "unknown key train.learning_rate" in r.stderr and str(cfg) in r.stderr
    assert list(tmp_path.iterdir()) == [cfg]


def test_divergence_is_reported_and_leaves_nothing(tmp_path):
    cfg = tmp_path / "diverge.toml"
    cfg.write_text(SMALL.replace("lr_d = 0.01", "lr_d = 1e6").replace('"elu"', '"relu"')
                   + 'loss = "wasserstein"\n')
    r = gancleanse("train", cfg, "--out", tmp_path / "run", "-q")
    assert r.returncode == 2, r.stderr
    assert "non-finite value" in r.stderr and "at step" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverge.toml"]


def test_existing_output_is_not_overwritten_without_force(trained):
    r = gancleanse("train", trained / "small.toml", "--out", trained / "run")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_interrupted_run_is_not_mistaken_for_finished(trained, tmp_path):
    import shutil

    partial = tmp_path / "run.partial"
    shutil.copytree(trained / "run", partial)
    r = gancleanse("influence", tmp_path / "run", "--out", tmp_path / "s.csv")
    assert r.returncode == 2 and "did not finish" in r.stderr
    meta = json.loads((partial / "run.json").read_text())
    meta["status"] = "running"
    (partial / "run.json").write_text(json.dumps(meta))
    r = gancleanse("influence", partial, "--out", tmp_path / "s.csv")
    assert r.returncode == 2 and "not complete" in r.stderr


def test_itd_memory_budget_option(trained, capsys):
    """--memory-gb bounds the graphs held at once without changing a score; it is ITD's alone."""
    whole, split = trained / "whole.csv", trained / "split.csv"
    assert main(["influence", str(trained / "run"), "--out", str(whole), "--check", "0", "-q"]) == 0
    per_step = json.loads(whole.with_suffix(".json").read_text())["graph_gb_per_step"]
    assert main(["influence", str(trained / "run"), "--out", str(split), "--check", "0", "-q",
                 "--memory-gb", str(0.5 * per_step)]) == 0
    assert json.loads(split.with_suffix(".json").read_text())["steps_per_stretch"] == 1
    np.testing.assert_array_equal(read_scores(split)[1], read_scores(whole)[1])
    assert main(["influence", str(trained / "run"), "--method", "aid", "--memory-gb", "1",
                 "--out", str(trained / "aid.csv"), "-q"]) == 2
    assert "--memory-gb applies to --method itd" in capsys.readouterr().err
    assert main(["influence", str(trained / "run"), "--memory-gb", "0", "--check", "0",
                 "--out", str(trained / "zero.csv"), "-q"]) == 2
    assert "memory_gb must be a positive number" in capsys.readouterr().err

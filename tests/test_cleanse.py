"""The cleansing study end to end: consistent tables, exact zero at rate 0, direction, resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import gancleanse as gc
from gancleanse.api import Scores
from gancleanse.config import Config
from gancleanse.metrics import make_metric
from gancleanse.study.tables import read_results, summarize

STUDY = {
    "data": {"n_train": 200, "n_valid": 100, "n_test": 100},
    "model": {"activation": "elu", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
    "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.01, "lr_g": 0.01},
    "cleanse": {"metrics": ["all", "loss_d"], "methods": ["itd", "random", "isolation_forest", "knn_density",
                                                          "discriminator"],
                "removal_rates": [0.0, 0.1], "seeds": [0, 1]},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    summary = gc.cleanse(Config.from_dict(STUDY), out, report=False, progress=False)
    return out, summary


def test_tables_are_consistent(study):
    out, summary = study
    rows = read_results(out / "results.csv")
    with open(out / "results.csv") as f:
        header = next(csv.reader(f))
    assert header[:9] == ["seed", "method", "score_metric", "eval_metric", "removal_rate", "n_removed",
                          "before", "after", "delta"]
    scorers = {(r["method"], r["score_metric"]) for r in rows}
    assert scorers == {("itd", "all"), ("itd", "loss_d"), ("random", "none"), ("isolation_forest", "raw"),
                       ("knn_density", "raw"), ("discriminator", "none")}
    assert len(rows) == 2 * 6 * 2 * 2  # seeds x scorers x rates x eval metrics
    for r in rows:
        assert r["delta"] == r["after"] - r["before"]
        assert r["n_removed"] == int(200 * r["removal_rate"])
        if r["removal_rate"] == 0.0:
            assert r["delta"] == 0.0 and r["valid_delta"] == 0.0  # a real replay, bitwise equal
    # "before" is the original run's own test metric
    for seed in (0, 1):
        run = gc.Run.open(out / "seeds" / f"seed_{seed}" / "run")
        for m in ("all", "loss_d"):
            expected = make_metric(m, run, "test").value(run.final_state())
            assert {r["before"] for r in rows if r["seed"] == seed and r["eval_metric"] == m} == {expected}
    stored = json.loads((out / "summary.json").read_text())
    assert summarize(rows) == {k: v for k, v in stored.items() if k != "checks"}
    assert summary == json.loads((out / "summary.json").read_text())
    by_rate = [r for r in summary["by_rate"] if r["removal_rate"] == 0.1 and r["method"] == "itd"]
    for r in by_rate:
        deltas = [x["delta"] for x in rows if x["method"] == "itd" and x["score_metric"] == r["score_metric"]
                  and x["eval_metric"] == r["eval_metric"] and x["removal_rate"] == 0.1]
        assert r["mean_delta"] == pytest.approx(np.mean(deltas), rel=1e-12)


def test_removed_instances_are_the_most_harmful(study):
    out, _ = study
    run = gc.Run.open(out / "seeds" / "seed_1" / "run")
    scores = gc.influence(run, "loss_d", "itd", check=0, progress=False)
    removed = scores.removal(0.1)
    assert len(removed) == 20
    # loss_d is lower-is-better: the removed ones have the most negative predicted change
    assert set(removed) == set(np.argsort(scores.influence)[:20].tolist())
    part = json.loads((out / "parts" / "seed1_itd-loss_d_r0.1.json").read_text())
    expected = gc.api.counterfactual(run, removed, "loss_d", split="test")["after"]
    assert part["loss_d"]["test"] == expected


@pytest.mark.parametrize("metric,higher", [("all", True), ("is", True), ("log_is", True),
                                           ("fid", False), ("kid", False), ("loss_d", False)])
def test_harmful_first_follows_the_metric_direction(metric, higher):
    infl = np.array([0.3, -2.0, 1.5, 0.0, -0.1])
    s = Scores.from_influence(metric, "itd", infl)
    first = s.most_harmful(2)
    assert first == ([2, 0] if higher else [1, 4])
    assert s.removal(0.4) == first


def test_study_resumes_without_redoing_work(study):
    out, summary = study
    stored = [*(out / "parts").glob("*.json"), *(out / "seeds").glob("seed_*/check.json")]
    assert len(stored) > 2 * 6 and (out / "seeds" / "seed_0" / "check.json") in stored
    stamps = {p: p.stat().st_mtime_ns for p in stored}
    again = gc.cleanse(Config.from_dict(STUDY), out, report=False, progress=False)
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in stored} == stamps
    changed = json.loads(json.dumps(STUDY))
    changed["train"]["epochs"] = 3
    with pytest.raises(gc.GancleanseError, match="different config"):
        gc.cleanse(Config.from_dict(changed), out, report=False, progress=False)


def test_aid_in_a_study_uses_the_cleanse_solver_settings(tmp_path):
    study = {**STUDY, "cleanse": {"metrics": ["all"], "methods": ["aid"], "removal_rates": [0.0, 0.1], "seeds": [0],
                                  "aid_solver": "cg", "aid_iterations": 3, "aid_operator_size": 50,
                                  "aid_damping": 0.0}}
    with pytest.warns(UserWarning, match="AID \\(1 solve\\) stopped above its tolerance"):
        gc.cleanse(Config.from_dict(study), tmp_path, report=False, progress=False)
    info = json.loads((tmp_path / "seeds" / "seed_0" / "scores" / "aid-all.json").read_text())
    assert (info["solver"], info["iterations"], info["operator_size"]) == ("cg", 3, 50)
    rows = read_results(tmp_path / "results.csv")
    assert [(r["method"], r["n_removed"]) for r in rows] == [("aid", 0), ("aid", 20)]


def test_every_scorer_is_trust_checked_per_seed(study):
    from scipy.stats import kendalltau

    out, summary = study
    checks = {(c["method"], c["score_metric"]): c for c in summary["checks"]}
    assert set(checks) == {("itd", "all"), ("itd", "loss_d"), ("random", "none"), ("isolation_forest", "raw"),
                           ("knn_density", "raw"), ("discriminator", "none")}
    assert checks[("itd", "loss_d")]["check_metric"] == "loss_d"
    assert checks[("knn_density", "raw")]["check_metric"] == "all"  # baselines: the study's first metric
    for seed in (0, 1):
        rec = json.loads((out / "seeds" / f"seed_{seed}" / "check.json").read_text())
        run = gc.Run.open(out / "seeds" / f"seed_{seed}" / "run")
        assert rec["run_id"] == run.id and rec["k"] == 32
        for name, c in rec["checks"].items():
            method, variant = name.split("-", 1)
            harm = Scores.load(out / "seeds" / f"seed_{seed}" / "scores" / f"{name}.csv").harmfulness
            assert c["harmfulness"] == [float(harm[j]) for j in c["instances"]]
            sign = 1.0 if c["metric"] in ("all", "is", "log_is") else -1.0
            tau = kendalltau(c["harmfulness"], [sign * a for a in c["actual"]]).statistic
            assert c["kendall_tau"] == pytest.approx(tau, abs=1e-12)
            row = checks[(method, variant)]
            assert row["kendall_tau"][row["seeds"].index(seed)] == c["kendall_tau"]
    # an actual change is the single-removal retrain's change of the validation metric
    c = json.loads((out / "seeds" / "seed_1" / "check.json").read_text())["checks"]["itd-loss_d"]
    run = gc.Run.open(out / "seeds" / "seed_1" / "run")
    j = c["instances"][0]
    assert c["actual"][0] == pytest.approx(gc.counterfactual(run, [j], "loss_d")["delta"], rel=1e-9, abs=1e-15)


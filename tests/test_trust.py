"""The trust check: its retrains, its statistics recomputed from its own lists, its warnings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kendalltau, pearsonr

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.config import DEFAULT_CHECK, Config
from gancleanse.errors import ConfigError, GancleanseError
from gancleanse.scores import Scores
from gancleanse.study import trust
from gancleanse.study.validate import choose_instances


def test_check_statistics_equal_a_recomputation_from_its_own_lists(run_factory):
    run = run_factory()
    s = gc.influence(run, "all", "itd", check=12, seed=5, progress=False)
    c = s.info["check"]
    assert c["k"] == 12 and c["seed"] == 5 and c["metric"] == "all" and c["method"] == "itd"
    assert c["instances"] == choose_instances(s.harmfulness, 12, 5, extremes=True)
    order = np.argsort(s.harmfulness, kind="stable")
    assert {*order[:3].tolist(), *order[-3:].tolist()} <= set(c["instances"])  # the extremes are in
    assert c["harmfulness"] == [float(s.harmfulness[j]) for j in c["instances"]]
    # "all" is higher-is-better: the benefit of removal is the change itself
    assert c["kendall_tau"] == pytest.approx(kendalltau(c["harmfulness"], c["actual"]).statistic, abs=1e-12)
    assert c["pearson"] == pytest.approx(pearsonr(c["harmfulness"], c["actual"]).statistic, abs=1e-12)
    lo, hi = c["kendall_tau_interval"]
    assert -1.0 <= lo <= hi <= 1.0 and c["confidence"] == 0.9
    assert c["trusted"] == (lo >= trust.TRUST_THRESHOLD)
    assert c["retrains"] == 12 and c["seconds"] > 0 and c["cost_epochs"] > 0
    # each actual change is the counterfactual retrain's change (vmapped: equal to rounding)
    for j, a in list(zip(c["instances"], c["actual"]))[:3]:
        assert a == pytest.approx(gc.counterfactual(run, [j], "all")["delta"], rel=1e-9, abs=1e-14)
    again = gc.influence(run, "all", "itd", check=12, seed=5, progress=False).info["check"]
    assert again["actual"] == c["actual"] and again["kendall_tau_interval"] == c["kendall_tau_interval"]
    other = gc.influence(run, "all", "itd", check=12, seed=6, progress=False).info["check"]
    assert other["instances"] != c["instances"]  # the random half follows the seed


def test_lower_is_better_metrics_compare_with_the_improvement(run_factory):
    run = run_factory()
    c = gc.influence(run, "loss_d", "itd", check=10, progress=False).info["check"]
    benefit = [-a for a in c["actual"]]
    assert c["kendall_tau"] == pytest.approx(kendalltau(c["harmfulness"], benefit).statistic, abs=1e-12)


def test_a_reversed_ranking_is_flagged_with_what_to_try(run_factory):
    run = run_factory()
    s = gc.influence(run, "all", "itd", check=0, progress=False)
    reversed_ = Scores("all", "itd", -s.influence, -s.harmfulness)
    good, bad = trust.trust_checks(run, [s, reversed_], ["all", "all"], 16)
    assert bad["kendall_tau"] == pytest.approx(-good["kendall_tau"], abs=1e-12)  # same instances, same retrains
    assert not bad["trusted"] and bad["kendall_tau_interval"][0] < trust.TRUST_THRESHOLD
    text = trust.warning_text(bad)
    assert "agrees weakly with retraining" in text and "softplus" in text and "--check" in text
    for baseline in ("random", "isolation_forest", "knn_density", "discriminator"):  # a reference, not a claim
        assert trust.warning_text({**bad, "method": baseline}) is None


def test_cli_writes_the_check_and_warns_in_one_line(tmp_path, run_factory, monkeypatch, capsys):
    run = run_factory()
    out = tmp_path / "s.csv"
    assert main(["influence", str(run.path), "--out", str(out), "--check", "8", "-q"]) == 0
    err = capsys.readouterr().err
    assert "trust check of itd on all (8 retrains;" in err and "training epochs" in err
    check = json.loads(out.with_suffix(".json").read_text())["check"]
    assert check["k"] == 8 and len(check["actual"]) == 8
    monkeypatch.setattr(trust, "TRUST_THRESHOLD", 1.01)  # nothing can pass: the warning path
    assert main(["influence", str(run.path), "--out", str(out), "--force", "--check", "8", "-q"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gancleanse: warning:")]
    assert len(lines) == 1 and "itd ranking on all agrees weakly" in lines[0]
    assert json.loads(out.with_suffix(".json").read_text())["check"]["trusted"] is False
    assert main(["influence", str(run.path), "--out", str(out), "--force", "--check", "0", "-q"]) == 0
    assert "check" not in json.loads(out.with_suffix(".json").read_text())


def test_default_cli_check_is_32_or_the_training_size(tmp_path, run_factory):
    run = run_factory(data={"n_train": 20})
    out = tmp_path / "s.csv"
    assert main(["influence", str(run.path), "--method", "random", "--out", str(out), "-q"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["check"]["k"] == 20


@pytest.mark.parametrize("k", [1, -1, 61])
def test_bad_check_sizes_are_refused_before_scoring(run_factory, tmp_path, k):
    run = run_factory()
    with pytest.raises(GancleanseError, match=f"check must be 0 \\(off\\) or between 2 and the training size 60, got {k}"):
        gc.influence(run, "all", "aid", check=k, progress=False)
    out = tmp_path / "s.csv"
    assert main(["influence", str(run.path), "--out", str(out), "--check", str(k), "-q"]) == 2
    assert not out.exists()


def test_study_check_setting_is_validated():
    with pytest.raises(ConfigError, match="cleanse.check = 1"):
        Config.from_dict({"cleanse": {"check": 1}})
    with pytest.raises(ConfigError, match="check"):
        Config.from_dict({"cleanse": {"check": -3}})
    assert Config.from_dict({}).cleanse.check == DEFAULT_CHECK == 32


def test_a_study_warns_once_naming_only_the_estimators_its_checks_flag(tmp_path, monkeypatch):
    from conftest import tiny_config

    cfg = tiny_config(cleanse={"metrics": ["all"], "methods": ["itd", "random", "knn_density"],
                               "removal_rates": [0.0], "seeds": [0], "check": 8})
    monkeypatch.setattr(trust, "TRUST_THRESHOLD", 1.01)  # nothing can pass
    with pytest.warns(trust.UntrustedScoresWarning) as caught:
        summary = gc.cleanse(cfg, tmp_path / "study", report=False, progress=False)
    texts = [str(w.message) for w in caught if issubclass(w.category, trust.UntrustedScoresWarning)]
    assert len(texts) == 1 and "itd-all (1 of 1 seeds)" in texts[0]
    assert "random" not in texts[0] and "knn_density" not in texts[0]
    flags = {c["method"]: c["n_flagged"] for c in summary["checks"]}
    assert flags == {"itd": 1, "random": 0, "knn_density": 0}
    assert all(c["n_trusted"] == 0 for c in summary["checks"])

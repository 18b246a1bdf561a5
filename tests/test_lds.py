"""LDS: the statistic's anchors (oracle 1, random about 0), its retrains and sums, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.errors import GancleanseError
from gancleanse.study.lds import lds_statistic, random_subsets


def test_an_oracle_scores_one_and_a_random_scorer_about_zero():
    rng = np.random.default_rng(0)
    actual = rng.standard_normal(400)
    oracle = lds_statistic(actual, actual)
    assert oracle["lds"] == pytest.approx(1.0, abs=1e-12) and oracle["interval"][0] == pytest.approx(1.0, abs=1e-12)
    assert lds_statistic(np.exp(actual), actual)["lds"] == pytest.approx(1.0, abs=1e-12)  # ranks only
    noise = [lds_statistic(rng.standard_normal(400), actual) for _ in range(3)]
    for r in noise:  # about 0, inside its own interval, which is about +-1.645 / sqrt(400) wide
        lo, hi = r["interval"]
        assert abs(r["lds"]) < 0.15 and lo < r["lds"] < hi and 0.1 < hi - lo < 0.25
    assert lds_statistic(np.ones(10), actual[:10]) == {"lds": None, "interval": None}


def test_subsets_are_seeded_distinct_and_sized():
    a = random_subsets(100, 5, 0.25, seed=1)
    assert a == random_subsets(100, 5, 0.25, seed=1) and a != random_subsets(100, 5, 0.25, seed=2)
    assert all(len(s) == 25 == len(set(s)) and all(0 <= i < 100 for i in s) for s in a)
    for args, match in (((100, 5, 0.0), "--fraction"), ((100, 5, 1.0), "--fraction"),
                        ((100, 2, 0.5), "--subsets"), ((10, 5, 0.05), "removes none")):
        with pytest.raises(GancleanseError, match=match):
            random_subsets(*args, seed=0)


def test_lds_sums_scores_over_each_retrained_subset(run_factory):
    run = run_factory()
    res = gc.lds(run, "loss_d", ["itd", "random"], subsets=6, fraction=0.1, seed=3, progress=False)
    assert res["n_removed"] == 6 and len(res["removed"]) == 6 == len(res["actual"])
    itd = gc.influence(run, "loss_d", "itd", check=0, progress=False)
    for removed, actual in list(zip(res["removed"], res["actual"]))[:2]:
        assert actual == pytest.approx(gc.counterfactual(run, removed, "loss_d")["delta"], rel=1e-9, abs=1e-15)
    r = res["scorers"]["itd"]
    assert r["predicted"] == pytest.approx([float(itd.harmfulness[s].sum()) for s in res["removed"]], rel=1e-12)
    benefit = [-a for a in res["actual"]]  # loss_d: lower is better
    assert r["lds"] == pytest.approx(spearmanr(r["predicted"], benefit).statistic, abs=1e-12)
    assert set(res["scorers"]) == {"itd", "random"} and res["run_id"] == run.id


def test_itd_lds_is_high_where_single_removals_are_exact(run_factory):
    """Subsets of one instance on a smooth float64 run: the sum is the estimate, which is accurate;
    a sign or indexing error would show as a low or negative score."""
    run = run_factory()
    res = gc.lds(run, "all", ["itd"], subsets=20, fraction=1 / 60, seed=0, progress=False)
    assert res["n_removed"] == 1
    assert res["scorers"]["itd"]["lds"] > 0.9


def test_cli_prints_a_table_and_writes_json(tmp_path, run_factory, capsys):
    run = run_factory()
    out = tmp_path / "lds.json"
    assert main(["lds", str(run.path), "--methods", "itd,knn_density,discriminator", "--subsets", "5",
                 "--fraction", "0.2", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "LDS on all: 5 subsets of 12 instances" in text
    res = json.loads(out.read_text())
    assert set(res["scorers"]) == {"itd", "knn_density-raw", "discriminator"}
    for name, r in res["scorers"].items():
        assert name in text and f"{r['lds']:.3f}" in text
    assert main(["lds", str(run.path), "--subsets", "5", "--out", str(out), "-q"]) == 2  # exists, no --force
    for bad in (["--methods", "itd,lof"], ["--fraction", "1.5"], ["--subsets", "2"]):
        target = tmp_path / "bad.json"
        assert main(["lds", str(run.path), *bad, "--out", str(target), "-q"]) == 2
        assert not target.exists()


def test_cli_passes_itd_options_and_records_them(tmp_path, run_factory):
    """`lds --relu-smoothing T` scores ITD with the smoothed reverse pass (not the plain one)."""
    run = run_factory(model={"activation": "relu"})
    out = tmp_path / "lds.json"
    assert main(["lds", str(run.path), "--methods", "itd,random", "--subsets", "5", "--fraction", "0.2",
                 "--relu-smoothing", "0.3", "--out", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    assert res["options"] == {"itd": {"relu_smoothing": 0.3}}
    smoothed = gc.influence(run, "all", "itd", relu_smoothing=0.3, check=0, progress=False).harmfulness
    plain = gc.influence(run, "all", "itd", check=0, progress=False).harmfulness
    expected = [float(smoothed[s].sum()) for s in res["removed"]]
    assert res["scorers"]["itd"]["predicted"] == pytest.approx(expected, rel=1e-12)
    assert not np.allclose(expected, [float(plain[s].sum()) for s in res["removed"]], rtol=1e-6)
    target = tmp_path / "bad.json"
    assert main(["lds", str(run.path), "--methods", "random", "--relu-smoothing", "0.3",
                 "--out", str(target), "-q"]) == 2
    assert not target.exists()

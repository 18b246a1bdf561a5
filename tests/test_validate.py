"""validate: statistics recomputed independently, the random baseline, resume, executors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.study.validate import random_jaccard, removal_changes, weighted_values


def independent_jaccard(est, act, per_side):
    def ext(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        return set(order[:per_side]) | set(order[-per_side:])

    a, b = ext(act), ext(est)
    return len(a & b) / len(a | b)


def test_validate_statistics_match_its_own_lists(run_factory, tmp_path):
    run = run_factory(train={"epochs": 3, "record_from_epoch": 1})
    out = tmp_path / "valid.json"
    res = gc.validate(run, "all", "itd", 40, seed=3, out=out, progress=False)
    saved = json.loads(out.read_text())
    assert saved == res
    assert (tmp_path / "valid.png").stat().st_size > 1000
    est, act = np.array(res["estimated"]), np.array(res["actual"])
    assert len(res["instances"]) == len(set(res["instances"])) == 40
    assert res["kendall_tau"] == pytest.approx(kendalltau(est, act).statistic, abs=1e-12)
    assert res["pearson"] == pytest.approx(np.corrcoef(est, act)[0, 1], abs=1e-9)
    assert res["jaccard"] == pytest.approx(independent_jaccard(list(est), list(act), 2))
    # the actual changes are real retrains: spot-check one against the counterfactual API
    j = res["instances"][5]
    assert res["actual"][5] == gc.counterfactual(run, [j], "all")["delta"]
    assert res["pearson"] > 0.99  # smooth tiny model: the estimate is accurate


def test_random_jaccard_matches_monte_carlo():
    assert random_jaccard(200) == pytest.approx(0.0538, abs=5e-5)  # the paper's value
    rng = np.random.default_rng(0)
    n, m = 60, 6  # per_side 3 -> sets of 6 of 60
    sims = [len(set(a) & set(b)) / len(set(a) | set(b))
            for a, b in ((rng.choice(n, m, replace=False), rng.choice(n, m, replace=False)) for _ in range(40000))]
    assert random_jaccard(n) == pytest.approx(np.mean(sims), abs=3 * np.std(sims) / np.sqrt(len(sims)))


def test_validate_resumes_and_pool_gives_identical_numbers(run_factory, tmp_path):
    run = run_factory()
    out = tmp_path / "v.json"
    first = gc.validate(run, "loss_d", "itd", 6, seed=1, extremes=True, out=out, progress=False)
    parts = sorted((tmp_path / "v.parts").glob("*.json"))
    assert len(parts) == 6
    # extremes: the most negative and most positive estimates are among the chosen
    scores = gc.influence(run, "loss_d", check=0, progress=False)
    assert int(np.argmin(scores.influence)) in first["instances"]
    assert int(np.argmax(scores.influence)) in first["instances"]
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[0].unlink()
    again = gc.validate(run, "loss_d", "itd", 6, seed=1, extremes=True, out=out, workers=2, progress=False)
    assert again["actual"] == first["actual"]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "v.parts").glob("*.json")}
    assert [n for n in after if after[n] != stamps.get(n)] == [parts[0].name]  # only the missing one reran


def test_validate_horizons(run_factory, tmp_path, capsys):
    run = run_factory(train={"epochs": 3})
    out = tmp_path / "h.json"
    assert main(["validate", str(run.path), "--metric", "all", "--instances", "8", "--horizons",
                 "--out", str(out), "-q"]) == 0
    res = json.loads(out.read_text())
    assert sorted(res["horizons"]) == ["1", "2", "3"]
    for k, h in res["horizons"].items():
        assert h["epochs_traced"] == int(k) and h["pearson"] > 0.99
    assert res["horizons"]["3"]["actual"] == res["actual"]
    assert "kendall tau" in capsys.readouterr().out


def test_ray_executor_gives_identical_numbers(run_factory, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'gancleanse[ray]')")
    had_token = (Path.home() / ".ray" / "auth_token").exists()
    run = run_factory()
    local = gc.validate(run, "all", "itd", 4, seed=2, progress=False)
    remote = gc.validate(run, "all", "itd", 4, seed=2, executor="ray", workers=2, progress=False)
    assert remote["actual"] == local["actual"] and remote["instances"] == local["instances"]
    assert not (Path.home() / ".ray" / "auth_token").exists() or had_token, "Ray left a token file in HOME"
    # The local instance's session files (logs, sockets) went under RAY_TMPDIR (the sandbox's, see
    # conftest.py), not into the system's /tmp/ray.
    import os

    ray_tmp = Path(os.environ["RAY_TMPDIR"]) / "ray"
    assert any(ray_tmp.glob("session_*")), f"Ray kept its session files outside RAY_TMPDIR ({ray_tmp})"


def test_retrains_one_per_job_give_the_numbers_of_forked_groups(run_factory, tmp_path, monkeypatch):
    """``chunk`` only changes how retrains are grouped (a shared replay up to their forks), never their deltas,
    so parts written with one chunk size are reused by a run with another."""
    import gancleanse.study.validate as validate

    run = run_factory(train={"epochs": 3, "record_from_epoch": 1})
    jobs = [(j, e) for e in (1, 2) for j in (0, 3, 7, 11, 19)]
    sizes: list[int] = []
    original = validate.counterfactual_deltas

    def counting(run, indices, *rest):
        sizes.append(len(indices))
        return original(run, indices, *rest)

    monkeypatch.setattr(validate, "counterfactual_deltas", counting)
    grouped = validate.retrain_all(run, jobs, ["all", "loss_d"], tmp_path / "grouped", executor="local", workers=1,
                                   progress=False)
    assert sizes == [5, 5]  # one job per starting epoch
    sizes.clear()
    single = validate.retrain_all(run, jobs, ["all", "loss_d"], tmp_path / "single", executor="local", workers=1,
                                  progress=False, chunk=1)
    assert sizes == [1] * len(jobs)
    assert single == grouped
    # The recorded final state's values (what each delta is taken from) were evaluated once per metric, not per
    # job; a cleared memo gives the same deltas.
    finals: list[int] = []
    final_state = type(run).final_state
    monkeypatch.setattr(type(run), "final_state", lambda self: finals.append(1) or final_state(self))
    monkeypatch.setattr(validate, "_FINAL_VALUES", {})
    again = validate.retrain_all(run, jobs, ["all", "loss_d"], tmp_path / "again", executor="local", workers=1,
                                 progress=False, chunk=1)
    assert again == single and len(finals) == 2
    parts = validate.stored_retrains(run, ["all"], tmp_path / "again")["all"]
    assert sorted(parts) == sorted(jobs) and all(r["seconds"] > 0 for r in parts.values())
    assert all(v != 0.0 for m in grouped.values() for v in m.values())


def test_weighted_values_are_finite_differences_of_the_instance_weights(run_factory):
    """A down-weighting by a small fraction f gives the derivative ITD estimates ((V(1 - f) - V) / f -> the
    influence as f -> 0, float64), and a weight 0 is the removal, bit for bit."""
    run = run_factory(train={"epochs": 3})
    est = gc.influence(run, "all", check=0, progress=False).horizons[1]
    idx, f = [0, 5, 9, 14], 1e-6
    weights = torch.ones(2 * len(idx), run.n_train, dtype=run.dtype)
    for row, j in enumerate(idx):
        weights[row, j] = 1 - f
        weights[len(idx) + row, j] = 0.0
    before, after = weighted_values(run, weights, ["all"], start=run.epoch_start_step(2))
    slopes = np.array([(a - before["all"]) / f for a in after["all"][:len(idx)]])
    assert np.abs(slopes).min() > 0
    np.testing.assert_allclose(slopes, est[idx], rtol=1e-3, atol=1e-4 * np.abs(est[idx]).max())
    removed = removal_changes(run, [[j] for j in idx], ["all"], start=run.epoch_start_step(2))["all"]
    assert [a - before["all"] for a in after["all"][len(idx):]] == removed
    with pytest.raises(gc.GancleanseError, match=r"must be \(retrains, 60\), got \(60,\)"):
        weighted_values(run, weights[0], ["all"])
    weights[0, 3] = float("nan")
    with pytest.raises(gc.GancleanseError, match="finite"):
        weighted_values(run, weights, ["all"])

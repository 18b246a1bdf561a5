"""Evaluation-only metrics of a study: precision and recall beside FID for every scorer, resumed, reported, refused
as a score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import read_csv
from test_manifold import brute_force

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.errors import ConfigError
from gancleanse.features import load_feature_model
from gancleanse.metrics import make_metric

STUDY = {
    "data": {"name": "digits", "n_train": 150, "n_valid": 80, "n_test": 80, "seed": 2},
    "model": {"arch": "dcgan", "z_dim": 4, "g_hidden": 5, "d_hidden": 5, "activation": "softplus", "norm": "layer",
              "bias": True},
    "train": {"epochs": 2, "batch_size": 50, "lr_d": 0.01, "lr_g": 0.01},
    "metric": {"n_samples": 64, "classifier_epochs": 40},  # a classifier whose features separate the digits
    "cleanse": {"metrics": ["fid"], "evaluate": ["precision"], "methods": ["random", "isolation_forest"],
                "removal_rates": [0.0, 0.1, 0.2], "seeds": [0, 1], "check": 0},
}
SCORERS = {("random", "none"), ("isolation_forest", "raw"), ("isolation_forest", "classifier")}
VALUE_COLUMNS = ("before", "after", "valid_before", "valid_after")


def config(**cleanse) -> Config:
    return Config.from_dict({**STUDY, "cleanse": {**STUDY["cleanse"], **cleanse}})


def parts(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study evaluated on precision, then resumed with recall added to ``evaluate``."""
    out = tmp_path_factory.mktemp("evaluate")
    gc.cleanse(config(), out, report=False, progress=False)
    first = parts(out)
    summary = gc.cleanse(config(evaluate=["precision", "recall"]), out, report=True, progress=False)
    return out, first, summary


def test_results_have_evaluation_rows_for_every_scorer(study):
    out, _, _ = study
    rows = read_csv(out / "results.csv")
    for metric in ("fid", "precision", "recall"):
        mine = [r for r in rows if r["eval_metric"] == metric]
        assert {(r["method"], r["score_metric"]) for r in mine} == SCORERS  # scorers come from cleanse.metrics
        assert len(mine) == 2 * len(SCORERS) * 3  # seeds x scorers x rates
    evaluation = [r for r in rows if r["eval_metric"] in ("precision", "recall")]
    values = [float(r[c]) for r in evaluation for c in VALUE_COLUMNS]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert len(set(values)) > 2  # measured, not a constant
    for r in evaluation:
        assert float(r["delta"]) == pytest.approx(float(r["after"]) - float(r["before"]), abs=1e-15)
        if r["removal_rate"] == "0.0":
            assert r["after"] == r["before"]  # removing nothing replays the recorded training bitwise


def test_original_precision_and_recall_match_a_brute_force_computation(study):
    out, _, _ = study
    run = gc.Run.open(out / "seeds" / "seed_0" / "run")
    state = run.final_state()
    model = load_feature_model(run)
    with torch.no_grad():
        fake = model.features(run.models.generate(run.dynamics.eval_generator(state), run.eval_latents("test")))
    expected = brute_force(model.evaluate(run.real("test"))[0].numpy(), fake.numpy(), run.cfg.metric.precision_recall_k)
    original = json.loads((out / "parts" / "seed0_original.json").read_text())
    for metric in ("precision", "recall"):
        assert original[metric]["test"] == pytest.approx(expected[metric], abs=1e-12)
        assert make_metric(metric, run, "test").value(state) == original[metric]["test"]


def test_summary_reports_but_never_recommends_evaluation_metrics(study):
    out, _, summary = study
    by_rate = {(e["method"], e["score_metric"], e["eval_metric"], e["removal_rate"]) for e in summary["by_rate"]}
    assert by_rate == {(*scorer, m, rate) for scorer in SCORERS for m in ("fid", "precision", "recall")
                       for rate in (0.0, 0.1, 0.2)}
    assert {r["eval_metric"] for r in read_csv(out / "summary.csv")} == {"fid", "precision", "recall"}
    assert json.loads((out / "summary.json").read_text())["by_rate"] == summary["by_rate"]
    assert [r["eval_metric"] for r in summary["recommended"]] == ["fid"]  # isolation_forest: always a candidate
    rec = summary["recommended"][0]
    at = {e["eval_metric"]: e["mean_delta"] for e in summary["by_rate"]
          if (e["method"], e["score_metric"], e["removal_rate"]) == (rec["method"], rec["score_metric"],
                                                                     rec["removal_rate"])}
    assert rec["evaluation_deltas"] == {"precision": at["precision"], "recall": at["recall"]}
    assert {r["eval_metric"] for r in summary["rate_chosen_on_validation"]} == {"fid"}


def test_resume_recomputes_parts_without_a_new_evaluation_metric(study):
    out, first, _ = study
    assert first and all("recall" not in rec and "precision" in rec for rec in first.values())
    now = parts(out)
    assert set(now) == set(first)
    for name, rec in now.items():
        assert rec["recall"]["test"] >= 0.0 and rec["provenance"] == first[name]["provenance"]
        assert rec["precision"] == first[name]["precision"] and rec["fid"] == first[name]["fid"]  # bitwise replays


def test_report_shows_the_evaluation_metrics(study):
    out, _, summary = study
    text = (out / "report.html").read_text(encoding="utf-8")
    section = text.split('<section id="evaluation">')[1].split("</section>")[0]
    rows = re.findall(r'<tr class="[^"]*"><td class="l">([^<]*)</td><td class="l">([^<]*)</td>'
                      r'<td class="l">([^<]*)</td><td>([^<]*)</td>', section)
    assert len(rows) == len(SCORERS) * 2 * 3
    assert {r[2] for r in rows} == {"precision (classifier)", "recall (classifier)"}  # named with their features
    changes = [float(c) for c in re.findall(r'<td class="chg">([^<]*)</td>', section)]
    expected = [e["mean_delta"] for e in summary["by_rate"] if e["eval_metric"] in ("precision", "recall")]
    assert changes == pytest.approx(expected, rel=1e-2, abs=1e-12)
    assert "change in FID" in section
    headline = re.findall(r'<div class="card headline[^"]*">(.*?)</div>', text, re.S)
    assert len(headline) == 1 and "At that removal (evaluation only): precision" in headline[0]
    assert "recall" in headline[0]


def test_evaluation_metrics_cannot_be_scored(study, capsys):
    out, _, _ = study
    run_dir = out / "seeds" / "seed_0" / "run"
    with pytest.raises(ConfigError, match="'precision' is evaluation only"):
        gc.influence(run_dir, "precision", "itd", check=0, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["influence", str(run_dir), "--metric", "precision", "--out", str(out / "p.csv"), "-q"])
    assert exit_info.value.code == 2 and "invalid choice: 'precision'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'precision'"):
        config(metrics=["precision"]).validate()


def test_evaluation_metrics_need_a_feature_space(tmp_path, run_factory):
    two_d = Config.from_dict({"cleanse": {"metrics": ["all"], "evaluate": ["coverage"]}})
    with pytest.raises(ConfigError, match=r"\['coverage'\] need image data"):
        gc.cleanse(two_d, tmp_path / "study", progress=False)
    with pytest.raises(ConfigError, match="need image data"):
        make_metric("density", run_factory(), "test")

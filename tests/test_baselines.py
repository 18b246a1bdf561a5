"""Baseline scorers (Isolation Forest, kNN density, discriminator ranking, random) and the registry."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.errors import ConfigError
from gancleanse.features.classifier import load_or_train_classifier


def _planted_run(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    data = gc.Splits.from_tensors(x[:300], x[300:350], x[350:])
    outliers = [5, 77, 150, 299]
    data.train[outliers] = torch.tensor([[9.0, 9.0], [-8.0, 7.5], [10.0, -9.0], [-9.5, -9.5]], dtype=torch.float64)
    cfg = Config.from_dict({"model": {"g_hidden": 4, "d_hidden": 4, "z_dim": 2},
                            "train": {"epochs": 1, "batch_size": 50}, "metric": {"n_samples": 50}})
    return gc.train(cfg, tmp_path / "run", data=data, progress=False), outliers


def test_isolation_forest_ranks_planted_outliers_first(tmp_path):
    run, outliers = _planted_run(tmp_path)
    s = gc.influence(run, "all", "isolation_forest", features="raw", check=0, progress=False)
    assert sorted(s.most_harmful(4)) == outliers
    assert np.array_equal(s.harmfulness, -s.influence)  # influence column = score_samples
    again = gc.influence(run, "all", "isolation_forest", features="raw", check=0, progress=False)
    assert np.array_equal(again.harmfulness, s.harmfulness)
    with pytest.raises(ConfigError, match="use --features raw"):
        gc.influence(run, "all", "isolation_forest", features="classifier", check=0, progress=False)


def test_random_scores_are_seeded_and_written_like_influence(tmp_path, run_factory):
    run = run_factory()
    a = gc.influence(run, "all", "random", seed=3, check=0, progress=False)
    b = gc.influence(run, "all", "random", seed=3, check=0, progress=False)
    c = gc.influence(run, "all", "random", seed=4, check=0, progress=False)
    assert np.array_equal(a.harmfulness, b.harmfulness) and not np.array_equal(a.harmfulness, c.harmfulness)
    out = tmp_path / "random.csv"
    assert main(["influence", str(run.path), "--method", "random", "--seed", "3", "--out", str(out), "-q"]) == 0
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "influence", "harmfulness", "key"] and len(rows) == run.n_train + 1
    assert [float(r[2]) for r in rows[1:]] == a.harmfulness.tolist()


def test_isolation_forest_on_classifier_features(tmp_path):
    cfg = Config.from_dict({
        "data": {"name": "digits", "n_train": 200, "n_valid": 100, "n_test": 100},
        "model": {"activation": "softplus", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
        "train": {"epochs": 1, "batch_size": 50}, "metric": {"n_samples": 100, "classifier_epochs": 10},
    })
    run = gc.train(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "if.csv"
    assert main(["influence", str(run.path), "--method", "isolation_forest", "--features", "classifier",
                 "--out", str(out), "-q"]) == 0
    with open(out) as f:
        harm = np.array([float(r[2]) for r in list(csv.reader(f))[1:]])
    from sklearn.ensemble import IsolationForest

    feats = load_or_train_classifier(run).evaluate(run.splits.train)[0].numpy()
    assert feats.shape == (200, 128)
    expected = -IsolationForest(random_state=0).fit(feats).score_samples(feats)
    assert np.allclose(harm, expected, rtol=0, atol=1e-12)
    raw = gc.influence(run, "all", "isolation_forest", features="raw", check=0, progress=False).harmfulness
    assert not np.allclose(raw, harm)  # a different feature space gives a different ranking


def test_knn_density_is_the_kth_other_neighbour_distance_and_ranks_outliers_first(tmp_path):
    run, outliers = _planted_run(tmp_path)
    s = gc.influence(run, "all", "knn_density", neighbors=3, check=0, progress=False)
    x = run.splits.train.numpy()
    pairwise = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(pairwise, np.inf)  # another instance, never itself
    expected = np.sort(pairwise, axis=1)[:, 2]
    assert np.allclose(s.harmfulness, expected, rtol=1e-12, atol=1e-12)
    assert sorted(s.most_harmful(4)) == outliers
    assert s.info["neighbors"] == 3 and s.info["features"] == "raw"
    default = gc.influence(run, "all", "knn_density", check=0, progress=False)
    assert default.info["neighbors"] == 5 and not np.allclose(default.harmfulness, s.harmfulness)
    with pytest.raises(ConfigError, match="neighbors = 300"):
        gc.influence(run, "all", "knn_density", neighbors=300, check=0, progress=False)


def test_discriminator_ranking_is_minus_the_final_discriminator_logit(tmp_path):
    run, _ = _planted_run(tmp_path)
    s = gc.influence(run, "all", "discriminator", check=0, progress=False)
    module = copy.deepcopy(run.models.discriminator).to(run.dtype)
    final = run.final_state()["d"]
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(final[name])
        logits = module(run.splits.train.to(run.dtype)).reshape(-1).double().numpy()
    assert np.allclose(s.influence, logits, rtol=1e-12, atol=1e-12)
    assert np.array_equal(s.harmfulness, -s.influence)
    assert list(s.most_harmful(3)) == [int(i) for i in np.argsort(logits, kind="stable")[:3]]


def test_registry_serves_config_cli_and_api_alike(tmp_path, run_factory):
    import importlib

    from gancleanse import config
    from gancleanse.influence import variants
    from gancleanse.specs import METHODS, SCORERS

    assert config.METHODS == METHODS == tuple(SCORERS)
    for spec in SCORERS.values():
        assert callable(importlib.import_module(f"gancleanse.influence.{spec.module}").score)
    assert variants("itd", ["fid", "is"], "classifier") == ["fid", "is"]
    assert variants("knn_density", ["fid"], "classifier") == ["raw", "classifier"]
    assert variants("knn_density", ["fid"], "inception") == ["raw", "inception"]
    assert variants("knn_density", ["fid"], None) == ["raw"] and variants("discriminator", ["fid"], "x") == ["none"]
    run = run_factory()
    with pytest.raises(ConfigError, match="applies to isolation_forest and knn_density, not itd"):
        gc.influence(run, "all", "itd", features="raw", check=0, progress=False)
    with pytest.raises(ConfigError, match="random takes no options"):
        gc.influence(run, "all", "random", neighbors=3, check=0, progress=False)
    with pytest.raises(ConfigError, match="unknown method 'lof'"):
        gc.influence(run, "all", "lof", check=0, progress=False)
    out = tmp_path / "s.csv"
    assert main(["influence", str(run.path), "--method", "itd", "--neighbors", "3", "--out", str(out), "-q"]) == 2
    assert not out.exists()
    assert main(["influence", str(run.path), "--method", "knn_density", "--neighbors", "3", "--out", str(out),
                 "-q"]) == 0
    with open(out) as f:
        harm = [float(r[2]) for r in list(csv.reader(f))[1:]]
    assert harm == gc.influence(run, "all", "knn_density", neighbors=3, check=0, progress=False).harmfulness.tolist()

"""The feature-space registry: which network the metrics use (auto and asked for), what outputs record about it,
and the errors a user can cause with --features, on an unlabelled image folder (the common case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.errors import ConfigError
from gancleanse.examples.digit_folder import write_digit_folder
from gancleanse.features import load_feature_model, resolve

UNLABELLED_TOML = """
[data]
name = "images"
path = "{path}"
labels = "none"
n_valid = 24
n_test = 24

[model]
arch = "dcgan"
z_dim = 4
g_hidden = 4
d_hidden = 4
activation = "softplus"
norm = "layer"
bias = true
dtype = "float64"

[train]
epochs = 2
batch_size = 20
lr_d = 0.05
lr_g = 0.05
record_from_epoch = 1
checkpoint_every = 2

[metric]
n_samples = 24
fid_ridge = 1e-2
encoder_epochs = 2
encoder_batch_size = 32
"""


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float64 DCGAN on an unlabelled folder of 8x8 digits (no labels: no classifier)."""
    d = tmp_path_factory.mktemp("unlabelled")
    images, _ = write_digit_folder(d / "data", size=8, n=100, reference=20, corrupt_fraction=0.0, seed=1)
    cfg = d / "run.toml"
    cfg.write_text(UNLABELLED_TOML.format(path=images))
    assert main(["train", str(cfg), "--out", str(d / "run"), "-q"]) == 0
    return d / "run"


def exit_status(argv: list[str]) -> int:
    """The command's exit status, whether ``main`` returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def inception_cache() -> Path:
    """Where ``features = inception`` looks by default (the sandboxed torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def test_auto_picks_classifier_for_labels_then_inception_then_the_encoder(unlabelled_run, run_factory, monkeypatch,
                                                                         tmp_path) -> None:
    labelled = run_factory(data={"name": "digits", "n_train": 60, "n_valid": 50, "n_test": 50})
    assert resolve(labelled).space == "classifier"
    assert resolve(run_factory()) is None  # 2D points: no feature space
    run = gc.Run.open(unlabelled_run)
    assert run.splits.y_train is None
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: no weights anywhere
    choice = resolve(run)
    assert choice.space == "self_supervised" and "no Inception weights" in choice.reason
    weights = Path(torch.hub.get_dir()) / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"found by name; read only when used")
    choice = resolve(run)
    assert choice.space == "inception" and str(weights) in choice.reason
    assert resolve(run.with_features("self_supervised")).space == "self_supervised"  # asked for wins


def test_features_asked_for_must_exist(unlabelled_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    run = gc.Run.open(unlabelled_run)
    with pytest.raises(ConfigError, match="unknown feature space 'imagenet'"):
        run.with_features("imagenet")
    with pytest.raises(Exception, match="labels"):
        load_feature_model(run, "classifier")
    with pytest.raises(ConfigError, match="gancleanse weights inception"):
        load_feature_model(run, "inception")
    with pytest.raises(ConfigError, match="extractor"):
        load_feature_model(run, "torchscript")


def test_influence_on_fid_of_an_unlabelled_folder_records_its_features(unlabelled_run, tmp_path, capsys,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "fid.csv"
    assert main(["influence", str(unlabelled_run), "--metric", "fid", "--check", "0", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "features: self_supervised [auto: unlabelled images" in err
    info = json.loads(out.with_suffix(".json").read_text())
    record = info["metric_features"]
    assert record["space"] == "self_supervised" and record["chosen"].startswith("auto")
    cached = json.loads((unlabelled_run / "self_supervised.json").read_text())
    assert record["weights_sha256"] == cached["weights_sha256"]  # the encoder the run directory caches
    # the same scores again: the encoder is not retrained, the key names the same weights
    again = gc.influence(unlabelled_run, "fid", "itd", check=0, progress=False)
    assert again.info["metric_features"]["key"] == record["key"]


def test_isolation_forest_on_a_feature_space_names_it(unlabelled_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    scores = gc.influence(unlabelled_run, "fid", "isolation_forest", features="auto", check=0, progress=False)
    assert scores.info["features"] == "self_supervised"
    assert scores.info["feature_model"]["space"] == "self_supervised"
    raw = gc.influence(unlabelled_run, "fid", "isolation_forest", check=0, progress=False)
    assert raw.info["features"] == "raw" and "feature_model" not in raw.info
    assert not (raw.harmfulness == scores.harmfulness).all()


@pytest.mark.parametrize("argv, message", [
    (["--metric", "fid", "--features", "raw"], "features = 'raw' applies to isolation_forest and knn_density"),
    (["--metric", "is", "--features", "self_supervised"], "needs class logits"),
    (["--metric", "fid", "--features", "classifier"], "labels"),
    (["--metric", "fid", "--features", "imagenet"], "invalid choice: 'imagenet'"),
])
def test_bad_feature_choices_are_one_line_errors(unlabelled_run, tmp_path, capsys, monkeypatch, argv,
                                                 message) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "s.csv"
    assert exit_status(["influence", str(unlabelled_run), *argv, "--check", "0", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not out.with_suffix(".json").exists()


# ------------------------------------------------------------------ exactness in every feature space
CHUNKED_TOML = UNLABELLED_TOML.replace("n_valid = 24", "n_valid = {n_valid}").replace(
    "n_samples = 24", "n_samples = {n_samples}\nweights = \"{weights}\"")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random Inception-v3 weights under the published names and shapes (the network's cost does not depend on
    the values; exactness is what these tests check)."""
    from test_inception import randomized

    from gancleanse.features.inception import InceptionV3

    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(randomized(InceptionV3().state_dict(), seed=3), path)
    return path


def small_run(directory: Path, images: Path, weights: Path, n_samples: int, n_valid: int) -> gc.Run:
    cfg = directory / "run.toml"
    cfg.write_text(CHUNKED_TOML.format(path=images, n_valid=n_valid, n_samples=n_samples, weights=weights))
    assert main(["train", str(cfg), "--out", str(directory / "run"), "-q"]) == 0
    return gc.Run.open(directory / "run")


@pytest.fixture(scope="module")
def spaces_run(tmp_path_factory, inception_weights) -> gc.Run:
    """The unlabelled float64 DCGAN with few generated samples: Inception (299x299, 27M parameters) on a handful."""
    d = tmp_path_factory.mktemp("spaces")
    images, _ = write_digit_folder(d / "data", size=8, n=100, reference=20, corrupt_fraction=0.0, seed=2)
    return small_run(d, images, inception_weights, n_samples=3, n_valid=6)


SPACE_METRICS = [("self_supervised", "fid"), ("self_supervised", "kid"),
                 ("inception", "fid"), ("inception", "kid"), ("inception", "is"), ("inception", "log_is")]


@pytest.mark.parametrize("space, name", SPACE_METRICS)
def test_chunked_metric_equals_full_batch_in_each_space(spaces_run, space, name) -> None:
    from test_metric_chunks import assert_trees_close

    from gancleanse.metrics import make_metric

    run = spaces_run.with_features(space)
    state = run.final_state()
    full = make_metric(name, run, "valid")
    value = float(full.fn(state))
    expected = torch.func.grad(full.fn)(state)
    assert any(float(t.abs().max()) > 0 for t in expected["g"].values())
    for chunk in (2, 3):  # 2 does not divide the 3 samples
        metric = make_metric(name, run, "valid", chunk_size=chunk)
        assert metric.value(state) == pytest.approx(value, rel=1e-10, abs=0.0), chunk
        assert_trees_close(metric.gradient(state), expected, 1e-10)


@pytest.mark.parametrize("space", ["self_supervised", "inception"])
def test_itd_equals_unrolled_autograd_in_each_space(spaces_run, space) -> None:
    from test_itd_exact import rel_err, unrolled_dV_dw

    from gancleanse.influence.itd import itd_influence
    from gancleanse.metrics import make_metric

    run = spaces_run.with_features(space)
    expected = -unrolled_dV_dw(run, "fid")
    assert expected.abs().max() > 0
    got = itd_influence(run, make_metric("fid", run, chunk_size=2), progress=False).influence
    assert rel_err(got, expected) < 1e-8


def test_the_float64_run_computes_inception_in_float64(spaces_run) -> None:
    model = load_feature_model(spaces_run, "inception")
    assert model.dtype == torch.float64 and model.space == "inception" and model.has_logits
    assert model.record["sha256"] and model.key.startswith("inception:")


# ------------------------------------------------------------------ bad weights and the download command
def wrong_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, path)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[:5000]), "weights.pth"),
    (lambda path: torch.save({"fc.weight": torch.zeros(3, 3)}, path), "missing keys"),
    (wrong_shape, "fc.weight"),
])
def test_bad_inception_weights_are_one_line_and_write_nothing(spaces_run, inception_weights, tmp_path, capsys,
                                                               damage, message) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(inception_weights.read_bytes())
    damage(bad)
    config = (spaces_run.path / "config.toml").read_text()
    assert str(inception_weights) in config
    fresh = tmp_path / "fresh.toml"  # the same training with [metric] weights naming the damaged file
    fresh.write_text(config.replace(str(inception_weights), str(bad)))
    assert main(["train", str(fresh), "--out", str(tmp_path / "run"), "-q"]) == 0
    out = tmp_path / "bad.csv"
    assert exit_status(["influence", str(tmp_path / "run"), "--metric", "fid", "--features", "inception",
                        "--check", "0", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_weights_command_refuses_a_wrong_file_and_an_unreachable_server(tmp_path, capsys, monkeypatch) -> None:
    from test_weights_download import Server

    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = Server()  # serves a file whose sha256 is not the published one
    try:
        target = tmp_path / "cache" / "inception.pth"
        target.parent.mkdir()
        assert exit_status(["weights", "inception", "--to", str(target), "--url", server.url + "/weights.pth"]) == 2
        err = capsys.readouterr().err.strip()
        assert "sha256" in err and len(err.splitlines()) == 1, err
        assert list(target.parent.iterdir()) == []  # nothing written, no temporary left
    finally:
        server.close()
    assert exit_status(["weights", "inception", "--to", str(target), "--url", server.url + "/weights.pth"]) == 2
    err = capsys.readouterr().err.strip()
    assert server.url in err and len(err.splitlines()) == 1, err

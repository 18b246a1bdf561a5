"""The image-folder workflow: planted broken images rank as harmful, and export round-trips."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import read_csv
from scipy.stats import hypergeom

from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.data.image_files import read_source
from gancleanse.examples.digit_folder import write_digit_folder

DCGAN_TOML = """
[data]
name = "images"
path = "{path}"
reference_path = "{reference}"
labels = "folders"
n_valid = 150
n_test = 150

[model]
arch = "dcgan"
z_dim = 32
g_hidden = 32
d_hidden = 32
activation = "sigmoid"
norm = "layer"
bias = true
dtype = "float32"

[train]
epochs = 15
batch_size = 50
optimizer = "adam"
lr_d = 2e-4
lr_g = 2e-4
betas = [0.5, 0.999]
weight_decay_d = 1e-3
weight_decay_g = 1e-3

[metric]
n_samples = 150
classifier_epochs = 40
"""


@pytest.fixture(scope="module")
def planted_study(tmp_path_factory):
    """500 training digits (30 planted corruptions) + 300 clean reference digits; train; FID influence."""
    d = tmp_path_factory.mktemp("planted")
    images, planted = write_digit_folder(d / "data", size=32, n=500, reference=300, seed=0)
    cfg = d / "images.toml"
    cfg.write_text(DCGAN_TOML.format(path=images, reference=d / "data" / "reference"))
    assert main(["train", str(cfg), "--out", str(d / "run"), "-q"]) == 0
    assert main(["influence", "--check", "0", str(d / "run"), "--metric", "fid", "--out", str(d / "fid.csv"), "-q"]) == 0
    return d, images, dict(planted)


@pytest.mark.slow
def test_planted_images_rank_among_the_most_harmful(planted_study):
    d, _, planted = planted_study
    rows = read_csv(d / "fid.csv")
    keys = [r["key"] for r in rows]
    assert sum(k in planted for k in keys) == len(planted) == 30  # all planted images are training instances
    harm = np.array([float(r["harmfulness"]) for r in rows])
    order = np.argsort(-harm, kind="stable")
    top = 2 * len(planted)
    hits = sum(keys[i] in planted for i in order[:top])
    chance = top * len(planted) / len(rows)
    # far above chance: at least 3x the expected count, and a hypergeometric p below 1e-3
    assert hits >= 3 * chance, (hits, chance)
    assert hypergeom.sf(hits - 1, len(rows), len(planted), top) < 1e-3


@pytest.mark.slow
def test_export_round_trips_the_folder(planted_study, capsys):
    d, images, _ = planted_study
    out = d / "clean"
    assert main(["export", str(d / "fid.csv"), "--rate", "0.1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported 450 of 500" in printed
    removed = read_csv(out / "removed.csv")
    assert [int(r["rank"]) for r in removed] == list(range(1, 51))
    scores = read_csv(d / "fid.csv")
    harm = np.array([float(r["harmfulness"]) for r in scores])
    expected = [scores[i]["key"] for i in np.argsort(-harm, kind="stable")[:50]]
    assert [r["key"] for r in removed] == expected
    # the export re-read by gancleanse: exactly N - removed instances, byte-identical files
    cfg = Config.from_dict({"data": {"name": "images", "path": str(out / images.name), "labels": "folders"}}).data
    again = read_source(str(out / images.name), cfg, "data.path")
    run_keys = json.loads((d / "run" / "splits.json").read_text())["train"]
    assert again.keys == sorted(set(run_keys) - set(expected))
    for key in again.keys:
        assert (out / images.name / key).read_bytes() == (images / key).read_bytes()
    assert (out / "removed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing directory that is not an export is never replaced
    other = d / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(d / "fid.csv"), "--rate", "0.1", "--out", str(other), "--force"]) == 2
    assert (other / "keep.txt").read_text() == "mine"
    # --link hard-links instead of copying; --force replaces the earlier export
    assert main(["export", str(d / "fid.csv"), "--count", "5", "--out", str(out), "--force", "--link"]) == 0
    key = read_source(str(out / images.name), cfg, "data.path").keys[0]
    assert (out / images.name / key).stat().st_ino == (images / key).stat().st_ino
    assert len(read_csv(out / "removed.csv")) == 5


SMALL_TOML = """
[data]
name = "images"
path = "{path}"
n_valid = 10
n_test = 10
image_size = 16

[model]
arch = "mlp"
g_hidden = 8
d_hidden = 8
z_dim = 3
activation = "softplus"

[train]
epochs = 1
batch_size = 10
"""


def _train_and_score(tmp_path: Path, path: Path) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMALL_TOML.format(path=path))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert main(["influence", "--check", "0", str(tmp_path / "run"), "--metric", "loss_d", "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    return tmp_path / "s.csv"


def test_export_round_trips_a_stylegan_zip(tmp_path):
    target, _ = write_digit_folder(tmp_path / "data", size=16, n=80, reference=10, as_zip=True, seed=1)
    scores = _train_and_score(tmp_path, target)
    out = tmp_path / "clean"
    assert main(["export", str(scores), "--count", "6", "--out", str(out), "--all-splits"]) == 0
    removed = [r["key"] for r in read_csv(out / "removed.csv")]
    with zipfile.ZipFile(target) as src, zipfile.ZipFile(out / "images.zip") as dst:
        names = [n for n in dst.namelist() if n != "dataset.json"]
        # --all-splits: every image of the source but the removed ones
        assert sorted(names) == sorted(n for n in src.namelist() if n.endswith(".png") and n not in removed)
        for n in names:
            assert dst.read(n) == src.read(n)
        labels = json.loads(dst.read("dataset.json"))["labels"]
        src_labels = dict(json.loads(src.read("dataset.json"))["labels"])
    assert sorted(k for k, _ in labels) == sorted(names)
    assert all(src_labels[k] == y for k, y in labels)


def test_export_round_trips_an_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (70, 16, 16, 3), dtype=np.uint8)  # NHWC, as many tools save them
    y = rng.integers(0, 4, 70)
    np.savez(tmp_path / "pics.npz", arr_0=x, y=y, note=np.array("kept as is"))
    scores = _train_and_score(tmp_path, tmp_path / "pics.npz")
    out = tmp_path / "clean"
    assert main(["export", str(scores), "--rate", "0.2", "--out", str(out)]) == 0
    removed = {int(r["key"][1:]) for r in read_csv(out / "removed.csv")}
    train_rows = [int(k[1:]) for k in json.loads((tmp_path / "run" / "splits.json").read_text())["train"]]
    kept = [i for i in train_rows if i not in removed]
    assert len(removed) == int(0.2 * len(train_rows))
    with np.load(out / "pics.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], x[kept])
        np.testing.assert_array_equal(f["y"], y[kept])
        assert str(f["note"]) == "kept as is"


def test_export_refuses_scores_of_another_run(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (70, 8, 8), dtype=np.uint8))
    scores = _train_and_score(tmp_path, tmp_path / "a.npy")
    rows = read_csv(scores)
    with open(scores, "w", newline="") as f:  # the same scores, but with other instance keys
        w = csv.writer(f)
        w.writerow(["index", "influence", "harmfulness", "key"])
        for r in rows:
            w.writerow([r["index"], r["influence"], r["harmfulness"], r["key"] + "x"])
    assert main(["export", str(scores), "--rate", "0.1", "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()

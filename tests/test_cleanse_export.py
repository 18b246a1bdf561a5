"""A study on an image folder names the validation-chosen rate and exports the cleaned folder."""

from __future__ import annotations

import csv
import json
import math

import numpy as np

from gancleanse.cli import main
from gancleanse.specs import HIGHER_IS_BETTER
from gancleanse.examples.digit_folder import write_digit_folder

STUDY = """
[data]
name = "images"
path = "{path}"
reference_path = "{reference}"
image_size = 8
channels = 1
n_valid = 30
n_test = 30

[model]
g_hidden = 16
d_hidden = 16
z_dim = 4
activation = "softplus"

[train]
epochs = 2
batch_size = 20
lr_d = 0.01
lr_g = 0.01

[metric]
n_samples = 30

[cleanse]
metrics = ["all"]
methods = ["itd", "random"]
removal_rates = [0.0, 0.1, 0.3]
seeds = [0, 1]
check = 8
"""


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cleanse_export_applies_the_validation_choice_to_the_full_training_split(tmp_path, capsys):
    images, _ = write_digit_folder(tmp_path / "data", size=16, n=100, reference=60, seed=2)
    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY.format(path=images, reference=tmp_path / "data" / "reference"))
    study, cleaned = tmp_path / "study", tmp_path / "cleaned"
    code = main(["cleanse", str(cfg), "--out", str(study), "--export", str(cleaned), "-q", "--no-report"])
    captured = capsys.readouterr()

    # the recommendation, recomputed from results.csv: best mean validation change, random excluded
    results = [r for r in rows_of(study / "results.csv") if r["method"] != "random" and int(r["n_removed"]) > 0]
    means: dict[tuple, list[float]] = {}
    for r in results:
        means.setdefault((r["method"], r["score_metric"], float(r["removal_rate"])), []).append(float(r["valid_delta"]))
    sign = 1.0 if HIGHER_IS_BETTER["all"] else -1.0
    best = max(means, key=lambda k: sign * np.mean(means[k]))
    rec = json.loads((study / "summary.json").read_text())["recommended"][0]
    assert (rec["method"], rec["score_metric"], rec["removal_rate"]) == best
    assert math.isclose(rec["mean_valid_delta"], float(np.mean(means[best])), rel_tol=1e-12)
    improves = sign * rec["mean_valid_delta"] > 0
    assert rec["improves_validation"] == improves

    assert improves, "this seeded study improves the validation ALL; the export path must run"
    assert code == 0 and "--export CLEANED_DIR" in captured.out
    # seed 0 trains on the full training split (the folder, valid/test from the reference): reused
    assert not (study / "export").exists()
    scores = rows_of(study / "seeds" / "seed_0" / "scores" / f"{best[0]}-{best[1]}.csv")
    assert len(scores) == 100
    n_removed = math.floor(100 * best[2])
    harm = np.array([float(r["harmfulness"]) for r in scores])
    expected = [scores[i]["key"] for i in np.argsort(-harm, kind="stable")[:n_removed]]
    assert [r["key"] for r in rows_of(cleaned / "removed.csv")] == expected
    exported = sorted(p.relative_to(cleaned / images.name).as_posix() for p in (cleaned / images.name).rglob("*.png"))
    assert exported == sorted({r["key"] for r in scores} - set(expected))
    assert f"exported {100 - n_removed} of 100" in captured.out

"""Scorer options (one dataclass, every spelling derived from it), the one Scores type and its
files, and the atomic writer every output goes through."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import warnings

import numpy as np
import pytest

from gancleanse.cli import build_parser
from gancleanse.config import Config, ConfigDeprecationWarning, load_config
from gancleanse.errors import ConfigError, GancleanseError
from gancleanse.files import atomic_write, write_json_atomic
from gancleanse.options import AIDOptions, ITDOptions, KNNOptions
from gancleanse.scores import Scores, harmful_first
from gancleanse.specs import SCORERS


# ------------------------------------------------------------------------- options
@pytest.mark.parametrize("options,message", [
    (lambda: AIDOptions(tol=0.0), r"aid\.tol must be a positive finite number, got 0\.0 \(--aid-tol\)"),
    (lambda: AIDOptions(iterations=0), r"aid\.iterations must be at least 1, got 0 \(--aid-iterations\)"),
    (lambda: AIDOptions(solver="lu"), r"unknown AID solver 'lu'.*\(--aid-solver\)"),
    (lambda: AIDOptions(damping=float("inf")), r"aid\.damping must be .*\(--aid-damping\)"),
    (lambda: AIDOptions(batch_size=5), r"aid\.batch_size .*neumann only"),
    (lambda: ITDOptions(memory_gb=-1.0), r"itd\.memory_gb must be a positive number of gigabytes.*\(--memory-gb\)"),
    (lambda: ITDOptions(relu_smoothing="wide"), r"itd\.relu_smoothing must be float, got str"),
    (lambda: KNNOptions(neighbors=True), r"knn_density\.neighbors must be int, got bool"),
    (lambda: KNNOptions.from_mapping({"k": 3}), r"knn_density has no option k \(known: neighbors\)"),
])
def test_options_name_the_option_and_its_flag(options, message):
    with pytest.raises(ConfigError, match=message):
        options()


def test_options_keep_what_was_given():
    options = AIDOptions(iterations=20, damping=0)
    assert options.damping == 0.0 and isinstance(options.damping, float)
    assert options.given() == {"iterations": 20, "damping": 0.0}
    assert AIDOptions.from_mapping(options) is options
    with pytest.raises(ConfigError, match="given where aid options are expected"):
        AIDOptions.from_mapping(ITDOptions())


def test_every_option_has_its_flag_on_every_scoring_command():
    parser = build_parser()
    for command in ("influence", "validate", "lds"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        for spec in SCORERS.values():
            for f in dataclasses.fields(spec.options):
                assert spec.options.flag(f.name) in text, (command, f.name)


def test_study_tables_and_their_legacy_keys(tmp_path):
    new = tmp_path / "new.toml"
    new.write_text('[cleanse.aid]\nsolver = "cg"\niterations = 3\n[cleanse.itd]\nmemory_gb = 2.5\n')
    old = tmp_path / "old.toml"
    old.write_text('[cleanse]\naid_solver = "cg"\naid_iterations = 3\nitd_memory_gb = 2.5\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(new)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = load_config(old)
    assert len(caught) == 1 and caught[0].category is ConfigDeprecationWarning
    assert ("write itd_memory_gb as memory_gb in [cleanse.itd]; aid_solver as solver in [cleanse.aid]; "
            "aid_iterations as iterations in [cleanse.aid]") in str(caught[0].message)
    assert cfg == legacy
    assert cfg.cleanse.aid == AIDOptions(solver="cg", iterations=3)
    assert cfg.cleanse.scorer_options("itd") == {"memory_gb": 2.5}
    assert cfg.cleanse.scorer_options("random") == {}
    assert Config.from_dict(tomllib.loads(cfg.to_toml())) == cfg  # what a run directory stores reads back
    assert "[cleanse.aid]" in cfg.to_toml() and "aid_solver" not in cfg.to_toml()


@pytest.mark.parametrize("raw,message", [
    ({"cleanse": {"aid": {"tol": -1.0}}}, r"\[cleanse\.aid\]: aid\.tol must be a positive"),
    ({"cleanse": {"aid": {"sovler": "cg"}}}, r"\[cleanse\.aid\]: aid has no option sovler"),
    ({"cleanse": {"aid": "cg"}}, r"\[cleanse\.aid\] must be a table"),
    ({"cleanse": {"aid_solver": "cg", "aid": {"solver": "gmres"}}}, r"cleanse\.aid_solver and cleanse\.aid\.solver"),
])
def test_bad_study_tables_are_one_error_naming_them(raw, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(raw, source="study.toml")


def test_validate_checks_a_config_changed_in_python():
    cfg = Config()
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_d=-1.0))
    with pytest.raises(ConfigError, match=r"train\.lr_d = -1\.0 is out of range"):
        bad.validate()
    assert cfg.validate() is cfg


# -------------------------------------------------------------------------- scores
def test_harmful_first_breaks_ties_by_index():
    assert harmful_first([0.5, 2.0, 0.5, 2.0, -1.0]).tolist() == [1, 3, 0, 2, 4]


def test_scores_files_round_trip(tmp_path):
    path = tmp_path / "s.csv"
    scores = Scores.from_influence("fid", "itd", np.array([0.25, -1.5, 3.0]), keys=["a.png", "b.png", "c,d.png"],
                                   horizons={1: np.array([0.5, 0.0, -0.125])}, info={"seconds": 1.5})
    scores.save(path)
    # the file format is a contract: index,influence,harmfulness,key (fid: harmfulness = -influence)
    assert path.read_bytes() == (b"index,influence,harmfulness,key\r\n0,0.25,-0.25,a.png\r\n1,-1.5,1.5,b.png\r\n"
                                 b'2,3.0,-3.0,"c,d.png"\r\n')
    assert (tmp_path / "s.horizons.csv").read_bytes().splitlines()[1] == b"0,1,0.5,-0.5"
    back = Scores.load(path)
    assert (back.metric, back.method, back.keys) == ("fid", "itd", ["a.png", "b.png", "c,d.png"])
    np.testing.assert_array_equal(back.influence, scores.influence)
    np.testing.assert_array_equal(back.harmfulness, scores.harmfulness)
    assert back.info["seconds"] == 1.5 and back.info["horizons"] == [1] and back.path == path
    assert back.most_harmful(2) == [1, 0] and back.removal(0.7) == [1, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.horizons.csv", "s.json"]  # no temporaries


@pytest.mark.parametrize("sidecar", [b"not json", b"[1, 2]", b'{"run": 5}', b"\xff\xfe"])
def test_a_damaged_sidecar_is_one_error_naming_it(tmp_path, sidecar):
    path = tmp_path / "s.csv"
    Scores("all", "random", np.zeros(2), np.zeros(2)).save(path)
    path.with_suffix(".json").write_bytes(sidecar)
    with pytest.raises(GancleanseError, match=r"s\.json"):
        Scores.load(path)


@pytest.mark.parametrize("body", [b"index,influence,harmfulness,key\r\n0,1.0\r\n",
                                  b"index,influence,harmfulness,key\r\n1,1.0,1.0,a\r\n",
                                  b"index,influence,harmfulness,key\r\n0,nan,1.0,a\r\n",
                                  b"rank,key\r\n"])
def test_a_damaged_scores_file_is_one_error_naming_it(tmp_path, body):
    path = tmp_path / "s.csv"
    path.write_bytes(body)
    with pytest.raises(GancleanseError, match=r"s\.csv"):
        Scores.load(path)


# -------------------------------------------------------------------------- writes
def test_atomic_write_leaves_the_old_file_on_failure_and_never_touches_other_files(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    (tmp_path / "out.json.tmp").write_text("the user's own file")  # the name a naive writer would use
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write('{"a": 2')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "out.json.tmp").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.tmp"]
    previous = os.umask(0o022)
    try:
        write_json_atomic(target, {"a": 3})
    finally:
        os.umask(previous)
    assert json.loads(target.read_text()) == {"a": 3}
    assert os.stat(target).st_mode & 0o777 == 0o644  # as an ordinary file: readable by others

"""Config parsing: defaults, and errors that name the key and the file."""

from __future__ import annotations

import pytest

from gancleanse.config import Config, load_config
from gancleanse.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def test_empty_file_gives_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "")).resolved()
    assert cfg.data.name == "gaussian2d" and cfg.data.n_train == 10000
    assert cfg.model.dtype == "float64" and cfg.model.bias is False
    assert cfg.train.record_from_epoch == cfg.train.epochs - 1
    assert cfg.metric.n_samples == cfg.data.n_valid


@pytest.mark.parametrize("text,needle", [
    ("[train]\nepochz = 3\n", "unknown key train.epochz"),
    ("[trian]\nepochs = 3\n", "unknown section [trian]"),
    ("[train]\nepochs = \"3\"\n", "train.epochs must be int"),
    ("[train]\nepochs = 0\n", "train.epochs = 0 is out of range"),
    ("[train]\nlr_d = 0.0\n", "train.lr_d = 0.0 is out of range (must be > 0.0)"),
    ("[train]\noptimizer = \"rmsprop\"\n", "train.optimizer = 'rmsprop' is not one of"),
    ("[train]\nepochs = 5\nrecord_from_epoch = 5\n", "record_from_epoch = 5 must be smaller"),
    ("[model]\nbias = 1\n", "model.bias must be bool"),
    ("[cleanse]\nmetrics = [\"fid\", \"bogus\"]\n", "unknown metric 'bogus'"),
    ("[train\n", "not valid TOML"),
])
def test_bad_configs_name_the_key_and_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_ints_are_accepted_for_floats_and_toml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nlr_d = 1\nbetas = [0, 0.99]\n"))
    assert cfg.train.lr_d == 1.0 and isinstance(cfg.train.lr_d, float)
    again = load_config(write(tmp_path, cfg.resolved().to_toml()))
    assert again == cfg.resolved()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_from_dict_rejects_non_table():
    with pytest.raises(ConfigError, match=r"\[data\] must be a table"):
        Config.from_dict({"data": 3})

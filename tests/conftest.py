"""Shared helpers: tiny, fast runs built from config overrides."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import gancleanse as gc
from gancleanse.config import Config

torch.set_num_threads(1)


def tiny_config(**sections: dict[str, Any]) -> Config:
    """A very small 2D run (smooth activation, float64) with per-section overrides."""
    raw: dict[str, dict[str, Any]] = {
        "data": {"n_train": 60, "n_valid": 50, "n_test": 50, "seed": 3},
        "model": {"activation": "softplus", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
        "train": {"epochs": 2, "batch_size": 10, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 0,
                  "checkpoint_every": 4, "seed": 1},
        "metric": {"n_samples": 40},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.from_dict(raw)


def train_toml(directory: Path, config: str) -> Path:
    """A run trained by the command line from TOML text (``directory/cfg.toml``); returns its directory."""
    from gancleanse.cli import main

    (directory / "cfg.toml").write_text(config)
    assert main(["train", str(directory / "cfg.toml"), "--out", str(directory / "run"), "-q"]) == 0
    return directory / "run"


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts of strings (the tests' view of what a command wrote)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_run(tmp_path: Path, name: str = "run", **sections: dict[str, Any]) -> gc.Run:
    return gc.train(tiny_config(**sections), tmp_path / name, progress=False)


@pytest.fixture
def run_factory(tmp_path: Path):
    counter = iter(range(10_000))

    def factory(**sections: dict[str, Any]) -> gc.Run:
        return make_run(tmp_path, f"run{next(counter)}", **sections)

    return factory



@pytest.fixture(scope="session", autouse=True)
def sandbox_home(tmp_path_factory):
    """The test suite writes nothing outside its temporary directories.

    HOME, the XDG directories and matplotlib's config dir point into the session's temporary
    directory, and Ray's session files (RAY_TMPDIR) and other programs' temporary files
    (TMPDIR, for subprocesses) into a short directory under the system temp dir, created and
    removed here: Ray's Unix socket paths under RAY_TMPDIR must stay under 107 characters.
    Everything is restored afterwards.
    """
    base = tmp_path_factory.mktemp("sandbox")
    short = Path(tempfile.mkdtemp(prefix="gc"))  # e.g. /tmp/gcab12cd34; Ray adds ray/session_.../sockets/...
    paths = {
        "HOME": base / "home",
        "XDG_CACHE_HOME": base / "home" / ".cache",
        "XDG_CONFIG_HOME": base / "home" / ".config",
        "XDG_DATA_HOME": base / "home" / ".local" / "share",
        "XDG_STATE_HOME": base / "home" / ".local" / "state",
        "MPLCONFIGDIR": base / "home" / ".config" / "matplotlib",
        "RAY_TMPDIR": short,
        "TMPDIR": short / "tmp",
    }
    saved = {k: os.environ.get(k) for k in paths}
    for k, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(p)
    try:
        yield base / "home"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(short, ignore_errors=True)

"""Shared helpers: tiny, fast runs built from config overrides."""

from __future__ import annotations

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


def make_run(tmp_path: Path, name: str = "run", **sections: dict[str, Any]) -> gc.Run:
    return gc.train(tiny_config(**sections), tmp_path / name, progress=False)


@pytest.fixture
def run_factory(tmp_path: Path):
    counter = iter(range(10_000))

    def factory(**sections: dict[str, Any]) -> gc.Run:
        return make_run(tmp_path, f"run{next(counter)}", **sections)

    return factory

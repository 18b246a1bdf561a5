"""The study directory: its layout, its markers, and the provenance of what it stores.

What ``gancleanse.run`` is to a run directory, this module is to a study directory::

    DIR/study.json                  marks DIR as a gancleanse study (resume and --force trust only these)
    DIR/config.toml                 the study config
    DIR/seeds/seed_S/run/           the replicate's run directory
    DIR/seeds/seed_S/scores/*.csv   one SCORES.csv per scorer (gancleanse.scores)
    DIR/seeds/seed_S/check.json     the replicate's trust checks
    DIR/parts/KEY.json              one finished retrain each, naming its run and removed set
    DIR/parts/KEY.samples.safetensors  generated test samples of the first seed's retrains
    DIR/results.csv, summary.csv, summary.json, report.html

A stored file is reused only when it names the run (by its id) and the removed set (by a
digest) it was computed for, so a resumed study never takes a stale result for a new one; a stored
retrain also needs every metric the study evaluates (a study resumed with an evaluation-only metric
added to its config retrains the parts that lack it). Its JSON and config files are read through
``integrity.read_bounded``: regular files only, up to a cap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import Config
from ..errors import ConfigError, GancleanseError
from ..files import write_json_atomic
from ..integrity import UNRECORDED_MAX_BYTES, read_bounded

STUDY_MARKER = "study.json"
STUDY_KIND = "gancleanse study"
CHECK_FILE = "check.json"
JSON_MAX_BYTES = 64 * 2**20  # stored parts and checks are small; never parse a huge file


@dataclass(frozen=True)
class StudyDir:
    """Paths inside one study directory."""

    root: Path

    def seed_dir(self, seed: int) -> Path:
        return self.root / "seeds" / f"seed_{seed}"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    def part(self, key: str) -> Path:
        return self.parts / f"{key}.json"

    def samples(self, key: str) -> Path:
        return self.parts / f"{key}.samples.safetensors"

    def original(self, seed: int) -> Path:
        """The recorded training's own final metrics (the "before" of every row of ``seed``)."""
        return self.parts / f"seed{seed}_original.json"


def scores_path(seed_dir: Path, scorer: str) -> Path:
    """A replicate's SCORES.csv of one scorer (``method-variant``)."""
    return seed_dir / "scores" / f"{scorer}.csv"


def retrain_key(seed: int, scorer: str | None = None, rate: float = 0.0) -> str:
    """Name of one retrain in DIR/parts; removing nothing (``scorer`` None) is one replay per seed."""
    return f"seed{seed}_none" if scorer is None else f"seed{seed}_{scorer}_r{rate:g}"


def provenance(run_id: str, removed: Sequence[int] | None = None, retrain: str | None = None) -> dict[str, Any]:
    """What a stored retrain records about where it came from (None: the original, no retrain)."""
    if removed is None:
        return {"run_id": run_id}
    digest = hashlib.sha256(",".join(map(str, sorted(removed))).encode()).hexdigest()
    return {"run_id": run_id, "removed": digest, "retrain": retrain}


def read_json(path: Path) -> Any:
    """A small JSON file of the study (None when missing, unreadable or not JSON)."""
    try:
        return load_json(path) if path.is_file() else None
    except GancleanseError:
        return None


def load_json(path: Path) -> Any:
    """A small JSON file (never parse a huge one); unreadable: an error naming it as a stored retrain."""
    try:
        return json.loads(read_bounded(path, JSON_MAX_BYTES, "the cap on stored JSON").decode("utf-8"))
    except (OSError, ValueError) as e:
        raise GancleanseError(f"{path}: unreadable stored retrain ({e}); delete it to recompute it") from None


# ------------------------------------------------------------------------ the directory
def is_study_dir(path: Path) -> bool:
    rec = read_json(path / STUDY_MARKER)
    return isinstance(rec, dict) and rec.get("kind") == STUDY_KIND


def mark_study(out: Path) -> None:
    if not is_study_dir(out):
        write_json_atomic(out / STUDY_MARKER, {"kind": STUDY_KIND, "format": 1})


def _resumable(cfg: Config) -> Config:
    """What must not change for a study to resume: all but its evaluation-only metrics (a stored retrain without
    one of those is recomputed, ``part_matches``)."""
    return dataclasses.replace(cfg, cleanse=dataclasses.replace(cfg.cleanse, evaluate=[]))


def open_study_dir(out: Path, cfg: Config) -> None:
    """Create or resume the study directory ``out``: never a directory of something else; its config may differ
    from the stored one only in ``[cleanse] evaluate``."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory")
        if not is_study_dir(out) and any(p.name != ".lock" for p in out.iterdir()):  # a starting writer's lock
            raise ConfigError(f"--out {out} is a non-empty directory that is not a gancleanse study; "
                              "choose a new or empty directory")
        config_path = out / "config.toml"
        if config_path.is_file():
            try:
                text = read_bounded(config_path, UNRECORDED_MAX_BYTES["config.toml"], "the cap on config.toml")
                same = _resumable(Config.from_dict(tomllib.loads(text.decode("utf-8")))) == _resumable(cfg)
            except (ConfigError, OSError, ValueError):
                same = False
            if not same:
                raise ConfigError(f"{out} holds a study with a different config; use a new directory")
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------- stored results
def stored_run_id(path: Path) -> str | None:
    """The run a stored score file's JSON or a stored retrain names (None: unreadable, or none)."""
    rec = read_json(path)
    if not isinstance(rec, dict):
        return None
    return rec["run_id"] if "run_id" in rec else (rec.get("provenance") or {}).get("run_id")


def read_check(path: Path) -> dict[str, Any] | None:
    rec = read_json(path)
    ok = isinstance(rec, dict) and isinstance(rec.get("checks"), dict) and "run_id" in rec and "k" in rec
    return rec if ok else None


def evaluated(cfg: Config) -> list[str]:
    """Every metric a study evaluates on both splits: the scored ones, then the evaluation-only ones."""
    return [*cfg.cleanse.metrics, *cfg.cleanse.evaluate]


def _has_values(rec: Any, metric: str) -> bool:
    values = rec.get(metric) if isinstance(rec, dict) else None
    numbers = [values.get(k) for k in ("test", "valid")] if isinstance(values, dict) else [None]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)


def read_part(path: Path, metrics: Sequence[str]) -> dict[str, Any]:
    """A stored retrain's metric values: every metric of the study on both splits, finite."""
    rec = load_json(path)
    for m in metrics:
        if not _has_values(rec, m):
            raise GancleanseError(f"{path}: no finite test and valid values of {m}; delete it to recompute it")
    if not isinstance(rec.get("provenance"), dict):
        raise GancleanseError(f"{path}: does not name the run it came from; delete it to recompute it")
    return rec


def part_matches(path: Path, run_id: str, removed: Sequence[int] | None, cfg: Config) -> bool:
    """Whether a stored retrain belongs to this run and removed set (None: the original, no retrain) and holds
    every evaluation-only metric of the study: one stored before ``[cleanse] evaluate`` named it is recomputed."""
    rec = read_part(path, cfg.cleanse.metrics)
    expected = provenance(run_id, removed, cfg.cleanse.retrain)
    return (all(rec["provenance"].get(k) == v for k, v in expected.items())
            and all(_has_values(rec, m) for m in cfg.cleanse.evaluate))

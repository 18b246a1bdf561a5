"""``Scores``: one score per training instance, what every scorer returns, and its files.

On disk a ``Scores`` is three files, written and read only here:

- ``SCORES.csv``: ``index,influence,harmfulness,key``, one row per training instance;
- ``SCORES.json``: what produced it (metric, method, run, run id, time, solver facts, options);
- ``SCORES.horizons.csv`` (ITD with horizons): ``index,epochs_traced,influence,harmfulness``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GancleanseError
from .files import write_csv_atomic, write_json_atomic
from .specs import direction

if TYPE_CHECKING:
    from .run import Run

HEADER = ["index", "influence", "harmfulness", "key"]
SIDECAR_MAX_BYTES = 16 * 2**20  # a SCORES.json is a few kB; refuse to parse anything huge


@dataclass
class Scores:
    """One score per training instance. ``harmfulness > 0``: removal predicted to help; higher first.

    For ``itd``/``aid``, ``influence`` is the predicted V(without j) - V(with j) and harmfulness follows the metric's
    direction. For baselines, ``influence`` is the raw score (Isolation Forest ``score_samples``, distance to the k-th
    neighbour, the discriminator's logit, random draws) and ``harmfulness`` its removal order.
    """

    metric: str
    method: str
    influence: np.ndarray
    harmfulness: np.ndarray
    horizons: dict[int, np.ndarray] = field(default_factory=dict)  # epochs traced -> influence
    info: dict[str, Any] = field(default_factory=dict)
    keys: list[str] | None = None  # each instance's stable name (relative path or #i), by index
    path: Path | None = None  # the SCORES.csv it was loaded from

    @classmethod
    def from_influence(cls, metric: str, method: str, influence: np.ndarray, **kw: Any) -> "Scores":
        return cls(metric, method, influence, direction(metric) * influence, **kw)

    def ranking(self) -> np.ndarray:
        """Every index, most harmful first (``harmful_first``)."""
        return harmful_first(self.harmfulness)

    def most_harmful(self, k: int) -> list[int]:
        """Indices of the k instances to remove first."""
        return [int(i) for i in self.ranking()[:k]]

    def removal(self, rate: float) -> list[int]:
        """The ``floor(N * rate)`` most harmful instances."""
        return self.most_harmful(math.floor(len(self.harmfulness) * rate))

    def key_list(self) -> list[str]:
        return self.keys if self.keys is not None else [f"#{i}" for i in range(len(self.harmfulness))]

    def save(self, path: str | Path, run: "Run | None" = None) -> None:
        """SCORES.csv, its SCORES.json and (with horizons) SCORES.horizons.csv; the CSV last, so its presence means the
        whole set is written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = self.key_list()
        if len(keys) != len(self.influence):
            raise GancleanseError(f"{len(keys)} instance keys for {len(self.influence)} scores")
        run_info = {} if run is None else {"run": str(run.path.resolve()), "n_train": run.n_train}
        info: dict[str, Any] = {"metric": self.metric, "method": self.method, **run_info, **self.info}
        if self.horizons:
            hpath = path.with_name(path.stem + ".horizons.csv")
            sign = direction(self.metric)
            write_csv_atomic(hpath, ["index", "epochs_traced", "influence", "harmfulness"],
                             ([i, k, float(v), float(sign * v)] for k in sorted(self.horizons)
                              for i, v in enumerate(self.horizons[k])))
            info.update(horizons_file=hpath.name, horizons=sorted(self.horizons))
        write_json_atomic(path.with_suffix(".json"), info)
        write_csv_atomic(path, HEADER, ([i, float(inf), float(harm), key] for i, (inf, harm, key)
                                        in enumerate(zip(self.influence, self.harmfulness, keys))))

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        """A SCORES.csv (and its SCORES.json, if present) read back and checked: rows 0..N-1 in order, finite numbers;
        every problem is one error naming the file."""
        path = Path(path)
        if not path.is_file():
            raise GancleanseError(f"scores file not found: {path}")
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise GancleanseError(f"{path}: cannot read the scores ({e})") from None
        if not rows or rows[0][:3] != HEADER[:3]:
            raise GancleanseError(f"{path}: not a SCORES.csv (header must start with index,influence,harmfulness)")
        body = rows[1:]
        try:
            index = [int(r[0]) for r in body]
            influence = np.array([float(r[1]) for r in body])
            harm = np.array([float(r[2]) for r in body])
            keys = [r[3] for r in body] if rows[0][3:4] == ["key"] else None
        except (ValueError, IndexError) as e:
            raise GancleanseError(f"{path}: malformed row ({e}); delete it to recompute it") from None
        if index != list(range(len(body))):
            raise GancleanseError(f"{path}: rows must be indices 0..N-1 in order")
        if not (np.isfinite(influence).all() and np.isfinite(harm).all()):
            raise GancleanseError(f"{path}: non-finite scores; delete it to recompute it")
        info = read_sidecar(path.with_suffix(".json"))
        return cls(str(info.get("metric", "")), str(info.get("method", "")), influence, harm,
                   info=info, keys=keys, path=path)


def harmful_first(harmfulness: "np.ndarray | list[float]") -> np.ndarray:
    """Indices by harmfulness, highest first, ties broken by index: the one removal order of gancleanse."""
    return np.argsort(-np.asarray(harmfulness, dtype=np.float64), kind="stable")


def read_sidecar(path: Path) -> dict[str, Any]:
    """A SCORES.json as a dict ({} when absent); damaged or of the wrong shape: one error naming it."""
    if not path.exists():
        return {}
    try:
        if not path.is_file() or path.stat().st_size > SIDECAR_MAX_BYTES:
            raise GancleanseError(f"{path}: not a regular file of at most {SIDECAR_MAX_BYTES} bytes")
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise GancleanseError(f"{path}: not a readable SCORES.json ({e}); delete or rewrite it") from None
    if not isinstance(info, dict):
        raise GancleanseError(f"{path}: not a SCORES.json (a JSON object), got {type(info).__name__}")
    for name in ("run", "run_id", "metric", "method"):
        if name in info and not isinstance(info[name], str):
            raise GancleanseError(f"{path}: field {name!r} must be a string, got {info[name]!r}")
    return info

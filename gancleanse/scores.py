"""``Scores``: what every scorer returns, one value per training instance, and SCORES.csv."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import HIGHER_IS_BETTER
from .errors import GancleanseError


@dataclass
class Scores:
    """One score per training instance. ``harmfulness > 0``: removal predicted to help; higher first.

    For ``itd``/``aid``, ``influence`` is the predicted V(without j) - V(with j) and
    harmfulness follows the metric's direction. For baselines, ``influence`` is the raw score
    (Isolation Forest ``score_samples``, distance to the k-th neighbour, the discriminator's
    logit, random draws) and ``harmfulness`` its removal order.
    """

    metric: str
    method: str
    influence: np.ndarray
    harmfulness: np.ndarray
    horizons: dict[int, np.ndarray] = field(default_factory=dict)  # epochs traced -> influence
    info: dict[str, Any] = field(default_factory=dict)
    keys: list[str] | None = None  # each instance's stable name (relative path or #i), by index

    @classmethod
    def from_influence(cls, metric: str, method: str, influence: np.ndarray, **kw: Any) -> "Scores":
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        return cls(metric, method, influence, sign * influence, **kw)

    def most_harmful(self, k: int) -> list[int]:
        """Indices of the k instances to remove first (ties broken by index)."""
        return [int(i) for i in np.argsort(-self.harmfulness, kind="stable")[:k]]

    def to_csv(self, path: str | Path) -> None:
        write_scores_csv(path, self.influence, self.harmfulness, self.keys)

    def horizons_to_csv(self, path: str | Path) -> None:
        """Long format: index, epochs_traced, influence, harmfulness."""
        sign = 1.0 if HIGHER_IS_BETTER[self.metric] else -1.0
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "epochs_traced", "influence", "harmfulness"])
            for k in sorted(self.horizons):
                for i, v in enumerate(self.horizons[k]):
                    w.writerow([i, k, repr(float(v)), repr(float(sign * v))])
        tmp.replace(path)


def write_scores_csv(path: str | Path, influence: np.ndarray, harmfulness: np.ndarray,
                     keys: Sequence[str] | None = None) -> None:
    """SCORES.csv: ``index,influence,harmfulness,key``, written to a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = keys if keys is not None else [f"#{i}" for i in range(len(influence))]
    if len(keys) != len(influence):
        raise GancleanseError(f"{len(keys)} instance keys for {len(influence)} scores")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "influence", "harmfulness", "key"])
        for i, (inf, harm, key) in enumerate(zip(influence, harmfulness, keys)):
            w.writerow([i, repr(float(inf)), repr(float(harm)), key])
    tmp.replace(path)

"""LDS, the linear datamodeling score: do a scorer's values add up to the effect of removing a set?

Draw S random subsets, each a fraction F of the training split (seeded), retrain the recorded
window without each, and correlate (Spearman) the predicted effect of the removal, the sum of the
scorer's values over the subset, with the actual change of the metric. Both sides are taken in the
"improvement" direction (harmfulness, and the change signed by the metric's direction), so every
scorer is read alike: for ITD and AID this is the correlation of the summed influence with the
actual change. An oracle scores 1; a random scorer about 0. The interval is a percentile bootstrap.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

from ..errors import GancleanseError
from ..files import write_json_atomic
from ..influence import score, variant_arguments, variants
from ..specs import direction, metric_spec, scorer_spec
from .trust import bootstrap_interval, seconds_per_epoch
from .validate import removal_changes

if TYPE_CHECKING:
    from ..run import Run
    from ..scores import Scores


def random_subsets(n: int, count: int, fraction: float, seed: int) -> list[list[int]]:
    """``count`` subsets of floor(n * fraction) distinct training indices each (seeded)."""
    if not 0.0 < fraction < 1.0:
        raise GancleanseError(f"--fraction must be between 0 and 1 (exclusive), got {fraction}")
    if count < 3:
        raise GancleanseError(f"--subsets must be at least 3 (a rank correlation needs them), got {count}")
    size = math.floor(n * fraction)
    if size < 1:
        raise GancleanseError(f"--fraction {fraction} of {n} training instances removes none")
    rng = np.random.default_rng(seed)
    return [sorted(int(i) for i in rng.choice(n, size=size, replace=False)) for _ in range(count)]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(spearmanr(x, y).statistic)


def lds_statistic(predicted: Sequence[float], actual: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """Spearman correlation of predicted and actual improvement, with its 90% bootstrap interval."""
    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"lds": None, "interval": None}
    return {"lds": _spearman(x, y), "interval": bootstrap_interval(x, y, _spearman, seed)}


def lds(run: "Run", rankings: Sequence["Scores"], metric: str, *, subsets: int = 50, fraction: float = 0.1,
        seed: int = 0, names: Sequence[str] | None = None, batched: bool | None = None,
        progress: bool = False) -> dict[str, Any]:
    """LDS of each ranking (labelled ``names``) against retraining without ``subsets`` random fractions."""
    started = time.perf_counter()
    removals = random_subsets(run.n_train, subsets, fraction, seed)
    changes = removal_changes(run, removals, [metric], batched=batched, progress=progress)[metric]
    seconds = time.perf_counter() - started
    benefit = [direction(metric) * c for c in changes]
    if names is None:
        names = [s.method + (f"-{s.info['features']}" if "features" in s.info else "") for s in rankings]
    if len(set(names)) != len(rankings):
        raise GancleanseError(f"LDS needs one distinct name per ranking, got {list(names)}")
    results = {}
    for s, name in zip(rankings, names):
        predicted = [float(np.sum(s.harmfulness[r])) for r in removals]
        results[name] = {"method": s.method, **lds_statistic(predicted, benefit, seed), "predicted": predicted}
    epoch = seconds_per_epoch(run)
    return {"metric": metric, "subsets": subsets, "fraction": fraction, "n_removed": len(removals[0]),
            "seed": seed, "run_id": run.id, "actual": changes, "removed": removals, "scorers": results,
            "retrain_seconds": seconds, "retrain_cost_epochs": seconds / epoch if epoch else None}


def compare_methods(run: "Run", metric: str, methods: Sequence[str], *, subsets: int = 50,
                    fraction: float = 0.1, seed: int = 0, out: Path | None = None, progress: bool = True,
                    options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """LDS of every variant of ``methods`` on one run (``gancleanse.api.lds``; feature scorers on every feature
    space of the run). ``options``: per method, its options (dataclass or mapping), recorded in the result."""
    metric_spec(metric)
    options = dict(options or {})
    if unknown := [method for method in options if method not in methods]:
        raise GancleanseError(f"options for {unknown[0]}, which the compared methods do not include")
    typed = {m: scorer_spec(m).options.from_mapping(o) for m, o in options.items()}
    random_subsets(run.n_train, subsets, fraction, seed)  # bad sizes fail before any scoring
    rankings = [score(run, method, seed=seed, progress=progress, options=typed.get(method),
                      **variant_arguments(method, v))
                for method in dict.fromkeys(methods) for v in variants(method, [metric], run.feature_space)]
    result = lds(run, rankings, metric, subsets=subsets, fraction=fraction, seed=seed, progress=progress)
    result["scorer_seconds"] = {k: s.info.get("seconds") for k, s in zip(result["scorers"], rankings)}
    result["options"] = {m: o.given() for m, o in typed.items() if o.given()}
    if metric_spec(metric).needs == "features":
        from ..features import metric_features

        result["metric_features"] = metric_features(run)
    if out is not None:
        write_json_atomic(out, result)
    return result

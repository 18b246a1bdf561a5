"""The trust check: does this run's ranking agree with real retraining?

An influence estimate is an exact derivative, yet its ranking can disagree with retraining
(on ReLU networks, removing an instance flips activation patterns; AID assumes a stationary
point). A user cannot see which case they are in, so every scoring can carry a small check:
retrain the recorded window without each of K instances (half from the ranking's extremes,
half uniformly at random, seeded), and compare the ranking with the actual changes:

- Kendall tau and Pearson between harmfulness and the actual benefit of removal (the metric's
  improvement; for ``itd``/``aid`` the same tau as between estimated and actual change), each
  with a 90% percentile-bootstrap interval over the K pairs.
- ``trusted`` when tau's interval has its lower bound at least ``TRUST_THRESHOLD``; otherwise
  a one-line ``UntrustedScoresWarning`` says what it means and what to try.
- its cost, in seconds and in training epochs of this run (measured on its window).

Several rankings of one run share their retrains (one per distinct instance, evaluated on
every metric needed), as a study checks every scorer of a replicate.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy.stats import kendalltau, pearsonr

from ..errors import GancleanseError, GancleanseWarning
from ..influence import score
from ..specs import direction, scorer_spec
from .validate import choose_instances, removal_changes

if TYPE_CHECKING:
    from ..run import Run
    from ..scores import Scores

TRUST_THRESHOLD = 0.5  # lower bound of tau's 90% interval below which a ranking is flagged
CONFIDENCE = 0.90
BOOTSTRAP = 1000


class UntrustedScoresWarning(GancleanseWarning):
    """The trust check found the ranking weakly related to retraining."""


def bootstrap_interval(x: np.ndarray, y: np.ndarray, statistic, seed: int,  # noqa: ANN001
                       n: int = BOOTSTRAP, confidence: float = CONFIDENCE) -> list[float] | None:
    """Percentile-bootstrap interval of ``statistic(x, y)`` over resampled pairs (None if undefined)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
            v = statistic(x[pick], y[pick])
            if math.isfinite(v):
                values.append(v)
    if len(values) < n // 2:
        return None
    tail = (1.0 - confidence) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def _tau(x: np.ndarray, y: np.ndarray) -> float:
    return float(kendalltau(x, y).statistic)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(pearsonr(x, y).statistic)


def summarize_check(harmfulness: Sequence[float], benefit: Sequence[float], seed: int) -> dict[str, Any]:
    """Tau and Pearson of harmfulness vs actual benefit, with their bootstrap intervals."""
    x, y = np.asarray(harmfulness, dtype=np.float64), np.asarray(benefit, dtype=np.float64)
    defined = np.ptp(x) > 0 and np.ptp(y) > 0
    tau = _tau(x, y) if defined else None
    return {"kendall_tau": tau if tau is not None and math.isfinite(tau) else None,
            "kendall_tau_interval": bootstrap_interval(x, y, _tau, seed) if defined else None,
            "pearson": _pearson(x, y) if defined else None,
            "pearson_interval": bootstrap_interval(x, y, _pearson, seed + 1) if defined else None,
            "confidence": CONFIDENCE, "bootstrap": BOOTSTRAP}


def check_size(k: int, n: int) -> None:
    if not (k == 0 or 2 <= k <= n):
        raise GancleanseError(f"check must be 0 (off) or between 2 and the training size {n}, got {k}")


def check_instances(harmfulness: np.ndarray, k: int, seed: int) -> list[int]:
    """K instances: K/4 most harmful, K/4 least harmful, the rest uniformly at random (seeded)."""
    check_size(k, len(harmfulness))
    return choose_instances(np.asarray(harmfulness), k, seed, extremes=True)


def trust_checks(run: "Run", rankings: Sequence["Scores"], metrics: Sequence[str], k: int, *, seed: int = 0,
                 batched: bool | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """The trust check of each ranking, against the change of the matching metric. Instances are chosen
    per ranking (its extremes) with a random half shared by all (the same seed); each is retrained once."""
    if len(rankings) != len(metrics):
        raise GancleanseError("one metric per ranking is needed")
    started = time.perf_counter()
    chosen = [check_instances(s.harmfulness, k, seed) for s in rankings]
    union = sorted(set().union(*chosen))
    deltas = removal_changes(run, [[j] for j in union], metrics, batched=batched, progress=progress)
    changes = {m: dict(zip(union, d)) for m, d in deltas.items()}
    seconds, epoch_seconds = time.perf_counter() - started, seconds_per_epoch(run)
    results = []
    for s, metric, idx in zip(rankings, metrics, chosen):
        actual = [changes[metric][j] for j in idx]
        harm = [float(s.harmfulness[j]) for j in idx]
        stats = summarize_check(harm, [direction(metric) * a for a in actual], seed)
        interval = stats["kendall_tau_interval"]
        trusted = interval is not None and interval[0] >= TRUST_THRESHOLD
        results.append({"method": s.method, "metric": metric, "k": k, "seed": seed, **stats, "trusted": trusted,
                        "threshold": TRUST_THRESHOLD, "instances": idx, "harmfulness": harm, "actual": actual,
                        "retrains": len(union), "seconds": seconds,
                        "cost_epochs": seconds / epoch_seconds if epoch_seconds else None})
    return results


def seconds_per_epoch(run: "Run") -> float | None:
    """Wall time of one training epoch of this run, measured on its recorded window."""
    window_steps = run.final_step - run.window_start
    spent = run.meta.get("seconds", {}).get("window_steps")
    return spent / window_steps * run.steps_per_epoch if spent and window_steps > 0 else None


def describe(check: dict[str, Any]) -> str:
    """One line for the terminal."""
    def fmt(v: float | None, iv: list[float] | None) -> str:
        return "undefined" if v is None else f"{v:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")

    cost = f"{check['cost_epochs']:.1f} training epochs, " if check.get("cost_epochs") is not None else ""
    return (f"trust check of {check['method']} on {check['metric']} ({check['k']} retrains; {cost}"
            f"{check['seconds']:.1f} s): Kendall tau {fmt(check['kendall_tau'], check['kendall_tau_interval'])}, "
            f"Pearson {fmt(check['pearson'], check['pearson_interval'])} "
            f"({int(check['confidence'] * 100)}% intervals)")


def flagged(check: dict[str, Any]) -> bool:
    """An estimator (itd, aid) whose check failed. Baselines do not claim to predict single
    removals, so their check is a reference shown beside them, never a warning."""
    return not check["trusted"] and scorer_spec(check["method"]).uses == "metric"


def warning_text(check: dict[str, Any]) -> str | None:
    """What an untrusted check means and what to try (None unless ``flagged``)."""
    if not flagged(check):
        return None
    iv = check["kendall_tau_interval"]
    where = "undefined" if iv is None else f"lower bound {iv[0]:.2f}"
    return (f"{check['method']} ranking on {check['metric']} agrees weakly with retraining (Kendall tau "
            f"{where}, below {TRUST_THRESHOLD}): removing data by it may not help. Try smooth activations "
            "(softplus, elu), a shorter traced window (a later record_from_epoch), or a larger --check")


def checked_scores(run: "Run", method: str, metric: str, *, features: str | None = None, seed: int = 0,
                   check: int = 0, progress: bool = True, options: Any = None) -> "Scores":
    """Scores of every training instance (``gancleanse.influence.score``) and, with ``check`` > 0, their
    trust check in ``scores.info["check"]``; an ``UntrustedScoresWarning`` when the ranking is not reliable."""
    check_size(check, run.n_train)  # before the scoring, which may take long
    scores = score(run, method, metric, features=features, seed=seed, progress=progress, options=options)
    if check:
        scores.info["check"] = trust_checks(run, [scores], [scores.metric], check, seed=seed, progress=progress)[0]
        if text := warning_text(scores.info["check"]):
            warnings.warn(text, UntrustedScoresWarning, stacklevel=3)
    return scores

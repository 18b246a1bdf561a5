"""Validation of influence estimates against real counterfactual retraining (the paper's protocol).

For K instances (seeded; optionally half from the extremes of the estimate), retrain the
recorded window without each one and compare the actual metric change with the estimate:
Kendall tau, Pearson, and the Jaccard index of the 5% most negative + 5% most positive
instances, beside its analytic value for a random estimator. Each retrain is stored as
soon as it finishes (``OUT.parts/``), so an interrupted validation resumes where it stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy.stats import kendalltau, pearsonr

from ..errors import GancleanseError
from ..run import write_json_atomic
from .executor import run_tasks

if TYPE_CHECKING:
    from ..run import Run

JACCARD_FRACTION = 0.05  # per side: the paper's jaccard_size = 0.1 in total


def extreme_set(values: Sequence[float], per_side: int) -> set[int]:
    """Positions of the ``per_side`` most negative and ``per_side`` most positive values."""
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    return set(order[:per_side].tolist()) | set(order[len(order) - per_side:].tolist())


def jaccard_of_extremes(estimated: Sequence[float], actual: Sequence[float],
                        fraction: float = JACCARD_FRACTION) -> float:
    per_side = max(1, int(round(len(actual) * fraction)))
    a, b = extreme_set(actual, per_side), extreme_set(estimated, per_side)
    return len(a & b) / len(a | b)


def random_jaccard(n: int, fraction: float = JACCARD_FRACTION) -> float:
    """Expected Jaccard index of two independent uniformly random m-subsets of n (m = 2 * per side).

    The overlap k is hypergeometric; Jaccard = k / (2m - k). For n = 200, m = 20: 0.0538.
    """
    per_side = max(1, int(round(n * fraction)))
    m = min(2 * per_side, n)
    total = math.comb(n, m)
    return sum(k / (2 * m - k) * math.comb(m, k) * math.comb(n - m, m - k) / total
               for k in range(0, m + 1) if 2 * m - k > 0)


def accuracy(estimated: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    est, act = np.asarray(estimated, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    return {
        "kendall_tau": float(kendalltau(est, act).statistic),
        "pearson": float(pearsonr(est, act).statistic),
        "jaccard": jaccard_of_extremes(est, act),
        "random_jaccard": random_jaccard(len(act)),
    }


def choose_instances(estimate: np.ndarray, k: int, seed: int, extremes: bool) -> list[int]:
    """K distinct training indices: uniformly at random, or half from the estimate's extremes."""
    n = len(estimate)
    if not 2 <= k <= n:
        raise GancleanseError(f"--instances must be between 2 and the training size {n}, got {k}")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    if extremes:
        order = np.argsort(estimate, kind="stable")
        half = k // 2
        chosen = order[:half // 2].tolist() + order[n - (half - half // 2):].tolist()
    rest = np.setdiff1d(np.arange(n), chosen)
    chosen += rng.choice(rest, size=k - len(chosen), replace=False).tolist()
    return sorted(int(i) for i in chosen)


def counterfactual_delta(run: "Run", index: int, metric: str, from_epoch: int | None) -> float:
    """One retrain without one instance (a top-level function so that process pools can pickle it)."""
    from ..api import counterfactual

    return float(counterfactual(run, [index], metric, from_epoch=from_epoch)["delta"])


def retrain_all(run: "Run", jobs: list[tuple[int, int | None]], metric: str, parts: Path, *,
                executor: str, workers: int, progress: bool) -> dict[tuple[int, int | None], float]:
    """Actual deltas for (instance, from_epoch) pairs, reusing those already stored in ``parts``."""
    parts.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[int, int | None], float] = {}
    for f in parts.glob("*.json"):
        rec = json.loads(f.read_text())
        if rec.get("metric") == metric:
            done[(rec["index"], rec["from_epoch"])] = rec["delta"]
    todo = [((j, e), (run, j, metric, e)) for j, e in jobs if (j, e) not in done]
    for (j, e), delta in run_tasks(counterfactual_delta, todo, executor=executor, workers=workers,
                                   progress=progress, desc="retrain"):
        done[(j, e)] = delta
        write_json_atomic(parts / f"{metric}_i{j}_e{'window' if e is None else e}.json",
                          {"index": j, "from_epoch": e, "metric": metric, "delta": delta})
    return {key: done[key] for key in jobs}


def scatter_plot(path: Path, panels: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, p in zip(axes[0], panels):
        est, act = np.asarray(p["estimated"]), np.asarray(p["actual"])
        ax.scatter(act, est, s=14, alpha=0.8)
        lo, hi = float(min(est.min(), act.min())), float(max(est.max(), act.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("actual change (retraining)")
        ax.set_ylabel("estimated change")
        ax.set_title(f"{p['label']}\ntau {p['kendall_tau']:.2f}  r {p['pearson']:.2f}  J {p['jaccard']:.2f}",
                     fontsize=9)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

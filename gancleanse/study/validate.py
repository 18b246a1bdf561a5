"""Validation of influence estimates against real counterfactual retraining (the paper's protocol).

For K instances (seeded; optionally half from the extremes of the estimate), retrain the
recorded window without each one and compare the actual metric change with the estimate:
Kendall tau, Pearson, and the Jaccard index of the 5% most negative + 5% most positive
instances, beside its analytic value for a random estimator. Each retrain is stored as
soon as it finishes (``OUT.parts/``), so an interrupted validation resumes where it stopped.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from scipy.stats import kendalltau, pearsonr

from ..device import local_workers
from ..errors import GancleanseError
from ..files import atomic_write, write_json_atomic
from ..influence import score
from ..locks import DirectoryLock
from ..progress import current_job
from ..specs import metric_spec
from .executor import run_tasks
from .layout import load_json

if TYPE_CHECKING:
    from ..metrics import Metric
    from ..run import Run

JACCARD_FRACTION = 0.05  # per side: the paper's jaccard_size = 0.1 in total
RETRAIN_CHUNK = 64  # retrains per part handed to a worker (and kept when a validation is resumable)


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
    """Expected Jaccard index of two independent uniformly random m-subsets of n (m = 2 * per side):
    the overlap k is hypergeometric, Jaccard = k / (2m - k). For n = 200, m = 20: 0.0538."""
    per_side = max(1, int(round(n * fraction)))
    m = min(2 * per_side, n)
    total = math.comb(n, m)
    return sum(k / (2 * m - k) * math.comb(m, k) * math.comb(n - m, m - k) / total
               for k in range(0, m + 1) if 2 * m - k > 0)


def _defined(value: float) -> float | None:
    """A correlation, or None where it is undefined (a constant side)."""
    return float(value) if math.isfinite(value) else None


def accuracy(estimated: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    est, act = np.asarray(estimated, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    return {"kendall_tau": _defined(kendalltau(est, act).statistic),
            "pearson": _defined(pearsonr(est, act).statistic) if np.ptp(est) > 0 and np.ptp(act) > 0 else None,
            "jaccard": jaccard_of_extremes(est, act), "random_jaccard": random_jaccard(len(act))}


def choose_instances(estimate: np.ndarray, k: int, seed: int, extremes: bool) -> list[int]:
    """K distinct training indices: uniformly at random, or half from the estimate's extremes."""
    n = len(estimate)
    if not 2 <= k <= n:
        raise GancleanseError(f"--instances must be between 2 and the training size {n}, got {k}")
    chosen: list[int] = []
    if extremes:
        order = np.argsort(estimate, kind="stable")
        half = k // 2
        chosen = order[:half // 2].tolist() + order[n - (half - half // 2):].tolist()
    rest = np.setdiff1d(np.arange(n), chosen)
    chosen += np.random.default_rng(seed).choice(rest, size=k - len(chosen), replace=False).tolist()
    return sorted(int(i) for i in chosen)


def counterfactual_deltas(run: "Run", indices: list[int], metrics: Sequence[str], from_epoch: int | None,
                          batched: bool | None) -> tuple[dict[str, list[float]], float]:
    """``removal_changes`` of each one instance from ``from_epoch`` (None: the window), and the seconds they took;
    top level, to pickle."""
    tic = time.perf_counter()
    current_job().stage("retrain")
    start = run.window_start if from_epoch is None else run.epoch_start_step(from_epoch)
    deltas = removal_changes(run, [[j] for j in indices], metrics, start=start, batched=batched)
    return deltas, time.perf_counter() - tic


_FINAL_VALUES: dict[tuple, float] = {}  # (run id, split, metric, chunk size, device) -> the final state's value
_FINAL_VALUES_SIZE = 64


def final_value(run: "Run", metric: str, split: str, evaluator: "Metric") -> float:
    """The metric of the run's recorded final state: evaluated once per process, as every retrain job of a run
    (one per instance when retrains take minutes) compares with it. Keyed by the run's seal, which hashes every
    file of the run."""
    key = (run.id, split, metric, evaluator.chunk_size, str(run.device))
    if key not in _FINAL_VALUES:
        if len(_FINAL_VALUES) >= _FINAL_VALUES_SIZE:
            _FINAL_VALUES.pop(next(iter(_FINAL_VALUES)))
        _FINAL_VALUES[key] = evaluator.value(run.final_state())
    return _FINAL_VALUES[key]


def retrained_values(run: "Run", removals: Sequence[Sequence[int]], metrics: Sequence[str], *,
                     split: str = "valid", start: int | None = None, batched: bool | None = None,
                     progress: bool = False) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each metric on ``split`` before (the recorded final state) and after retraining without each removal set
    from ``start`` (default: the window start), forked off one shared replay in groups that fit in memory
    (``retrain.retrain_groups``; ``batched``: one vmapped step per group; None: where that pays)."""
    weights = torch.ones(len(removals), run.n_train, dtype=run.dtype)
    for k, removed in enumerate(removals):
        weights[k, list(removed)] = 0.0
    return weighted_values(run, weights, metrics, split=split, start=start, batched=batched, progress=progress)


def weighted_values(run: "Run", weights: torch.Tensor, metrics: Sequence[str], *, split: str = "valid",
                    start: int | None = None, batched: bool | None = None,
                    progress: bool = False) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``retrained_values`` for any instance weights (K, n_train): a removal is a weight 0, a down-weighting by
    a fraction f (a finite difference of the metric in the weights) is 1 - f."""
    from ..metrics import make_metric
    from ..metrics import values as metric_values
    from ..training.retrain import retrain_groups

    if weights.ndim != 2 or weights.shape[1] != run.n_train:
        raise GancleanseError(f"instance weights must be (retrains, {run.n_train}), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise GancleanseError("instance weights must be finite")
    evaluators = {m: make_metric(m, run, split) for m in dict.fromkeys(metrics)}
    before = {m: final_value(run, m, split, ev) for m, ev in evaluators.items()}
    values: dict[str, list[float | None]] = {m: [None] * len(weights) for m in evaluators}
    for rows, states in retrain_groups(run, weights, run.window_start if start is None else start,
                                       vmap_steps=batched, progress=progress, on_step=current_job().step):
        for k, state in zip(rows, states):
            for m, v in zip(evaluators, metric_values(list(evaluators.values()), state)):
                values[m][k] = v
    return before, values  # type: ignore[return-value]  (every entry filled)


def removal_changes(run: "Run", removals: Sequence[Sequence[int]], metrics: Sequence[str], *,
                    start: int | None = None, batched: bool | None = None,
                    progress: bool = False) -> dict[str, list[float]]:
    """Actual V(without the set) - V(with it) on the validation split, per removal set and metric."""
    before, after = retrained_values(run, removals, metrics, start=start, batched=batched, progress=progress)
    return {m: [a - before[m] for a in values] for m, values in after.items()}


def chunks(jobs: list[tuple[int, int | None]], workers: int, most: int = RETRAIN_CHUNK
           ) -> list[tuple[int | None, list[int]]]:
    """(from_epoch, instances) groups of at most ``most``, at least one per worker."""
    by_epoch: dict[int | None, list[int]] = {}
    for j, e in jobs:
        by_epoch.setdefault(e, []).append(j)
    out = []
    for e, js in by_epoch.items():
        size = max(1, min(most, math.ceil(len(js) / workers)))
        out += [(e, js[i:i + size]) for i in range(0, len(js), size)]
    return out


Retrain = tuple[int, "int | None"]  # (instance, from_epoch: None for the window start)


def retrain_all(run: "Run", jobs: list[Retrain], metrics: Sequence[str], parts: Path, *,
                executor: str, workers: int, progress: bool, batched: bool | None = False,
                chunk: int = RETRAIN_CHUNK) -> dict[str, dict[Retrain, float]]:
    """Per metric, the actual deltas for (instance, from_epoch) pairs, reusing those stored in ``parts`` (a file
    per retrain and metric) that name this run (their seal): those of another run, or of an earlier training at
    the same path, are recomputed and overwritten; one not as this code writes it is an error naming it.
    ``chunk``: the most retrains of one job (they share a replay up to their forks; its parts are written when
    it ends, so a killed run loses up to one job per worker: keep it small when retrains take minutes)."""
    metrics = list(dict.fromkeys(metrics))
    workers = local_workers(run.device, workers, executor)
    parts.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(parts, "validation"):
        done = stored_retrains(run, metrics, parts)
        tasks = retrain_tasks(run, jobs, metrics, done, workers, chunk, batched)
        for key, result in run_tasks(counterfactual_deltas, tasks, executor=executor, workers=workers,
                                     progress=progress, desc="retrain"):
            store_retrains(run, parts, metrics, key, result, done)
    return {m: {key: done[m][key]["delta"] for key in jobs} for m in metrics}


def stored_retrains(run: "Run", metrics: Sequence[str], parts: Path) -> dict[str, dict[Retrain, dict[str, Any]]]:
    """Per metric, the retrains of ``run`` stored in ``parts`` (their records: delta, seconds, ...)."""
    stored = {m: [read_part(f) for f in sorted(parts.glob(f"{m}_i*_e*.json"))] for m in metrics}
    return {m: {(r["index"], r["from_epoch"]): r for r in records if r["run_id"] == run.id and r["metric"] == m}
            for m, records in stored.items()}


def retrain_tasks(run: "Run", jobs: list[Retrain], metrics: Sequence[str], done: dict[str, dict[Retrain, Any]],
                  workers: int, chunk: int, batched: bool | None) -> list[tuple[tuple, tuple]]:
    """``run_tasks`` tasks of ``counterfactual_deltas`` for the ``jobs`` not ``done`` on every metric, keyed
    ``(from_epoch, instances)``, at most ``chunk`` retrains each."""
    todo = chunks([(j, e) for j, e in jobs if any((j, e) not in done[m] for m in metrics)], workers, chunk)
    return [((e, tuple(js)), (run, js, list(metrics), e, batched)) for e, js in todo]


def store_retrains(run: "Run", parts: Path, metrics: Sequence[str], key: tuple,
                   result: tuple[dict[str, list[float]], float], done: dict[str, dict[Retrain, Any]]) -> None:
    """Write a finished ``retrain_tasks`` task's parts (one per retrain and metric, each with its share of the
    task's seconds) and add them to ``done``."""
    e, js = key
    deltas, seconds = result
    for m in metrics:
        for j, delta in zip(js, deltas[m]):
            record = {"index": j, "from_epoch": e, "metric": m, "delta": delta, "seconds": seconds / len(js),
                      "run_id": run.id, "run": str(run.path.resolve())}
            write_json_atomic(parts / f"{m}_i{j}_e{'window' if e is None else e}.json", record)
            done[m][(j, e)] = record


def read_part(path: Path) -> dict[str, Any]:
    """One stored retrain, checked: the fields this code writes, a finite delta."""
    rec = load_json(path)
    ok = (isinstance(rec, dict) and isinstance(rec.get("index"), int) and isinstance(rec.get("metric"), str)
          and isinstance(rec.get("run_id"), str)
          and (rec.get("from_epoch") is None or isinstance(rec["from_epoch"], int))
          and isinstance(rec.get("delta"), (int, float)) and not isinstance(rec.get("delta"), bool)
          and (rec.get("seconds") is None
               or (isinstance(rec["seconds"], (int, float)) and not isinstance(rec["seconds"], bool))))
    if not ok:
        raise GancleanseError(f"{path}: not a stored retrain of this gancleanse version (fields index, from_epoch, "
                              "metric, delta, run_id); delete it to recompute it")
    if not math.isfinite(rec["delta"]):
        raise GancleanseError(f"{path}: stored retrain delta is {rec['delta']}; delete it to recompute it")
    return rec


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


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
        ax.set(xlabel="actual change (retraining)", ylabel="estimated change")
        ax.set_title(f"{p['label']}\ntau {_fmt(p['kendall_tau'])}  r {_fmt(p['pearson'])}  J {p['jaccard']:.2f}",
                     fontsize=9)
        ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- the services
def counterfactual_changes(run: "Run", removals: Sequence[Sequence[int]], metric: str, *, start: int,
                           split: str = "valid", batched: bool | None = None,
                           progress: bool = False) -> list[dict[str, Any]]:
    """Retrain the recorded trajectory from step ``start`` without each removal set (one shared replay,
    each retrain forked where it first differs) and report the metric before and after."""
    before, after = retrained_values(run, removals, [metric], split=split, start=start, batched=batched,
                                     progress=progress)
    return [{"metric": metric, "removed": list(r), "before": before[metric], "after": a, "delta": a - before[metric]}
            for r, a in zip(removals, after[metric])]


def validate(run: "Run", metric: str, method: str, instances: int, *, seed: int = 0, extremes: bool = False,
             horizons: bool = False, executor: str = "local", workers: int = 1, out: Path | None = None,
             progress: bool = True, options: Any = None, batched: bool = False) -> dict[str, Any]:
    """Compare estimated with actual (retrained) metric changes of ``instances`` instances (see ``api.validate``)."""
    if horizons and method != "itd":
        raise GancleanseError("--horizons needs --method itd (one backward sweep gives every horizon)")
    scores = score(run, method, metric, progress=progress, options=options)
    chosen = choose_instances(scores.influence, instances, seed, extremes)
    final_epoch, first_epoch = run.final_step // run.steps_per_epoch, run.window_start // run.steps_per_epoch
    traced = sorted(scores.horizons) if horizons else [final_epoch - first_epoch]
    jobs = [(j, final_epoch - k) for k in traced for j in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        parts = out.with_suffix(".parts") if out else Path(tmp)
        actual = retrain_all(run, jobs, [metric], parts, executor=executor, workers=workers,
                             progress=progress, batched=batched)[metric]

    def panel(k: int) -> dict[str, Any]:
        estimate = scores.horizons[k] if k in scores.horizons else scores.influence
        e = [float(estimate[j]) for j in chosen]
        a = [actual[(j, final_epoch - k)] for j in chosen]
        return {"epochs_traced": k, **accuracy(e, a), "estimated": e, "actual": a}

    main = panel(traced[-1])
    result: dict[str, Any] = {
        "metric": metric, "method": method, "run": str(run.path), "instances": chosen, "n_instances": len(chosen),
        "seed": seed, "extremes": extremes,
        **{k: main[k] for k in ("kendall_tau", "pearson", "jaccard", "random_jaccard", "epochs_traced")},
        "estimated": main["estimated"], "actual": main["actual"], "estimate_info": scores.info}
    if metric_spec(metric).needs == "features":
        from ..features import metric_features

        result["metric_features"] = metric_features(run)
    if horizons:
        result["horizons"] = {str(k): panel(k) for k in traced}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        panels = [dict(p, label=f"{p['epochs_traced']} epoch(s) traced")
                  for p in (result["horizons"].values() if horizons else [main])]
        plot = out.with_suffix(".png")
        scatter_plot(plot, panels, f"{method} influence on {metric}: estimate vs retraining")
        result["plot"] = plot.name
        try:
            write_json_atomic(out, result)
        except BaseException:
            plot.unlink(missing_ok=True)  # the plot alone would look like a finished validation
            raise
    return result

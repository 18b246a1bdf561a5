"""The study's tables: results.csv (one row per seed, scorer, rate and metric), its summaries
(mean change, std and t-test per rate; the rate chosen on the validation split), the
recommendation, and the trust-check table.

Evaluation-only metrics (``[cleanse] evaluate``: precision, recall, density, coverage) have rows in
results.csv and ``by_rate`` (summary.csv) like the scored ones, for every scorer: what each removal
cost or gained in fidelity and diversity. They are not chosen on: the rate chosen on the validation
split and the recommendation concern the scored metrics (``[cleanse] metrics``) only."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import ttest_1samp

from ..errors import GancleanseError
from ..files import write_csv_atomic, write_json_atomic
from ..integrity import read_bounded
from ..specs import EVALUATION_METRICS, direction
from .layout import CHECK_FILE, StudyDir, read_check
from .trust import flagged

RESULT_COLUMNS = ["seed", "method", "score_metric", "eval_metric", "removal_rate", "n_removed",
                  "before", "after", "delta", "valid_before", "valid_after", "valid_delta", "features"]
"""``features``: the network a feature metric was computed in (``space:key``, the key a hash of its weights
file or settings; SCORES.json and summary.json name the file and sha256), empty for the others."""
FLOAT_COLUMNS = {"removal_rate", "before", "after", "delta", "valid_before", "valid_after", "valid_delta"}
RESULTS_MAX_BYTES = 256 * 2**20  # one row per seed, scorer, rate and metric: never anywhere near this
SUMMARY_COLUMNS = ["method", "score_metric", "eval_metric", "removal_rate", "n_removed", "n_seeds",
                   "mean_before", "mean_after", "mean_delta", "std_delta", "p_value"]
CHECK_COLUMNS = ("kendall_tau", "kendall_tau_interval", "pearson", "trusted")  # per seed, in the trust table


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv_atomic(path, RESULT_COLUMNS, ([r.get(k, "") for k in RESULT_COLUMNS] for r in rows))


def read_results(path: Path) -> list[dict[str, Any]]:
    try:
        text = read_bounded(path, RESULTS_MAX_BYTES, "the cap on results.csv").decode("utf-8")
    except (OSError, ValueError) as e:
        raise GancleanseError(f"{path}: cannot read the study's results ({e})") from None
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    ints = {"seed", "n_removed"}
    return [{k: int(v) if k in ints else float(v) if k in FLOAT_COLUMNS else v for k, v in r.items()} for r in rows]


def _group(rows: list[dict[str, Any]], fields: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    """``rows`` by their values of ``fields``, in order of first appearance."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[f] for f in fields), []).append(r)
    return groups


def _stats(deltas: list[float]) -> dict[str, Any]:
    d = np.asarray(deltas, dtype=np.float64)
    p = float(ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and np.ptp(d) > 0 else None
    return {"n_seeds": len(d), "mean_delta": float(d.mean()),
            "std_delta": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "p_value": p}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (method, score metric, eval metric, rate): mean/std of the change and a t-test vs 0;
    plus the journal protocol on each scored metric: per seed the rate with the best validation
    change, its test change."""
    scorer = ("method", "score_metric", "eval_metric")
    table = [{"method": method, "score_metric": sm, "eval_metric": em, "removal_rate": rate,
              "n_removed": rs[0]["n_removed"], "mean_before": float(np.mean([r["before"] for r in rs])),
              "mean_after": float(np.mean([r["after"] for r in rs])), **_stats([r["delta"] for r in rs])}
             for (method, sm, em, rate), rs in sorted(_group(rows, scorer + ("removal_rate",)).items())]
    best_per_seed = [max(rs, key=lambda r: (direction(r["eval_metric"]) * r["valid_delta"], -r["removal_rate"]))
                     for rs in _group(scored(rows), scorer + ("seed",)).values()]
    chosen = _group(best_per_seed, scorer)
    protocol = [{"method": method, "score_metric": sm, "eval_metric": em,
                 "chosen_rates": [r["removal_rate"] for r in rs], **_stats([r["delta"] for r in rs])}
                for (method, sm, em), rs in sorted(chosen.items())]
    return {"by_rate": table, "rate_chosen_on_validation": protocol, "recommended": recommend(rows)}


def scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the scored metrics (evaluation-only metrics left out)."""
    return [r for r in rows if r["eval_metric"] not in EVALUATION_METRICS]


def recommend(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scored metric, the scorer and removal rate whose mean change on the *validation* split is best
    (random removal excluded: it is a control, not a cleansing), with its test change. Evaluation-only
    metrics recommend nothing: ``evaluation_deltas`` gives their mean test change at the recommended removal."""
    groups = _group([r for r in scored(rows) if r["n_removed"] > 0 and r["method"] != "random"],
                    ("eval_metric", "method", "score_metric", "removal_rate"))
    best: dict[str, dict[str, Any]] = {}
    for (em, method, sm, rate), rs in sorted(groups.items()):
        sign = direction(em)
        entry = {"eval_metric": em, "method": method, "score_metric": sm, "removal_rate": rate,
                 "n_removed": rs[0]["n_removed"], "mean_valid_delta": float(np.mean([r["valid_delta"] for r in rs])),
                 "mean_delta": float(np.mean([r["delta"] for r in rs])), "n_seeds": len(rs)}
        entry["improves_validation"] = sign * entry["mean_valid_delta"] > 0
        if em not in best or sign * entry["mean_valid_delta"] > sign * best[em]["mean_valid_delta"]:
            best[em] = entry
    costs = _group([r for r in rows if r["eval_metric"] in EVALUATION_METRICS], ("method", "score_metric", "removal_rate"))
    for entry in best.values():
        at = costs.get((entry["method"], entry["score_metric"], entry["removal_rate"]), [])
        entry["evaluation_deltas"] = {em: float(np.mean([r["delta"] for r in rs]))
                                      for (em,), rs in _group(at, ("eval_metric",)).items()}
    return [best[em] for em in sorted(best)]


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_csv_atomic(out / "summary.csv", SUMMARY_COLUMNS,
                     (["" if r[k] is None else r[k] for k in SUMMARY_COLUMNS] for r in summary["by_rate"]))
    write_json_atomic(out / "summary.json", summary)


def check_table(study: StudyDir, seeds: list[int], scorers: Sequence[str]) -> list[dict[str, Any]]:
    """Per scorer (``method-variant``): its trust check on every seed (tau, interval, Pearson, trusted), mean tau."""
    per_seed = {s: read_check(study.seed_dir(s) / CHECK_FILE) for s in seeds}
    table = []
    for name in scorers:
        method, variant = name.split("-", 1)
        checks = [(s, rec["checks"][name]) for s, rec in per_seed.items() if rec and name in rec["checks"]]
        if not checks:
            continue
        taus = [c["kendall_tau"] for _, c in checks if c["kendall_tau"] is not None]
        table.append({"method": method, "score_metric": variant, "check_metric": checks[0][1]["metric"],
                      "k": checks[0][1]["k"], "seeds": [s for s, _ in checks],
                      **{field: [c[field] for _, c in checks] for field in CHECK_COLUMNS},
                      "mean_kendall_tau": float(np.mean(taus)) if taus else None,
                      "n_trusted": sum(bool(c["trusted"]) for _, c in checks),
                      "n_flagged": sum(flagged(c) for _, c in checks)})
    return table

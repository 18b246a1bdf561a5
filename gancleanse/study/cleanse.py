"""The cleansing study: score, remove the most harmful instances, retrain, evaluate on the test split.

For each replicate seed: train with recording; score every training instance with every
requested scorer; for each removal rate remove the top floor(N * rate) by harmfulness;
retrain (``window``: the recorded window from its checkpoint with the same minibatches and
latents; ``full``: from initialization with the same schedule); evaluate every metric on
the test split (and the validation split, to choose a rate the journal's way).

Layout of the study directory::

    DIR/config.toml                 the study config
    DIR/seeds/seed_S/run/           the replicate's run directory
    DIR/seeds/seed_S/scores/*.csv   one SCORES.csv per scorer (and .json: time, AID residual)
    DIR/parts/*.json                one finished retrain each (the study resumes from them)
    DIR/parts/*.samples.safetensors generated test samples of the first seed's retrains (report)
    DIR/results.csv, summary.csv, summary.json, report.html

Removing nothing is a real replay too (bitwise equal to the recorded training on CPU), so
a zero removal rate gives a delta of exactly 0 rather than by construction.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.stats import ttest_1samp

from ..config import HIGHER_IS_BETTER, Config
from ..errors import ConfigError, GancleanseWarning
from ..data import Splits
from ..models import GANModules
from ..run import Run, write_json_atomic
from .executor import run_tasks

RESULT_COLUMNS = ["seed", "method", "score_metric", "eval_metric", "removal_rate", "n_removed",
                  "before", "after", "delta", "valid_before", "valid_after", "valid_delta"]
SAMPLE_COUNT = 64  # generated samples kept per retrain of the first seed, for the report


@dataclasses.dataclass(frozen=True)
class Scorer:
    """One way of ranking instances: a method and the metric (or features) it scores with."""

    method: str
    score_metric: str

    @property
    def name(self) -> str:
        return f"{self.method}-{self.score_metric}"


def scorers_for(cfg: Config, image_data: bool) -> list[Scorer]:
    out: list[Scorer] = []
    for method in cfg.cleanse.methods:
        if method in ("itd", "aid"):
            out += [Scorer(method, m) for m in cfg.cleanse.metrics]
        elif method == "isolation_forest":
            out.append(Scorer(method, "raw"))
            if image_data:
                out.append(Scorer(method, "classifier"))
        elif method == "random":
            out.append(Scorer(method, "none"))
        else:
            raise ConfigError(f"cleanse.methods has unknown method {method!r} "
                              "(known: itd, aid, isolation_forest, random)")
    return out


def replicate_config(cfg: Config, seed: int) -> Config:
    """Replicate ``seed`` changes the data draw/split, the training seed and the evaluation latents."""
    cfg = cfg.resolved()
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, seed=cfg.data.seed + seed),
        train=dataclasses.replace(cfg.train, seed=cfg.train.seed + seed),
        metric=dataclasses.replace(cfg.metric, seed=cfg.metric.seed + seed),
    )


# --------------------------------------------------------------------- jobs (top level)
def train_and_score(cfg_dict: dict, seed_dir: str, scorers: list[tuple[str, str]], seed: int,
                    models: GANModules | None = None, data: Splits | None = None) -> Run:
    """Train one replicate (unless already complete) and write every missing score file."""
    from .. import api

    seed_dir_p = Path(seed_dir)
    run_dir = seed_dir_p / "run"
    if (run_dir / "run.json").is_file():
        run = Run.open(run_dir, models=models)
    else:
        run = api.train(Config.from_dict(cfg_dict), run_dir, models=models, data=data, force=True,
                        progress=False)
    (seed_dir_p / "scores").mkdir(exist_ok=True)
    for method, score_metric in scorers:
        path = seed_dir_p / "scores" / f"{method}-{score_metric}.csv"
        if path.is_file():
            continue
        if method == "itd":
            s = api.influence(run, score_metric, method, progress=False)
        elif method == "aid":
            c = cfg_dict["cleanse"]
            options = {"solver": c["aid_solver"], "iterations": c["aid_iterations"], "damping": c["aid_damping"],
                       "operator_size": c["aid_operator_size"]}
            with warnings.catch_warnings():  # recorded in the JSON; the study warns once for all seeds
                warnings.simplefilter("ignore", GancleanseWarning)
                s = api.influence(run, score_metric, method, seed=seed, progress=False,
                                  **{k: v for k, v in options.items() if v is not None})
        elif method == "isolation_forest":
            s = api.influence(run, "all", method, features=score_metric, seed=seed, progress=False)
        else:
            s = api.influence(run, "all", method, seed=seed, progress=False)
        write_json_atomic(path.with_suffix(".json"), {"metric": s.metric, "method": s.method, **s.info})
        s.to_csv(path)  # last: its presence marks the scorer as done
    return run


def retrain_and_evaluate(run: Run, removed: list[int], retrain: str, metrics: list[str],
                         samples_path: str | None) -> dict[str, dict[str, float]]:
    """Retrain without ``removed`` and evaluate each metric on the test and validation splits."""
    from ..metrics import make_metric
    from ..training.replay import replay

    weights = torch.ones(run.n_train, dtype=run.dtype)
    weights[removed] = 0.0
    start = run.window_start if retrain == "window" else 0
    state = replay(run, start, weights=weights)
    out = {m: {"test": make_metric(m, run, "test").value(state),
               "valid": make_metric(m, run, "valid").value(state)} for m in metrics}
    if samples_path:
        dyn = run.dynamics
        with torch.no_grad():
            x = dyn.models.generate(dyn.eval_generator(state), run.eval_latents("test")[:SAMPLE_COUNT])
        save_file({"samples": x.contiguous()}, samples_path)
    return out


def retrain_key(seed: int, scorer: str | None = None, rate: float = 0.0) -> str:
    """Name of one retrain in DIR/parts; removing nothing (``scorer`` None) is one replay per seed."""
    return f"seed{seed}_none" if scorer is None else f"seed{seed}_{scorer}_r{rate:g}"


def read_scores(path: Path) -> np.ndarray:
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return np.array([float(r[2]) for r in rows])


def removal_set(harmfulness: np.ndarray, rate: float) -> list[int]:
    n = math.floor(len(harmfulness) * rate)
    return [int(i) for i in np.argsort(-harmfulness, kind="stable")[:n]]


# --------------------------------------------------------------------------- the study
def run_study(cfg: Config, out: Path, *, models: GANModules | None = None, data: Splits | None = None,
              executor: str = "local", workers: int = 1, progress: bool = True) -> dict[str, Any]:
    from ..training.recorder import with_user_inputs

    out = Path(out)
    cfg = with_user_inputs(cfg, models, data).resolved()
    if not cfg.cleanse.metrics:
        raise ConfigError("cleanse.metrics is empty: name at least one metric to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.toml"
    if config_path.is_file() and Config.from_dict(_read_toml(config_path)) != cfg:
        raise ConfigError(f"{out} holds a study with a different config; use a new directory")
    config_path.write_text(cfg.to_toml())
    # Isolation Forest on classifier features needs labelled images to train the classifier.
    image_data = cfg.data.name in ("digits", "mnist") or (
        data is not None and data.train.ndim >= 3 and data.y_train is not None)
    scorers = scorers_for(cfg, image_data)
    seeds = list(cfg.cleanse.seeds)

    # 1. one job per replicate: train + score
    seed_jobs = []
    for s in seeds:
        d = out / "seeds" / f"seed_{s}"
        d.mkdir(parents=True, exist_ok=True)
        seed_jobs.append((s, (replicate_config(cfg, s).to_dict(), str(d),
                              [(sc.method, sc.score_metric) for sc in scorers], s, models, data)))
    runs = dict(run_tasks(train_and_score, seed_jobs, executor=executor, workers=workers,
                          progress=progress, desc="train+score"))
    _warn_unconverged_aid(out, seeds)

    # 2. one job per (seed, scorer, rate) retrain; rate 0 is one shared replay per seed
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    jobs, keys = [], {}
    for s in seeds:
        for sc in scorers:
            harm = read_scores(out / "seeds" / f"seed_{s}" / "scores" / f"{sc.name}.csv")
            for rate in cfg.cleanse.removal_rates:
                removed = removal_set(harm, rate)
                key = retrain_key(s, sc.name, rate) if removed else retrain_key(s)
                keys[(s, sc, rate)] = (key, len(removed))
                if key in {k for k, _ in jobs} or (parts / f"{key}.json").is_file():
                    continue
                samples = str(parts / f"{key}.samples.safetensors") if s == seeds[0] else None
                jobs.append((key, (runs[s], removed, cfg.cleanse.retrain, list(cfg.cleanse.metrics), samples)))
    first_none = retrain_key(seeds[0])  # the original GAN's samples, for the report's before/after
    if first_none not in {k for k, _ in jobs} and not (parts / f"{first_none}.json").is_file():
        jobs.append((first_none, (runs[seeds[0]], [], cfg.cleanse.retrain, list(cfg.cleanse.metrics),
                                  str(parts / f"{first_none}.samples.safetensors"))))
    for key, res in run_tasks(retrain_and_evaluate, jobs, executor=executor, workers=workers,
                              progress=progress, desc="retrain"):
        write_json_atomic(parts / f"{key}.json", res)

    # 3. tables
    rows = []
    for s in seeds:
        original = parts / f"seed{s}_original.json"
        if not original.is_file():  # the recorded training's own final state: the "before" of every row
            write_json_atomic(original, _original_metrics(runs[s], cfg.cleanse.metrics))
        base = json.loads(original.read_text())
        for sc in scorers:
            for rate in cfg.cleanse.removal_rates:
                key, n = keys[(s, sc, rate)]
                after = json.loads((parts / f"{key}.json").read_text())
                for m in cfg.cleanse.metrics:
                    b, a = base[m]["test"], after[m]["test"]
                    vb, va = base[m]["valid"], after[m]["valid"]
                    rows.append({"seed": s, "method": sc.method, "score_metric": sc.score_metric,
                                 "eval_metric": m, "removal_rate": rate, "n_removed": n,
                                 "before": b, "after": a, "delta": a - b,
                                 "valid_before": vb, "valid_after": va, "valid_delta": va - vb})
    write_results(out / "results.csv", rows)
    summary = summarize(rows)
    write_summary(out, summary)
    return summary


def _warn_unconverged_aid(out: Path, seeds: list[int]) -> None:
    """One warning for every AID solve of the study that stopped above its tolerance."""
    residuals = []
    for s in seeds:
        for f in sorted((out / "seeds" / f"seed_{s}" / "scores").glob("aid-*.json")):
            info = json.loads(f.read_text())
            if not info.get("converged", True):
                residuals.append(info["residual"])
    if residuals:
        n = len(residuals)
        warnings.warn(f"AID ({n} solve{'s' if n > 1 else ''}) stopped above its tolerance, relative residuals "
                      f"{min(residuals):.2g} to {max(residuals):.2g} (seeds/*/scores/aid-*.json): its ranking "
                      "is a truncated solve; raise [cleanse] aid_iterations or aid_damping", GancleanseWarning,
                      stacklevel=3)


def _original_metrics(run: Run, metrics: list[str]) -> dict[str, dict[str, float]]:
    from ..metrics import make_metric

    final = run.final_state()
    return {m: {"test": make_metric(m, run, "test").value(final),
                "valid": make_metric(m, run, "valid").value(final)} for m in metrics}


def _read_toml(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


# ------------------------------------------------------------------------------ tables
def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def read_results(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    ints, floats = {"seed", "n_removed"}, set(RESULT_COLUMNS[4:]) - {"n_removed"}
    return [{k: int(v) if k in ints else float(v) if k in floats else v for k, v in r.items()} for r in rows]


def _stats(deltas: list[float]) -> dict[str, Any]:
    d = np.asarray(deltas, dtype=np.float64)
    p = float(ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and np.ptp(d) > 0 else None
    return {"n_seeds": len(d), "mean_delta": float(d.mean()),
            "std_delta": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "p_value": p}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (method, score metric, eval metric, rate): mean/std of the change and a t-test vs 0;
    plus the journal protocol: per seed the rate with the best validation change, its test change."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["score_metric"], r["eval_metric"], r["removal_rate"]), []).append(r)
    table = []
    for (method, sm, em, rate), rs in sorted(groups.items()):
        table.append({"method": method, "score_metric": sm, "eval_metric": em, "removal_rate": rate,
                      "n_removed": rs[0]["n_removed"], "mean_before": float(np.mean([r["before"] for r in rs])),
                      "mean_after": float(np.mean([r["after"] for r in rs])), **_stats([r["delta"] for r in rs])})
    selected: dict[tuple, list[dict]] = {}
    for r in rows:
        selected.setdefault((r["method"], r["score_metric"], r["eval_metric"], r["seed"]), []).append(r)
    chosen: dict[tuple, list[dict]] = {}
    for (method, sm, em, seed), rs in selected.items():
        sign = 1.0 if HIGHER_IS_BETTER[em] else -1.0
        best = max(rs, key=lambda r: (sign * r["valid_delta"], -r["removal_rate"]))
        chosen.setdefault((method, sm, em), []).append(best)
    protocol = [{"method": method, "score_metric": sm, "eval_metric": em,
                 "chosen_rates": [r["removal_rate"] for r in rs], **_stats([r["delta"] for r in rs])}
                for (method, sm, em), rs in sorted(chosen.items())]
    return {"by_rate": table, "rate_chosen_on_validation": protocol, "recommended": recommend(rows)}


def recommend(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per evaluated metric, the scorer and removal rate whose mean change on the *validation*
    split is best (random removal excluded: it is a control, not a cleansing), with its test change."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["n_removed"] > 0 and r["method"] != "random":
            groups.setdefault((r["eval_metric"], r["method"], r["score_metric"], r["removal_rate"]), []).append(r)
    best: dict[str, dict[str, Any]] = {}
    for (em, method, sm, rate), rs in sorted(groups.items()):
        sign = 1.0 if HIGHER_IS_BETTER[em] else -1.0
        entry = {"eval_metric": em, "method": method, "score_metric": sm, "removal_rate": rate,
                 "n_removed": rs[0]["n_removed"], "mean_valid_delta": float(np.mean([r["valid_delta"] for r in rs])),
                 "mean_delta": float(np.mean([r["delta"] for r in rs])), "n_seeds": len(rs)}
        entry["improves_validation"] = sign * entry["mean_valid_delta"] > 0
        if em not in best or sign * entry["mean_valid_delta"] > sign * best[em]["mean_valid_delta"]:
            best[em] = entry
    return [best[em] for em in sorted(best)]


def full_config(cfg: Config) -> Config:
    """The config of the run an export is scored on: the study's own seeds, and for data read
    from files every instance not in the validation or test split as the training split."""
    cfg = cfg.resolved()
    if cfg.data.name not in ("gaussian2d", "custom"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=None))
    return cfg


def export_recommended(cfg: Config, out: Path, export_dir: Path, summary: dict[str, Any], *,
                       models: GANModules | None = None, data: Splits | None = None,
                       force: bool = False) -> dict[str, Any]:
    """Apply the validation-chosen scorer and rate of the first metric to the full training split.

    The scores come from a run trained on the full training split: the study's seed-0
    replicate when that is the same training, else one more run in ``out/export/``.
    """
    from ..data.export import export

    cfg = cfg.resolved()
    metric = cfg.cleanse.metrics[0]
    rec = next((r for r in summary.get("recommended", []) if r["eval_metric"] == metric), None)
    if rec is None or not rec["improves_validation"]:
        raise ConfigError(f"no scorer improved the validation {metric} at any removal rate in {out}; "
                          "nothing to export (see summary.csv)")
    full = full_config(cfg)
    scorer = Scorer(rec["method"], rec["score_metric"])
    if 0 in cfg.cleanse.seeds and replicate_config(cfg, 0) == full:
        seed_dir = out / "seeds" / "seed_0"
    else:
        seed_dir = out / "export"
        seed_dir.mkdir(parents=True, exist_ok=True)
    run = train_and_score(full.to_dict(), str(seed_dir), [(scorer.method, scorer.score_metric)], 0, models, data)
    info = export(seed_dir / "scores" / f"{scorer.name}.csv", export_dir, rate=rec["removal_rate"],
                  run=run.path, force=force)
    info["recommended"] = rec
    return info


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    cols = ["method", "score_metric", "eval_metric", "removal_rate", "n_removed", "n_seeds",
            "mean_before", "mean_after", "mean_delta", "std_delta", "p_value"]
    tmp = out / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in summary["by_rate"]:
            w.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k]) for k in cols})
    tmp.replace(out / "summary.csv")
    write_json_atomic(out / "summary.json", summary)

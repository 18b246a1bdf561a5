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
import hashlib
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
from ..data import Splits
from ..device import local_workers
from ..errors import ConfigError, GancleanseError, GancleanseWarning
from ..influence import spec, variant_arguments, variants
from ..models import GANModules
from ..files import write_json_atomic
from ..run import Run
from .executor import run_tasks
from .trust import flagged

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
    """Every (method, variant) the study scores with: see ``gancleanse.influence.variants``."""
    return [Scorer(method, v) for method in cfg.cleanse.methods
            for v in variants(method, cfg.cleanse.metrics, image_data)]


def scorer_options(method: str, cleanse: dict[str, Any]) -> dict[str, Any]:
    """The study config's options for ``method`` (ITD's memory budget and ReLU smoothing, AID's
    solver settings)."""
    if method == "itd":
        options = {"memory_gb": cleanse["itd_memory_gb"], "relu_smoothing": cleanse["itd_relu_smoothing"]}
        return {k: v for k, v in options.items() if v is not None}
    if method != "aid":
        return {}
    options = {"solver": cleanse["aid_solver"], "iterations": cleanse["aid_iterations"],
               "damping": cleanse["aid_damping"], "operator_size": cleanse["aid_operator_size"]}
    return {k: v for k, v in options.items() if v is not None}


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
    if (run_dir / "run.json").is_file():  # the study's own config names the extractor: explicit
        run = Run.open(run_dir, models=models, extractor=cfg_dict["metric"].get("extractor"))
    else:
        run = api.train(Config.from_dict(cfg_dict), run_dir, models=models, data=data, force=True,
                        progress=False)
    (seed_dir_p / "scores").mkdir(exist_ok=True)
    for method, score_metric in scorers:
        path = seed_dir_p / "scores" / f"{method}-{score_metric}.csv"
        if path.is_file() and stored_run_id(path.with_suffix(".json")) == run.id:
            continue
        with warnings.catch_warnings():  # recorded in the JSON; the study warns once for all seeds
            warnings.simplefilter("ignore", GancleanseWarning)
            s = api.influence(run, method=method, seed=seed, progress=False,
                              **variant_arguments(method, score_metric),
                              **scorer_options(method, cfg_dict["cleanse"]))
        write_json_atomic(path.with_suffix(".json"), {"metric": s.metric, "method": s.method, **s.info})
        s.to_csv(path)  # last: its presence marks the scorer as done
    check_replicate(run, seed_dir_p, scorers, cfg_dict["cleanse"], seed)
    return run


CHECK_FILE = "check.json"


def check_replicate(run: Run, seed_dir: Path, scorers: list[tuple[str, str]], cleanse: dict[str, Any],
                    seed: int) -> None:
    """The trust check of every scorer of one replicate (shared retrains), in ``seed_dir/check.json``.

    Scorers of a metric are checked against it; the others against the study's first metric.
    A stored check is kept only if it names this run, the same K and the same metrics.
    """
    from ..scores import Scores
    from .trust import trust_checks

    k = min(cleanse["check"], run.n_train)
    path = seed_dir / CHECK_FILE
    if k < 2:
        path.unlink(missing_ok=True)
        return
    names = [f"{m}-{v}" for m, v in scorers]
    metrics = [variant_arguments(m, v)["metric"] if spec(m).uses == "metric" else cleanse["metrics"][0]
               for m, v in scorers]
    stored = _read_check(path)
    if stored and stored["run_id"] == run.id and stored["k"] == k and all(
            isinstance(stored["checks"].get(n), dict) and stored["checks"][n].get("metric") == m
            for n, m in zip(names, metrics)):
        return
    rankings = []
    for (method, variant), metric in zip(scorers, metrics):
        harm = read_scores(seed_dir / "scores" / f"{method}-{variant}.csv")
        rankings.append(Scores(metric, method, harm, harm))
    results = trust_checks(run, rankings, metrics, k, seed=seed)
    write_json_atomic(path, {"run_id": run.id, "k": k, "seed": seed, "checks": dict(zip(names, results))})


def _read_check(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("checks"), dict) and "run_id" in rec and "k" in rec
    return rec if ok else None


def stored_run_id(path: Path) -> str | None:
    """The run a stored score file's JSON or a stored retrain names (None: unreadable, or none)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    return rec["run_id"] if "run_id" in rec else (rec.get("provenance") or {}).get("run_id")


def removal_digest(removed: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, sorted(removed))).encode()).hexdigest()


def retrain_and_evaluate(run: Run, removed: list[int], retrain: str, metrics: list[str],
                         samples_path: str | None) -> dict[str, Any]:
    """Retrain without ``removed`` and evaluate each metric on the test and validation splits.

    The result names the run and the removed set it belongs to, so that a resumed study
    never takes it for another retrain.
    """
    from ..metrics import make_metric
    from ..training.replay import replay
    from ..training.retrain import late_start

    weights = torch.ones(run.n_train, dtype=run.dtype)
    weights[removed] = 0.0
    start = run.window_start if retrain == "window" else 0
    state = replay(run, late_start(run, weights, start), weights=weights)  # bitwise the same as from start
    out: dict[str, Any] = {m: {"test": make_metric(m, run, "test").value(state),
                               "valid": make_metric(m, run, "valid").value(state)} for m in metrics}
    out["provenance"] = {"run_id": run.id, "removed": removal_digest(removed), "retrain": retrain}
    if samples_path:
        dyn = run.dynamics
        with torch.no_grad():
            c = run.eval_labels("test")
            x = dyn.models.generate(dyn.eval_generator(state), run.eval_latents("test")[:SAMPLE_COUNT],
                                    None if c is None else c[:SAMPLE_COUNT])
        save_file({"samples": x.detach().cpu().contiguous()}, samples_path)
    return out


def retrain_key(seed: int, scorer: str | None = None, rate: float = 0.0) -> str:
    """Name of one retrain in DIR/parts; removing nothing (``scorer`` None) is one replay per seed."""
    return f"seed{seed}_none" if scorer is None else f"seed{seed}_{scorer}_r{rate:g}"


def read_scores(path: Path) -> np.ndarray:
    """The harmfulness column of a SCORES.csv, checked (numbers, finite)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        harm = np.array([float(r[2]) for r in rows])
    except (OSError, ValueError, IndexError) as e:
        raise GancleanseError(f"{path}: not a readable SCORES.csv ({e}); delete it to recompute it") from None
    if not np.isfinite(harm).all():
        raise GancleanseError(f"{path}: non-finite harmfulness; delete it to recompute it")
    return harm


def removal_set(harmfulness: np.ndarray, rate: float) -> list[int]:
    n = math.floor(len(harmfulness) * rate)
    return [int(i) for i in np.argsort(-harmfulness, kind="stable")[:n]]


# --------------------------------------------------------------------------- the study
STUDY_MARKER = "study.json"  # marks a directory as a gancleanse study: --force and resume trust only these


def is_study_dir(path: Path) -> bool:
    try:
        rec = json.loads((path / STUDY_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("kind") == "gancleanse study"


def open_study_dir(out: Path, cfg: Config) -> None:
    """Create or resume the study directory ``out``: never a directory of something else."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory")
        if not is_study_dir(out) and any(p.name != ".lock" for p in out.iterdir()):  # a starting writer's lock
            raise ConfigError(f"--out {out} is a non-empty directory that is not a gancleanse study; "
                              "choose a new or empty directory")
        config_path = out / "config.toml"
        if config_path.is_file():
            try:
                same = Config.from_dict(_read_toml(config_path)) == cfg
            except (ConfigError, ValueError):
                same = False
            if not same:
                raise ConfigError(f"{out} holds a study with a different config; use a new directory")
    out.mkdir(parents=True, exist_ok=True)


def check_study_config(cfg: Config, data: Splits | None) -> None:
    """What the config must allow before anything is written to the study directory."""
    from ..config import check_threads

    check_threads(cfg.train.threads)
    needs_classifier = [m for m in cfg.cleanse.metrics if m in ("is", "log_is", "fid", "kid")]
    two_d = cfg.data.name == "gaussian2d" or (data is not None and data.train.ndim < 3)
    if needs_classifier and two_d and not cfg.metric.extractor:
        raise ConfigError(f"cleanse.metrics {needs_classifier} need image data (or metric.extractor); "
                          f"data.name = {cfg.data.name!r} has 2D points")
    for key in ("path", "reference_path"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).expanduser().exists():
            raise ConfigError(f"data.{key} = {value!r}: no such file or directory")
    if cfg.data.name in ("mnist", "npz", "images") and cfg.data.path is None:
        raise ConfigError(f"data.name = {cfg.data.name!r} needs data.path")


def run_study(cfg: Config, out: Path, *, models: GANModules | None = None, data: Splits | None = None,
              executor: str = "local", workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study in ``out``, locked against a second writer for its duration."""
    from ..locks import DirectoryLock
    from ..training.recorder import with_user_inputs

    out = Path(out)
    cfg = with_user_inputs(cfg, models, data).resolved()
    check_study_config(cfg, data)
    open_study_dir(out, cfg)
    with DirectoryLock(out, "study"):
        if not is_study_dir(out):
            write_json_atomic(out / STUDY_MARKER, {"kind": "gancleanse study", "format": 1})
        (out / "config.toml").write_text(cfg.to_toml())
        return _run_study(cfg, out, models=models, data=data, executor=executor, workers=workers,
                          progress=progress)


def _run_study(cfg: Config, out: Path, *, models: GANModules | None, data: Splits | None,
               executor: str, workers: int, progress: bool) -> dict[str, Any]:
    # Isolation Forest on classifier features needs labelled images to train the classifier.
    image_data = cfg.data.name in ("digits", "mnist") or (
        data is not None and data.train.ndim >= 3 and data.y_train is not None)
    scorers = scorers_for(cfg, image_data)
    seeds = list(cfg.cleanse.seeds)
    workers = local_workers(cfg.train.device, workers, executor)

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

    # 2. one job per (seed, scorer, rate) retrain; rate 0 is one shared replay per seed.
    # A stored retrain is reused only if it names this seed's run and this removed set.
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    jobs, keys, planned = [], {}, set()

    def plan(key: str, s: int, removed: list[int], samples: str | None) -> None:
        stored = parts / f"{key}.json"
        if key in planned or (stored.is_file() and _part_matches(stored, runs[s].id, removed, cfg)):
            return
        planned.add(key)
        jobs.append((key, (runs[s], removed, cfg.cleanse.retrain, list(cfg.cleanse.metrics), samples)))

    for s in seeds:
        for sc in scorers:
            harm = read_scores(out / "seeds" / f"seed_{s}" / "scores" / f"{sc.name}.csv")
            if len(harm) != runs[s].n_train:
                raise GancleanseError(f"{out}/seeds/seed_{s}/scores/{sc.name}.csv has {len(harm)} rows for "
                                      f"{runs[s].n_train} training instances; delete it to recompute it")
            for rate in cfg.cleanse.removal_rates:
                removed = removal_set(harm, rate)
                key = retrain_key(s, sc.name, rate) if removed else retrain_key(s)
                keys[(s, sc, rate)] = (key, len(removed))
                samples = str(parts / f"{key}.samples.safetensors") if s == seeds[0] else None
                plan(key, s, removed, samples)
    first_none = retrain_key(seeds[0])  # the original GAN's samples, for the report's before/after
    plan(first_none, seeds[0], [], str(parts / f"{first_none}.samples.safetensors"))
    for key, res in run_tasks(retrain_and_evaluate, jobs, executor=executor, workers=workers,
                              progress=progress, desc="retrain"):
        write_json_atomic(parts / f"{key}.json", res)

    # 3. tables
    rows = []
    for s in seeds:
        original = parts / f"seed{s}_original.json"
        if not (original.is_file() and _part_matches(original, runs[s].id, None, cfg)):
            # the recorded training's own final state: the "before" of every row
            write_json_atomic(original, _original_metrics(runs[s], cfg.cleanse.metrics))
        base = _read_part(original, cfg)
        for sc in scorers:
            for rate in cfg.cleanse.removal_rates:
                key, n = keys[(s, sc, rate)]
                after = _read_part(parts / f"{key}.json", cfg)
                for m in cfg.cleanse.metrics:
                    b, a = base[m]["test"], after[m]["test"]
                    vb, va = base[m]["valid"], after[m]["valid"]
                    rows.append({"seed": s, "method": sc.method, "score_metric": sc.score_metric,
                                 "eval_metric": m, "removal_rate": rate, "n_removed": n,
                                 "before": b, "after": a, "delta": a - b,
                                 "valid_before": vb, "valid_after": va, "valid_delta": va - vb})
    write_results(out / "results.csv", rows)
    summary = summarize(rows)
    summary["checks"] = check_table(out, seeds, scorers)
    _warn_untrusted(summary["checks"])
    write_summary(out, summary)
    return summary


def check_table(out: Path, seeds: list[int], scorers: list[Scorer]) -> list[dict[str, Any]]:
    """Per scorer: its trust check on every seed (tau, interval, Pearson, trusted) and the mean tau."""
    per_seed = {s: _read_check(out / "seeds" / f"seed_{s}" / CHECK_FILE) for s in seeds}
    table = []
    for sc in scorers:
        checks = [(s, rec["checks"][sc.name]) for s, rec in per_seed.items() if rec and sc.name in rec["checks"]]
        if not checks:
            continue
        taus = [c["kendall_tau"] for _, c in checks if c["kendall_tau"] is not None]
        table.append({
            "method": sc.method, "score_metric": sc.score_metric, "check_metric": checks[0][1]["metric"],
            "k": checks[0][1]["k"], "seeds": [s for s, _ in checks],
            "kendall_tau": [c["kendall_tau"] for _, c in checks],
            "kendall_tau_interval": [c["kendall_tau_interval"] for _, c in checks],
            "pearson": [c["pearson"] for _, c in checks],
            "trusted": [c["trusted"] for _, c in checks],
            "mean_kendall_tau": float(np.mean(taus)) if taus else None,
            "n_trusted": sum(bool(c["trusted"]) for _, c in checks),
            "n_flagged": sum(flagged(c) for _, c in checks),
        })
    return table


def _warn_untrusted(checks: list[dict[str, Any]]) -> None:
    """One warning naming every estimator whose trust check failed on some seed."""
    from .trust import TRUST_THRESHOLD, UntrustedScoresWarning

    weak = [f"{c['method']}-{c['score_metric']} ({c['n_flagged']} of {len(c['seeds'])} seeds)"
            for c in checks if c["n_flagged"]]
    if weak:
        warnings.warn(f"trust check: {', '.join(weak)} agree weakly with retraining (Kendall tau interval below "
                      f"{TRUST_THRESHOLD}); see the report's trust table before deleting data by them",
                      UntrustedScoresWarning, stacklevel=3)


def _read_part(path: Path, cfg: Config) -> dict[str, Any]:
    """A stored retrain's metric values: every metric of the study on both splits, finite."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GancleanseError(f"{path}: unreadable stored retrain ({e}); delete it to recompute it") from None
    for m in cfg.cleanse.metrics:
        values = rec.get(m) if isinstance(rec, dict) else None
        if not (isinstance(values, dict) and all(isinstance(values.get(k), (int, float))
                                                 and not isinstance(values.get(k), bool)
                                                 and math.isfinite(values[k]) for k in ("test", "valid"))):
            raise GancleanseError(f"{path}: no finite test and valid values of {m}; delete it to recompute it")
    if not isinstance(rec.get("provenance"), dict):
        raise GancleanseError(f"{path}: does not name the run it came from; delete it to recompute it")
    return rec


def _part_matches(path: Path, run_id: str, removed: list[int] | None, cfg: Config) -> bool:
    """Whether a stored retrain belongs to this run and removed set (None: the original, no retrain)."""
    prov = _read_part(path, cfg)["provenance"]
    if prov.get("run_id") != run_id:
        return False
    return removed is None or (prov.get("removed") == removal_digest(removed)
                               and prov.get("retrain") == cfg.cleanse.retrain)


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


def _original_metrics(run: Run, metrics: list[str]) -> dict[str, Any]:
    from ..metrics import make_metric

    final = run.final_state()
    out: dict[str, Any] = {m: {"test": make_metric(m, run, "test").value(final),
                               "valid": make_metric(m, run, "valid").value(final)} for m in metrics}
    out["provenance"] = {"run_id": run.id}
    return out


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
    from ..export import export

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

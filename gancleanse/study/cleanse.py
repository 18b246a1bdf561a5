"""The cleansing study: score, remove the most harmful instances, retrain, evaluate on the test split.

For each replicate seed: train with recording; score every training instance with every
scorer; for each removal rate remove the top floor(N * rate) by harmfulness; retrain
(``window``: the recorded window from its checkpoint, same minibatches and latents; ``full``:
from initialization, same schedule); evaluate every metric on the test and validation splits
(the latter chooses a rate the journal's way), and so the evaluation-only metrics of
``[cleanse] evaluate`` (precision, recall, density, coverage): reported beside the others, never
scored on or chosen by. Directory format: ``study.layout``; tables: ``study.tables``. Removing
nothing is a real replay too (bitwise equal to the recorded training on CPU), so a zero removal
rate gives a delta of exactly 0, not by construction. Progress (``gancleanse.progress``): each job
reports its stage (``train``, ``score <scorer>``, ``check``, ``retrain``, ``evaluate``) and the steps of
training and retraining.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as tensors_to_bytes

from ..config import Config
from ..data import Splits
from ..device import check_threads, local_workers
from ..errors import ConfigError, GancleanseError, GancleanseWarning
from ..files import atomic_write, write_json_atomic, write_text_atomic
from ..influence import score, variant_arguments, variants
from ..locks import DirectoryLock
from ..models import GANModules
from ..progress import current_job
from ..run import Run
from ..scores import Scores
from ..specs import FEATURE_METRICS, evaluated_spec, scorer_spec
from ..training import recorder
from . import trust
from .executor import call, run_tasks
from .layout import (CHECK_FILE, StudyDir, evaluated, mark_study, open_study_dir, part_matches, provenance,
                     read_check, read_json, read_part, retrain_key, scores_path, stored_run_id)
from .tables import check_table, summarize, write_results, write_summary

SAMPLE_COUNT = 64  # generated samples kept per retrain of the first seed, for the report


@dataclasses.dataclass(frozen=True)
class Scorer:
    """One way of ranking instances: a method and the metric (or features) it scores with."""

    method: str
    variant: str  # the metric it scores on, a feature space, or "none" (``influence.variants``)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.variant}"


def scorers_for(cfg: Config, space: str | None) -> list[Scorer]:
    """Every (method, variant) the study scores with: see ``gancleanse.influence.variants``."""
    return [Scorer(method, v) for method in cfg.cleanse.methods
            for v in variants(method, cfg.cleanse.metrics, space)]


def replicate_config(cfg: Config, seed: int) -> Config:
    """Replicate ``seed`` changes the data draw/split, the training seed and the evaluation latents."""
    def shifted(section: Any) -> Any:
        return dataclasses.replace(section, seed=section.seed + seed)

    cfg = cfg.resolved()
    return dataclasses.replace(cfg, data=shifted(cfg.data), train=shifted(cfg.train), metric=shifted(cfg.metric))


# --------------------------------------------------------------------- jobs (top level)
def train_and_score(cfg: Config, seed_dir: Path, seed: int, scorers: list[Scorer] | None = None,
                    models: GANModules | None = None, data: Splits | None = None) -> Run:
    """Train one replicate (unless complete) and write every missing score file (``scorers``; None: all)."""
    run_dir, report = seed_dir / "run", current_job()
    (seed_dir / "scores").mkdir(parents=True, exist_ok=True)
    if (run_dir / "run.json").is_file():  # the study's own config names the extractor: explicit
        run = Run.open(run_dir, models=models, extractor=cfg.metric.extractor)
    else:
        report.stage("train")
        # resumes a killed one
        run = recorder.train(cfg, run_dir, models=models, data=data, progress=False, on_step=report.step)
    scorers = scorers if scorers is not None else scorers_for(cfg, run.feature_space)
    for scorer in scorers:
        path = scores_path(seed_dir, scorer.name)
        if path.is_file() and stored_run_id(path.with_suffix(".json")) == run.id:
            continue
        report.stage(f"score {scorer.name}")
        with warnings.catch_warnings():  # recorded in the JSON; the study warns once for all seeds
            warnings.simplefilter("ignore", GancleanseWarning)
            score(run, scorer.method, seed=seed, progress=False, options=cfg.cleanse.scorer_options(scorer.method),
                  **variant_arguments(scorer.method, scorer.variant)).save(path)
    report.stage("check")
    check_replicate(run, seed_dir, scorers, cfg, seed)
    return run


def check_replicate(run: Run, seed_dir: Path, scorers: list[Scorer], cfg: Config, seed: int) -> None:
    """The trust check of every scorer of one replicate (shared retrains) in ``seed_dir/check.json``: scorers
    of a metric against it, the others against the first metric; a stored one kept if of this run, K and metrics."""
    k = min(cfg.cleanse.check, run.n_train)
    path = seed_dir / CHECK_FILE
    if k < 2:
        path.unlink(missing_ok=True)
        return
    metrics = [scorer.variant if scorer_spec(scorer.method).uses == "metric" else cfg.cleanse.metrics[0]
               for scorer in scorers]
    stored = read_check(path)
    if stored and stored["run_id"] == run.id and stored["k"] == k and all(
            isinstance(stored["checks"].get(scorer.name), dict) and stored["checks"][scorer.name].get("metric") == m
            for scorer, m in zip(scorers, metrics)):
        return
    rankings = [dataclasses.replace(Scores.load(scores_path(seed_dir, scorer.name)), metric=metric)
                for scorer, metric in zip(scorers, metrics)]
    results = trust.trust_checks(run, rankings, metrics, k, seed=seed)
    write_json_atomic(path, {"run_id": run.id, "k": k, "seed": seed,
                             "checks": {scorer.name: r for scorer, r in zip(scorers, results)}})


def retrain_and_evaluate(run: Run, removed: list[int], retrain: str, metrics: list[str],
                         samples_path: str | None) -> dict[str, Any]:
    """Retrain without ``removed`` and evaluate each metric on the test and validation splits; the
    result names the run and removed set, so that a resumed study never takes it for another retrain."""
    from ..training.replay import replay
    from ..training.retrain import late_start

    weights = torch.ones(run.n_train, dtype=run.dtype)
    weights[removed] = 0.0
    start, report = run.window_start if retrain == "window" else 0, current_job()
    report.stage("retrain")
    state = replay(run, late_start(run, weights, start), weights=weights, on_step=report.step)  # bitwise as from start
    report.stage("evaluate")
    out = {**evaluate(run, state, metrics), "provenance": provenance(run.id, removed, retrain)}
    if samples_path:
        dyn, labels = run.dynamics, run.eval_labels("test")
        with torch.no_grad():
            x = dyn.models.generate(dyn.eval_generator(state), run.eval_latents("test")[:SAMPLE_COUNT],
                                    None if labels is None else labels[:SAMPLE_COUNT])
        with atomic_write(samples_path, binary=True) as f:
            f.write(tensors_to_bytes({"samples": x.detach().cpu().contiguous()}))
    return out


def evaluate(run: Run, state: Any, metrics: list[str]) -> dict[str, Any]:
    """Every metric of ``state`` on the test and validation splits: the scored ones and the evaluation-only
    ones (``layout.evaluated``) alike, each its ``Metric.value`` (``metrics.values``: those of one network on
    one split from one pass)."""
    from ..metrics import make_metric, values

    pairs = [(m, split) for m in metrics for split in ("test", "valid")]
    out: dict[str, Any] = {m: {} for m in metrics}
    for (m, split), v in zip(pairs, values([make_metric(m, run, split) for m, split in pairs], state)):
        out[m][split] = v
    return out


def evaluate_original(run: Run, metrics: list[str]) -> dict[str, Any]:
    """The recorded training's own final metrics (the "before" of its seed's rows), naming the run."""
    current_job().stage("evaluate")
    return {**evaluate(run, run.final_state(), metrics), "provenance": provenance(run.id)}


# --------------------------------------------------------------------------- the study
def prepare_study(cfg: Config, models: GANModules | None = None, data: Splits | None = None) -> Config:
    """The study's config, resolved and checked once, before anything is written."""
    cfg = recorder.with_user_inputs(cfg, models, data).resolved().validate()
    check_threads(cfg.train.threads)
    needs_features = [m for m in cfg.cleanse.metrics if m in FEATURE_METRICS] + list(cfg.cleanse.evaluate)
    two_d = cfg.data.name == "gaussian2d" or (data is not None and data.train.ndim < 3)
    if needs_features and two_d and not cfg.metric.extractor:
        raise ConfigError(f"cleanse metrics {needs_features} need image data (or metric.extractor) for their "
                          f"feature space; data.name = {cfg.data.name!r} has 2D points")
    for key in ("path", "reference_path"):
        value = getattr(cfg.data, key)
        if value is not None and not Path(value).expanduser().exists():
            raise ConfigError(f"data.{key} = {value!r}: no such file or directory")
    if cfg.data.name in ("mnist", "npz", "images") and cfg.data.path is None:
        raise ConfigError(f"data.name = {cfg.data.name!r} needs data.path")
    return cfg


def run_study(cfg: Config, out: Path, *, models: GANModules | None = None, data: Splits | None = None,
              executor: str = "local", workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the study in ``out``, locked against a second writer for its duration."""
    out = Path(out)
    cfg = prepare_study(cfg, models, data)
    open_study_dir(out, cfg)
    with DirectoryLock(out, "study"):
        mark_study(out)
        write_text_atomic(out / "config.toml", cfg.to_toml())
        workers = local_workers(cfg.train.device, workers, executor)
        study = StudyDir(out)
        jobs = StudyJobs(cfg, study, models, data)
        for key, result in run_tasks(call, jobs.first(), executor=executor, workers=workers, progress=progress,
                                     desc="cleanse", label=jobs.label, then=jobs.then):
            jobs.store(key, result)
        runs = jobs.runs
        _warn_unconverged_aid(study, list(cfg.cleanse.seeds))
        scorers = jobs.scorers(cfg.cleanse.seeds[0])
        networks = feature_networks(cfg, runs)
        rows = _result_rows(cfg, study, runs, scorers, jobs.keys, networks)
        write_results(out / "results.csv", rows)
        summary = summarize(rows)
        summary["checks"] = check_table(study, list(cfg.cleanse.seeds), [scorer.name for scorer in scorers])
        if networks:
            summary["features"] = networks
        _warn_untrusted(summary["checks"])
        write_summary(out, summary)
        return summary


class StudyJobs:
    """The study's jobs as one stream for ``run_tasks``: a training (with its scores and trust check) per seed,
    and, queued as soon as a seed's training is done, the seed's retrains, one per (scorer, rate) with rate 0 a
    shared replay, and the evaluation of its original. So a seed's retrains run while later seeds still train,
    on workers that would otherwise idle. A stored retrain or original is reused if of this seed's run and
    removed set and holding every evaluated metric."""

    def __init__(self, cfg: Config, study: StudyDir, models: GANModules | None, data: Splits | None) -> None:
        self.cfg, self.study, self.models, self.data = cfg, study, models, data
        self.runs: dict[int, Run] = {}
        self.keys: dict[tuple, tuple[str, int]] = {}  # (seed, scorer, rate) -> (retrain key, instances removed)
        study.parts.mkdir(exist_ok=True)

    def first(self) -> list[tuple[tuple, tuple]]:
        return [(("train", s), (train_and_score, (replicate_config(self.cfg, s), self.study.seed_dir(s), s, None,
                                                  self.models, self.data)))
                for s in self.cfg.cleanse.seeds]

    def scorers(self, seed: int) -> list[Scorer]:
        return scorers_for(self.cfg, self.runs[seed].feature_space)

    def label(self, key: tuple) -> str:
        kind, name = key
        return f"seed {name}" if kind == "train" else f"seed {name} original" if kind == "original" else name

    def then(self, key: tuple, result: Any) -> list[tuple[tuple, tuple]]:
        """A trained seed's retrains and original evaluation (those not stored)."""
        if key[0] != "train":
            return []
        s, cfg, study = key[1], self.cfg, self.study
        run = self.runs[s] = result
        jobs: list[tuple[tuple, tuple]] = []
        metrics = evaluated(cfg)

        def plan(name: str, removed: list[int], samples: str | None) -> None:
            stored = study.part(name)
            if any(k == ("retrain", name) for k, _ in jobs) or (stored.is_file()
                                                               and part_matches(stored, run.id, removed, cfg)):
                return
            jobs.append((("retrain", name), (retrain_and_evaluate, (run, removed, cfg.cleanse.retrain, metrics,
                                                                   samples))))

        first = s == cfg.cleanse.seeds[0]
        for scorer in self.scorers(s):
            path = scores_path(study.seed_dir(s), scorer.name)
            scores = Scores.load(path)
            if len(scores.harmfulness) != run.n_train:
                raise GancleanseError(f"{path} has {len(scores.harmfulness)} rows for {run.n_train} "
                                      "training instances; delete it to recompute it")
            for rate in cfg.cleanse.removal_rates:
                removed = scores.removal(rate)
                name = retrain_key(s, scorer.name, rate) if removed else retrain_key(s)
                self.keys[(s, scorer, rate)] = (name, len(removed))
                plan(name, removed, str(study.samples(name)) if first else None)
        if first:  # the original GAN's samples, for the report's before/after
            plan(retrain_key(s), [], str(study.samples(retrain_key(s))))
        original = study.original(s)
        if not (original.is_file() and part_matches(original, run.id, None, cfg)):
            jobs.append((("original", s), (evaluate_original, (run, metrics))))
        return jobs

    def store(self, key: tuple, result: Any) -> None:
        """Keep a finished job's result: a retrain's or original's part (a training keeps its own files)."""
        kind, name = key
        if kind == "retrain":
            write_json_atomic(self.study.part(name), result)
        elif kind == "original":
            write_json_atomic(self.study.original(name), result)


def _result_rows(cfg: Config, study: StudyDir, runs: dict[int, Run], scorers: list[Scorer],
                 keys: dict[tuple, tuple[str, int]], networks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Step 3: one row per (seed, scorer, rate, metric): test and validation before and after, for the scored
    and the evaluation-only metrics (every scorer's rows name its scored variant; evaluation metrics score none)."""
    metrics = evaluated(cfg)
    rows = []
    for s in cfg.cleanse.seeds:
        network = networks.get(str(s), {})
        base = read_part(study.original(s), metrics)
        for scorer in scorers:
            for rate in cfg.cleanse.removal_rates:
                key, n = keys[(s, scorer, rate)]
                after = read_part(study.part(key), metrics)
                for m in metrics:
                    b, a = base[m]["test"], after[m]["test"]
                    vb, va = base[m]["valid"], after[m]["valid"]
                    rows.append({"seed": s, "method": scorer.method, "score_metric": scorer.variant,
                                 "eval_metric": m, "removal_rate": rate, "n_removed": n,
                                 "before": b, "after": a, "delta": a - b,
                                 "valid_before": vb, "valid_after": va, "valid_delta": va - vb,
                                 "features": f"{network['space']}:{network['key']}"
                                 if network and evaluated_spec(m).needs == "features" else ""})
    return rows


def feature_networks(cfg: Config, runs: dict[int, Run]) -> dict[str, dict[str, Any]]:
    """Per seed, the network the study's feature metrics were computed in (``features.metric_features``:
    space, file or cache, sha256, why chosen); empty when no evaluated metric needs one."""
    from ..features import metric_features

    if not any(evaluated_spec(m).needs == "features" for m in evaluated(cfg)):
        return {}
    return {str(s): metric_features(runs[s]) for s in cfg.cleanse.seeds}


def _warn_untrusted(checks: list[dict[str, Any]]) -> None:
    """One warning naming every estimator whose trust check failed on some seed."""
    weak = [f"{c['method']}-{c['score_metric']} ({c['n_flagged']} of {len(c['seeds'])} seeds)"
            for c in checks if c["n_flagged"]]
    if weak:
        warnings.warn(f"trust check: {', '.join(weak)} agree weakly with retraining (Kendall tau interval below "
                      f"{trust.TRUST_THRESHOLD}); see the report's trust table before deleting data by them",
                      trust.UntrustedScoresWarning, stacklevel=3)


def _warn_unconverged_aid(study: StudyDir, seeds: list[int]) -> None:
    """One warning for every AID solve of the study that stopped above its tolerance."""
    infos = [read_json(f) or {} for s in seeds for f in sorted((study.seed_dir(s) / "scores").glob("aid-*.json"))]
    residuals = [info["residual"] for info in infos if not info.get("converged", True)]
    if n := len(residuals):
        warnings.warn(f"AID ({n} solve{'s' if n > 1 else ''}) stopped above its tolerance, relative residuals "
                      f"{min(residuals):.2g} to {max(residuals):.2g} (seeds/*/scores/aid-*.json): its ranking "
                      "is a truncated solve; raise iterations or damping in [cleanse.aid]", GancleanseWarning,
                      stacklevel=3)


# ------------------------------------------------------------------------------ export
def full_config(cfg: Config) -> Config:
    """The config of the run an export is scored on: the study's own seeds, and for data read from
    files every instance not in the validation or test split as the training split."""
    cfg = cfg.resolved()
    if cfg.data.name not in ("gaussian2d", "custom"):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, n_train=None))
    return cfg


def export_recommended(cfg: Config, out: Path, export_dir: Path, summary: dict[str, Any], *,
                       models: GANModules | None = None, data: Splits | None = None,
                       force: bool = False) -> dict[str, Any]:
    """Apply the validation-chosen scorer and rate of the first metric to the full training split, scored
    on a run of it: the study's seed-0 replicate when that is the same training, else ``out/export/``."""
    from ..export import export

    cfg = prepare_study(cfg, models, data)
    metric = cfg.cleanse.metrics[0]
    rec = next((r for r in summary.get("recommended", []) if r["eval_metric"] == metric), None)
    if rec is None or not rec["improves_validation"]:
        raise ConfigError(f"no scorer improved the validation {metric} at any removal rate in {out}; "
                          "nothing to export (see summary.csv)")
    full = full_config(cfg)
    scorer = Scorer(rec["method"], rec["score_metric"])
    same_training = 0 in cfg.cleanse.seeds and replicate_config(cfg, 0) == full
    seed_dir = StudyDir(out).seed_dir(0) if same_training else out / "export"
    run = train_and_score(full, seed_dir, 0, [scorer], models, data)
    info = export(scores_path(seed_dir, scorer.name), export_dir, rate=rec["removal_rate"], run=run.path, force=force)
    return {**info, "recommended": rec}

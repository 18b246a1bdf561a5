"""The Python API; the CLI is a thin shell over these functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import METRICS, Config
from .data import Splits
from .errors import ConfigError, GancleanseError, NonFiniteError
# Imported eagerly: the package attribute ``gancleanse.influence`` must end up being the
# function below, not the subpackage of the same name bound on its first import.
from .influence import score
from .models import GANModules
from .files import write_json_atomic
from .run import Run
from .scores import Scores
from .training import recorder


def export(scores: "Scores | str | Path", out: str | Path, *, rate: float | None = None, count: int | None = None,
           min_harmfulness: float | None = None, run: Run | str | Path | None = None, link: bool = False,
           all_splits: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the training split minus its most harmful instances to ``out``, in its own format.

    ``scores``: a SCORES.csv path (its SCORES.json names the run) or ``Scores`` with ``run``.
    Remove the top ``floor(N * rate)`` or ``count`` (only those with harmfulness >=
    ``min_harmfulness``). See ``gancleanse.export`` for what is written.
    """
    from .export import ScoreTable
    from .export import export as _export

    if isinstance(scores, Scores):
        if run is None:
            raise GancleanseError("export of in-memory Scores needs run= (the run they were computed on)")
        keys = scores.keys or [f"#{i}" for i in range(len(scores.influence))]
        scores = ScoreTable(scores.influence, scores.harmfulness, keys, None,
                            {"metric": scores.metric, "method": scores.method}, scores.keys is not None)
    run_path = run.path if isinstance(run, Run) else run
    return _export(scores, out, rate=rate, count=count, min_harmfulness=min_harmfulness, run=run_path,
                   link=link, all_splits=all_splits, force=force)


def _open(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else Run.open(run)


def train(cfg: Config, out: str | Path, *, models: GANModules | None = None, data: Splits | None = None,
          force: bool = False, progress: bool = True, device: str | None = None) -> Run:
    """Train with recording; returns the opened run directory.

    ``models``: your own generator and discriminator (``GANModules(G, D, z_dim)``; no BatchNorm
    in D), initialized as you built them. ``data``: your own tensors (``Splits.from_tensors`` or
    ``Splits.random_split``), saved into the run directory. Otherwise the config names them.
    ``device``: "auto", "cpu", "cuda" or "cuda:N" instead of the config's ``train.device``.
    """
    return recorder.train(cfg, out, models=models, data=data, force=force, progress=progress, device=device)


def influence(run: Run | str | Path, metric: str = "all", method: str = "itd", *,
              features: str | None = None, seed: int = 0, check: int = 0, progress: bool = True,
              **options: Any) -> Scores:
    """Score every training instance of ``run`` (``gancleanse.influence.METHODS``).

    ``itd`` / ``aid``: influence on ``metric`` (validation split); ``options`` are AID's
    solver options. Baselines: ``isolation_forest`` and ``knn_density`` (``neighbors``) on
    ``features`` ("raw" data or "classifier" features), ``discriminator`` (the trained D's
    logit) and ``random`` (seeded); ``metric`` is then what their trust check measures.

    ``check = K`` (> 0) runs the trust check (``gancleanse.study.trust``): K retrains,
    Kendall tau and Pearson against the actual change of ``metric`` with 90% intervals, in
    ``scores.info["check"]``; an ``UntrustedScoresWarning`` when the ranking is not reliable.
    """
    import warnings

    from .study import trust

    run = _open(run)
    trust.check_size(check, run.n_train)  # before the scoring, which may take long
    scores = score(run, method, metric, features=features, seed=seed, progress=progress, **options)
    check_finite_scores(scores, run)
    scores.keys = run.train_keys
    scores.info["run_id"] = run.id
    if check:
        result = trust.trust_check(run, scores, check, seed=seed, progress=progress)
        scores.info["check"] = result
        text = trust.warning_text(result)
        if text:
            warnings.warn(text, trust.UntrustedScoresWarning, stacklevel=2)
    return scores


def check_finite_scores(scores: Scores, run: Run) -> None:
    """NaN or infinity in an estimate is an error naming where it came from, never a score file."""
    vectors = {"influence": scores.influence, "harmfulness": scores.harmfulness,
               **{f"influence after {k} epoch(s) traced": v for k, v in scores.horizons.items()}}
    for what, v in vectors.items():
        bad = ~np.isfinite(np.asarray(v, dtype=np.float64))
        if bad.any():
            first = [int(i) for i in np.flatnonzero(bad)[:5]]
            raise NonFiniteError(f"{scores.method} {what} on {scores.metric} of run {run.path} has "
                                 f"{int(bad.sum())} non-finite value(s) (instances {first}); nothing was written")


def parse_indices(text: str, n_train: int) -> list[int]:
    """``"3,17,42"`` -> [3, 17, 42], checked against the training split size."""
    try:
        items = [int(tok) for tok in text.split(",") if tok.strip()]
    except ValueError:
        raise GancleanseError(f"--remove expects comma-separated integers, got {text!r}") from None
    return check_indices(items, n_train)


def check_indices(items: Sequence[int], n_train: int) -> list[int]:
    items = [int(i) for i in items]
    if not items:
        raise GancleanseError("no instance to remove was given")
    bad = [i for i in items if not 0 <= i < n_train]
    if bad:
        raise GancleanseError(f"instance index out of range: {bad[:5]} (training split has "
                              f"{n_train} instances, indices 0..{n_train - 1})")
    if len(set(items)) != len(items):
        raise GancleanseError("an instance index is repeated in the removal list")
    return items


def counterfactual(run: Run | str | Path, remove: Sequence[int], metric: str = "all", *,
                   from_epoch: int | None = None, split: str = "valid",
                   progress: bool = False) -> dict[str, Any]:
    """Retrain the recorded window without ``remove`` and report the metric change.

    Restarts from the checkpoint at the start of the window (or of ``from_epoch``) and
    replays the same minibatches and latents with the removed instances' weights at 0.
    """
    # One retrain, forked off the recorded trajectory where ``remove`` is first used: bitwise
    # the same as replaying from ``start``, since nothing differs before that step.
    return counterfactuals(run, [remove], metric, from_epoch=from_epoch, split=split, batched=False,
                           progress=progress)[0]


def counterfactuals(run: Run | str | Path, removals: Sequence[Sequence[int]], metric: str = "all", *,
                    from_epoch: int | None = None, split: str = "valid", batched: bool | None = None,
                    progress: bool = False) -> list[dict[str, Any]]:
    """``counterfactual`` for many removal sets at once: one shared replay of the recorded
    trajectory, each retrain forked off where it first differs and (``batched``) all advanced
    by one vmapped step (None: on fully connected nets, where it pays); equal to separate retrains
    to rounding (bitwise with ``batched=False``)."""
    from .study.validate import retrained_values

    run = _open(run)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    removed = [check_indices(r, run.n_train) for r in removals]
    if not removed:
        return []
    start = run.window_start if from_epoch is None else run.epoch_start_step(from_epoch)
    before, after = retrained_values(run, removed, [metric], split=split, start=start, batched=batched,
                                     progress=progress)
    return [{"metric": metric, "removed": r, "before": before[metric], "after": a, "delta": a - before[metric]}
            for r, a in zip(removed, after[metric])]


def validate(run: Run | str | Path, metric: str = "all", method: str = "itd", instances: int = 20, *,
             seed: int = 0, extremes: bool = False, horizons: bool = False, executor: str = "local",
             workers: int = 1, out: str | Path | None = None, progress: bool = True,
             solver_options: dict[str, Any] | None = None, batched: bool = False) -> dict[str, Any]:
    """Compare estimated with actual (retrained) metric changes for ``instances`` instances.

    The retrains fork off one shared replay where each first differs (bitwise equal to
    separate retrains); ``batched`` also advances them by one vmapped step, faster on small
    networks and equal to rounding (the last digits then depend on how retrains were grouped).

    With ``out`` (a .json path), finished retrains are kept in ``OUT.parts/`` (an interrupted
    validation resumes from them), and a scatter plot is written to ``OUT.png``.
    """
    import tempfile

    from .study import validate as val

    run = _open(run)
    if horizons and method != "itd":
        raise GancleanseError("--horizons needs --method itd (one backward sweep gives every horizon)")
    scores = influence(run, metric, method, progress=progress, **(solver_options or {}))
    chosen = val.choose_instances(scores.influence, instances, seed, extremes)
    spe = run.steps_per_epoch
    final_epoch, first_epoch = run.final_step // spe, run.window_start // spe
    ks = sorted(scores.horizons) if horizons else [final_epoch - first_epoch]
    jobs = [(j, final_epoch - k) for k in ks for j in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        parts = Path(out).with_suffix(".parts") if out else Path(tmp)
        actual = val.retrain_all(run, jobs, [metric], parts, executor=executor,
                                 workers=workers, progress=progress, batched=batched)[metric]

    def panel(k: int) -> dict[str, Any]:
        est = scores.horizons[k] if k in scores.horizons else scores.influence
        e = [float(est[j]) for j in chosen]
        a = [actual[(j, final_epoch - k)] for j in chosen]
        return {"epochs_traced": k, **val.accuracy(e, a), "estimated": e, "actual": a}

    main = panel(ks[-1])
    result: dict[str, Any] = {
        "metric": metric, "method": method, "run": str(run.path), "instances": chosen,
        "n_instances": len(chosen), "seed": seed, "extremes": extremes,
        **{k: main[k] for k in ("kendall_tau", "pearson", "jaccard", "random_jaccard", "epochs_traced")},
        "estimated": main["estimated"], "actual": main["actual"],
        "estimate_info": scores.info,
    }
    if horizons:
        result["horizons"] = {str(k): panel(k) for k in ks}
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        panels = [dict(p, label=f"{p['epochs_traced']} epoch(s) traced")
                  for p in (result["horizons"].values() if horizons else [main])]
        val.scatter_plot(out.with_suffix(".png"), panels, f"{method} influence on {metric}: estimate vs retraining")
        result["plot"] = out.with_suffix(".png").name
        write_json_atomic(out, result)
    return result


def lds(run: Run | str | Path, metric: str = "all", methods: Sequence[str] = ("itd", "random"), *,
        subsets: int = 50, fraction: float = 0.1, seed: int = 0, out: str | Path | None = None,
        progress: bool = True, solver_options: dict[str, Any] | None = None,
        itd_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Linear datamodeling score of each method on ``metric``: Spearman correlation between the
    summed scores of ``subsets`` random subsets (each ``fraction`` of the training split) and
    the actual change of retraining the window without them (``gancleanse.study.lds``).

    Feature scorers are scored on raw data, and also on the classifier's features for images.
    ``solver_options`` go to AID, ``itd_options`` (``relu_smoothing``, ``memory_gb``) to ITD;
    both are recorded in the result. With ``out`` (a .json path), the result is written there.
    """
    from .influence import variant_arguments, variants
    from .study.lds import lds as _lds
    from .study.lds import random_subsets

    run = _open(run)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    random_subsets(run.n_train, subsets, fraction, seed)  # bad sizes fail before any scoring
    image_data = run.splits.train.ndim == 4
    rankings = []
    for method in dict.fromkeys(methods):
        for v in variants(method, [metric], image_data):
            options = {"aid": solver_options or {}, "itd": itd_options or {}}.get(method, {})
            rankings.append(influence(run, method=method, seed=seed, progress=progress,
                                      **variant_arguments(method, v), **options))
    result = _lds(run, rankings, metric, subsets=subsets, fraction=fraction, seed=seed, progress=progress)
    result["scorer_seconds"] = {k: s.info.get("seconds") for k, s in zip(result["scorers"], rankings)}
    result["options"] = {m: dict(o) for m, o in (("aid", solver_options), ("itd", itd_options)) if o}
    if out is not None:
        write_json_atomic(Path(out), result)
    return result


def cleanse(cfg: Config, out: str | Path, *, models: GANModules | None = None, data: Splits | None = None,
            executor: str = "local", workers: int = 1, report: bool = True,
            progress: bool = True, export: str | Path | None = None, force_export: bool = False) -> dict[str, Any]:
    """The whole cleansing study of ``cfg``'s [cleanse] section; resumable in ``out``.

    With ``models``, every replicate starts from the modules' own initial parameters (the
    replicates then differ by data split/seed, minibatch order and latents). With
    ``export``, the scorer and removal rate chosen on the validation split for the first
    metric are applied to the full training split and the cleaned data written there
    (``summary["export"]`` says what was written).
    """
    from .study.cleanse import export_recommended, run_study

    summary = run_study(cfg, Path(out), models=models, data=data, executor=executor, workers=workers,
                        progress=progress)
    if report:
        from .study.report import write_report

        write_report(Path(out))
    if export is not None:
        summary["export"] = export_recommended(cfg, Path(out), Path(export), summary, models=models, data=data,
                                               force=force_export)
    return summary

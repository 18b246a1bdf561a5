"""The Python API: one facade over the services, shared by scripts and the CLI.

Each function opens what it is given (a run directory path or an open ``Run``), fills the shared defaults
(``gancleanse.specs``) and calls the service (training, scoring, study, export, verify module) that does the work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .config import Config, load_config
from .data import Splits
from .errors import ConfigError, GancleanseError
from .export import summary_line as describe_export
from .features import summary_line as describe_features
from .files import claimed_output as claim_output
from .models import GANModules
from .options import ScorerOptions
from .run import Run
from .scores import Scores
from .specs import DEFAULT_CHECK, metric_spec, scorer_spec
from .study.trust import describe as describe_check
from .training import recorder

__all__ = ["Config", "Run", "Scores", "claim_output", "cleanse", "counterfactual", "counterfactuals", "describe_check",
           "describe_export", "describe_features", "download_weights", "export", "influence", "is_study_path", "lds",
           "load_config", "on_device", "open_run", "report", "train", "validate", "verify"]

Options = ScorerOptions | Mapping[str, Any] | None


def on_device(cfg: Config, device: str | None) -> Config:
    """The config with ``device`` as its train.device (a study's runs then record it)."""
    if device is None:
        return cfg
    from .device import resolve

    resolve(device)  # a clear error now rather than in a worker
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))


def open_run(run: Run | str | Path, *, extractor: str | Path | None = None, device: str | None = None,
             features: str | None = None) -> Run:
    """An open run: ``run`` itself, or the run directory at that path; ``features``: its metrics' feature space
    (``gancleanse.features``; default ``[metric] features``)."""
    opened = run if isinstance(run, Run) else Run.open(run, extractor=extractor, device=device)
    return opened.with_features(features)


def train(cfg: Config, out: str | Path, *, models: GANModules | None = None, data: Splits | None = None,
          force: bool = False, progress: bool = True, device: str | None = None) -> Run:
    """Train with recording; returns the opened run directory.

    ``models``: your own generator and discriminator (``GANModules(G, D, z_dim)``; no BatchNorm in D), initialized as
    you built them. ``data``: your own tensors (``Splits.from_tensors`` or ``Splits.random_split``), saved into the run
    directory. Otherwise the config names them. ``device``: "auto", "cpu", "cuda" or "cuda:N" instead of the config's
    ``train.device``.
    """
    return recorder.train(cfg.validate(), out, models=models, data=data, force=force, progress=progress, device=device)


def influence(run: Run | str | Path, metric: str = "all", method: str = "itd", *, features: str | None = None,
              seed: int = 0, check: int | None = None, progress: bool = True, options: Options = None,
              **option_values: Any) -> Scores:
    """Score every training instance of ``run`` (``gancleanse.specs.SCORERS``).

    ``itd`` / ``aid``: influence on ``metric`` (validation split). Baselines: ``isolation_forest`` and ``knn_density``
    on ``features`` ("raw" data by default, or a feature space), ``discriminator`` (the trained D's logit) and ``random``
    (seeded); ``metric`` is then what their trust check measures. ``options``: the scorer's options dataclass
    (``gancleanse.options``) or a mapping; keywords are the same options one by one.

    ``features``: a feature space (``gancleanse.features``: auto, classifier, inception, self_supervised,
    torchscript) is also the one ``metric`` is computed in; "raw" only for the feature scorers.

    ``check = K``: the trust check (``gancleanse.study.trust``): K retrains, Kendall tau and Pearson against the actual
    change of ``metric`` with 90% intervals, in ``scores.info["check"]``; an ``UntrustedScoresWarning`` when the ranking
    is not reliable. None: ``DEFAULT_CHECK`` retrains (at most the training size); 0: off.
    """
    from .study.trust import checked_scores

    if options is not None and option_values:
        raise GancleanseError("give a scorer's options either as options= or as keywords, not both")
    feature_scorer = scorer_spec(method).uses == "features"
    if features == "raw" and not feature_scorer:
        raise ConfigError(f"features = 'raw' applies to isolation_forest and knn_density, not {method}")
    run = open_run(run, features=None if features == "raw" else features)
    check = min(DEFAULT_CHECK, run.n_train) if check is None else check
    return checked_scores(run, method, metric, features=features if feature_scorer else None, seed=seed,
                          check=check, progress=progress, options=options if options is not None else dict(option_values))


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
                   from_epoch: int | None = None, split: str = "valid", progress: bool = False) -> dict[str, Any]:
    """Retrain the recorded window without ``remove`` and report the metric change.

    Restarts from the checkpoint at the start of the window (or of ``from_epoch``) and replays the same minibatches and
    latents with the removed instances' weights at 0; forked off the recorded trajectory where ``remove`` is first used
    (bitwise the same).
    """
    return counterfactuals(run, [remove], metric, from_epoch=from_epoch, split=split, batched=False,
                           progress=progress)[0]


def counterfactuals(run: Run | str | Path, removals: Sequence[Sequence[int]], metric: str = "all", *,
                    from_epoch: int | None = None, split: str = "valid", batched: bool | None = None,
                    progress: bool = False) -> list[dict[str, Any]]:
    """``counterfactual`` for many removal sets at once: one shared replay of the recorded trajectory, each retrain
    forked off where it first differs and (``batched``) all advanced by one vmapped step (None: on fully connected nets,
    where it pays); equal to separate retrains to rounding (bitwise with ``batched=False``)."""
    from .study.validate import counterfactual_changes

    run = open_run(run)
    metric_spec(metric)
    removed = [check_indices(r, run.n_train) for r in removals]
    if not removed:
        return []
    start = run.window_start if from_epoch is None else run.epoch_start_step(from_epoch)
    return counterfactual_changes(run, removed, metric, start=start, split=split, batched=batched, progress=progress)


def validate(run: Run | str | Path, metric: str = "all", method: str = "itd", instances: int = 20, *, seed: int = 0,
             extremes: bool = False, horizons: bool = False, executor: str = "local", workers: int = 1,
             out: str | Path | None = None, progress: bool = True, options: Options = None,
             batched: bool = False) -> dict[str, Any]:
    """Compare estimated with actual (retrained) metric changes for ``instances`` instances.

    The retrains fork off one shared replay where each first differs (bitwise equal to separate retrains); ``batched``
    also advances them by one vmapped step, faster on small networks and equal to rounding (the last digits then depend
    on how retrains were grouped). ``options``: the scorer's options (see ``influence``). With ``out`` (a .json path),
    finished retrains are kept in ``OUT.parts/`` (an interrupted validation resumes from them), and a scatter plot is
    written to ``OUT.png``.
    """
    from .study import validate as validation

    return validation.validate(open_run(run), metric, method, instances, seed=seed, extremes=extremes,
                               horizons=horizons, executor=executor, workers=workers, out=Path(out) if out else None,
                               progress=progress, options=options, batched=batched)


def lds(run: Run | str | Path, metric: str = "all", methods: Sequence[str] = ("itd", "random"), *,
        subsets: int = 50, fraction: float = 0.1, seed: int = 0, out: str | Path | None = None,
        progress: bool = True, options: Mapping[str, Options] | None = None) -> dict[str, Any]:
    """Linear datamodeling score of each method on ``metric``: Spearman correlation between the summed scores of
    ``subsets`` random subsets (each ``fraction`` of the training split) and the actual change of retraining the window
    without them (``gancleanse.study.lds``).

    Feature scorers are scored on raw data, and also on the classifier's features where the run has them. ``options``:
    per method, its options, e.g. ``{"itd": {"relu_smoothing": 0.3}, "aid": AIDOptions(iterations=20)}``; recorded in
    the result. With ``out`` (a .json path), the result is written there.
    """
    from .study.lds import compare_methods

    return compare_methods(open_run(run), metric, methods, subsets=subsets, fraction=fraction, seed=seed,
                           out=Path(out) if out is not None else None, progress=progress, options=options)


def cleanse(cfg: Config, out: str | Path, *, models: GANModules | None = None, data: Splits | None = None,
            executor: str = "local", workers: int = 1, report: bool = True, progress: bool = True,
            export: str | Path | None = None, force_export: bool = False) -> dict[str, Any]:
    """The whole cleansing study of ``cfg``'s [cleanse] section; resumable in ``out``.

    With ``models``, every replicate starts from the modules' own initial parameters (the replicates then differ by data
    split/seed, minibatch order and latents). With ``export``, the scorer and removal rate chosen on the validation
    split for the first metric are applied to the full training split and the cleaned data written there
    (``summary["export"]`` says what was written).
    """
    from .study.cleanse import export_recommended, run_study

    summary = run_study(cfg, Path(out), models=models, data=data, executor=executor, workers=workers, progress=progress)
    if report:
        from .study.report import write_report

        write_report(Path(out))
    if export is not None:
        summary["export"] = export_recommended(cfg, Path(out), Path(export), summary, models=models, data=data,
                                               force=force_export)
    return summary


def export(scores: Scores | str | Path, out: str | Path, *, rate: float | None = None, count: int | None = None,
           min_harmfulness: float | None = None, run: Run | str | Path | None = None, link: bool = False,
           all_splits: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the training split minus its most harmful instances to ``out``, in its own format.

    ``scores``: a SCORES.csv path (its SCORES.json names the run) or ``Scores`` with ``run``. Remove the top
    ``floor(N * rate)`` or ``count`` (only those with harmfulness >= ``min_harmfulness``). See ``gancleanse.export`` for
    what is written.
    """
    from .export import export as write_export

    if isinstance(scores, Scores):
        if run is None:
            raise GancleanseError("export of in-memory Scores needs run= (the run they were computed on)")
        scores = dataclasses.replace(scores, info={"metric": scores.metric, "method": scores.method, **scores.info})
    return write_export(scores, out, rate=rate, count=count, min_harmfulness=min_harmfulness,
                        run=run.path if isinstance(run, Run) else run, link=link, all_splits=all_splits, force=force)


def report(study_dir: str | Path) -> Path:
    """(Re)write ``study_dir/report.html`` from a study's files; returns its path."""
    from .study.report import write_report

    return write_report(Path(study_dir))


def verify(path: str | Path, *, replay: bool = True, device: str | None = None,
           report: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Check a run directory (hashes, schedule, latents, a bitwise replay), or every run of a study directory;
    ``report`` gets one line per check passed. Raises on the first that fails; returns the path verified."""
    from .verify import open_for_replay, verify_run, verify_study

    path = Path(path)
    if is_study_path(path):
        verify_study(path, replay=replay, report=report, progress=progress)
        return path
    run = open_for_replay(path, device)
    verify_run(run, replay=replay, report=report, progress=progress)
    return run.path


def download_weights(name: str = "inception", *, to: str | Path | None = None, url: str | None = None) -> Path:
    """Download the published weights of feature space ``name`` (only "inception") to ``to`` (default: the torch
    hub checkpoint cache, where ``features = inception`` finds them), checked against the published sha256 and
    written atomically; an existing file with the right hash is kept. The only function that uses a network."""
    from .features.weights import download_inception

    if name != "inception":
        raise ConfigError(f"unknown weights {name!r} (known: inception)")
    return download_inception(None if to is None else Path(to), **({} if url is None else {"url": url}))


def is_study_path(path: str | Path) -> bool:
    """Whether ``verify`` takes ``path`` for a study (a directory without run.json)."""
    path = Path(path)
    return path.is_dir() and not (path / "run.json").exists()

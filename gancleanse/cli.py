"""Command line: ``gancleanse train | influence | counterfactual | validate | cleanse | export | report | verify | demo``.

Every subcommand is a thin shell over the Python API in ``gancleanse.api``; user errors
print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import warnings
from importlib import resources
from pathlib import Path

from . import api
from .config import DEFAULT_CHECK, METRICS, Config, load_config
from .errors import GancleanseError
from .influence import METHODS
from .study.trust import describe as describe_check
from .files import write_json_atomic
from .run import Run
from .version import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    run = api.train(cfg, args.out, force=args.force, progress=not args.quiet, device=args.device)
    s = run.meta["seconds"]["train"]
    print(describe_data(run.meta["data"]))
    print(f"trained {run.meta['total_steps']} steps in {s:.1f} s; run directory: {run.path}")
    return 0


def describe_data(data: dict) -> str:
    """One line on the data a run trained on: where from, how many read / skipped, the split."""
    split = f"{data['train']} train / {data['valid']} valid / {data['test']} test, samples {tuple(data['sample_shape'])}"
    if "format" not in data:
        return f"data: {split}"
    skipped = f", {data['n_skipped']} unreadable skipped" if data["n_skipped"] else ""
    return (f"data: {data['n_read']} images read from {data['path']} ({data['format']}{skipped}; labels: "
            f"{data['labels']}); {split}")


def check_out(path: str, suffix: str, force: bool, option: str = "--out") -> Path:
    """An output file path: it must end in ``suffix``; an existing file is replaced only with
    --force, and never a directory. Checked before any work starts."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise GancleanseError(f"{option} {path}: must end in {suffix}")
    for p in (out, out.with_suffix(".json")):
        if p.is_dir():
            raise GancleanseError(f"{option} {path}: {p} is a directory")
        if (p.exists() or p.is_symlink()) and not force:
            raise GancleanseError(f"{option} {path}: {p} exists (use --force to replace it)")
    return out


def _write_scores(scores: api.Scores, out: Path, run: Run) -> None:
    """SCORES.csv, SCORES.json (what produced it) and, if any, SCORES.horizons.csv."""
    scores.to_csv(out)
    info = {"metric": scores.metric, "method": scores.method, "run": str(run.path.resolve()),
            "n_train": run.n_train, **scores.info}
    if scores.horizons:
        hpath = out.with_name(out.stem + ".horizons.csv")
        scores.horizons_to_csv(hpath)
        info["horizons_file"] = hpath.name
        info["horizons"] = sorted(scores.horizons)
    write_json_atomic(out.with_suffix(".json"), info)


def _print_top(scores: api.Scores, k: int) -> None:
    harm = scores.harmfulness
    keys = scores.keys or [f"#{i}" for i in range(len(harm))]
    print(f"{k} most harmful instances for {scores.metric} (removal predicted to improve it most):")
    print(f"{'rank':>4}  {'index':>7}  {'influence':>13}  {'harmfulness':>13}  key")
    for r, i in enumerate(scores.most_harmful(k), 1):
        print(f"{r:>4}  {i:>7}  {scores.influence[i]:>13.5e}  {harm[i]:>13.5e}  {keys[i]}")


def _cmd_influence(args: argparse.Namespace) -> int:
    out = check_out(args.out, ".csv", args.force)
    run = Run.open(args.run, extractor=args.extractor, device=args.device)
    check = min(DEFAULT_CHECK, run.n_train) if args.check is None else args.check
    scores = api.influence(run, args.metric, args.method, features=args.features, seed=args.seed, check=check,
                           progress=not args.quiet, **_solver_options(args))
    if not args.horizons:
        scores.horizons = {}
    _write_scores(scores, out, run)
    if args.top:
        _print_top(scores, min(args.top, run.n_train))
    if "check" in scores.info:
        print(describe_check(scores.info["check"]), file=sys.stderr)
    print(f"wrote {args.out} ({run.n_train} rows) in {scores.info.get('seconds', 0.0):.1f} s", file=sys.stderr)
    return 0


def _itd_flags(args: argparse.Namespace) -> dict:
    """ITD's options given on the command line (only those set)."""
    return {k: v for k in ("relu_smoothing", "memory_gb") if (v := getattr(args, k, None)) is not None}


def _itd_options(args: argparse.Namespace, methods: list[str]) -> dict:
    """ITD's options given on the command line of a command that compares several scorers."""
    itd = _itd_flags(args)
    if itd and "itd" not in methods:
        flag = "--" + next(iter(itd)).replace("_", "-")
        raise GancleanseError(f"{flag} applies to ITD, which --methods does not include")
    return itd


def _solver_options(args: argparse.Namespace) -> dict:
    """The scorer's options given on the command line (only those set)."""
    itd = _itd_flags(args)
    if itd:
        if args.method != "itd":
            flag = "--" + next(iter(itd)).replace("_", "-")
            raise GancleanseError(f"{flag} applies to --method itd, not {args.method}")
        return itd
    if getattr(args, "neighbors", None) is not None:
        if args.method != "knn_density":
            raise GancleanseError(f"--neighbors applies to --method knn_density, not {args.method}")
        return {"neighbors": args.neighbors}
    return _aid_options(args) if args.method == "aid" else {}


def _aid_options(args: argparse.Namespace) -> dict:
    names = ("solver", "iterations", "step", "damping", "tol", "batch_size", "operator_size")
    return {n: getattr(args, f"aid_{n}") for n in names if getattr(args, f"aid_{n}") is not None}


def _cmd_counterfactual(args: argparse.Namespace) -> int:
    run = Run.open(args.run, extractor=args.extractor, device=args.device)
    removed = api.parse_indices(args.remove, run.n_train)
    result = api.counterfactual(run, removed, args.metric, from_epoch=args.from_epoch,
                                progress=not args.quiet)
    print(json.dumps(result))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    check_out(args.out, ".json", args.force)
    res = api.validate(Run.open(args.run, extractor=args.extractor, device=args.device), args.metric, args.method, args.instances, seed=args.seed,
                       extremes=args.extremes, horizons=args.horizons, executor=args.executor,
                       workers=args.workers, out=args.out, progress=not args.quiet, batched=args.batched,
                       solver_options=_solver_options(args))
    rows = list(res["horizons"].values()) if args.horizons else [res]
    print(f"{'epochs traced':>13}  {'kendall tau':>11}  {'pearson':>8}  {'jaccard':>8}  (random jaccard "
          f"{res['random_jaccard']:.3f}, {res['n_instances']} instances)")
    for r in rows:
        tau, r_ = (("n/a" if v is None else f"{v:.3f}") for v in (r["kendall_tau"], r["pearson"]))
        print(f"{r['epochs_traced']:>13}  {tau:>11}  {r_:>8}  {r['jaccard']:>8.3f}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}", file=sys.stderr)
    return 0


def _cmd_lds(args: argparse.Namespace) -> int:
    if args.out:
        check_out(args.out, ".json", args.force)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GancleanseError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'} "
                              f"(known: {', '.join(METHODS)})")
    res = api.lds(Run.open(args.run, extractor=args.extractor, device=args.device), args.metric, methods, subsets=args.subsets,
                  fraction=args.fraction, seed=args.seed, out=args.out, progress=not args.quiet,
                  solver_options=_aid_options(args), itd_options=_itd_options(args, methods))
    cost = "" if res["retrain_cost_epochs"] is None else f", {res['retrain_cost_epochs']:.1f} training epochs"
    print(f"LDS on {res['metric']}: {res['subsets']} subsets of {res['n_removed']} instances "
          f"({res['fraction']:g} of the training split) retrained in {res['retrain_seconds']:.1f} s{cost}")
    print(f"{'scorer':<28}{'LDS (Spearman)':>15}  90% interval")
    for name, r in res["scorers"].items():
        value = "n/a" if r["lds"] is None else f"{r['lds']:.3f}"
        iv = "" if r["interval"] is None else f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
        print(f"{name:<28}{value:>15}  {iv}")
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_cleanse(args: argparse.Namespace) -> int:
    cfg = _on_device(load_config(args.config), args.device)
    summary = api.cleanse(cfg, args.out, executor=args.executor, workers=args.workers,
                          report=not args.no_report, progress=not args.quiet, export=args.export,
                          force_export=args.force)
    _print_summary(summary)
    out = Path(args.out)
    _print_recommendation(summary, args.config, out, cfg.cleanse.metrics[0])
    if "export" in summary:
        from .export import summary_line

        print(summary_line(summary["export"]))
    print(f"\nresults: {out / 'results.csv'}, {out / 'summary.csv'}"
          + ("" if args.no_report else f"\nreport:  {out / 'report.html'}"))
    return 0


def _print_recommendation(summary: dict, config: str, out: Path, metric: str) -> None:
    """The scorer and rate chosen on the validation split, and the command that applies them."""
    for r in summary.get("recommended", []):
        verdict = "improves" if r["improves_validation"] else "does not improve"
        print(f"\nchosen on the validation split for {r['eval_metric']}: {r['method']}-{r['score_metric']} "
              f"removing {r['removal_rate']:g} ({r['n_removed']} instances) {verdict} it "
              f"(validation {r['mean_valid_delta']:+.4g}, test {r['mean_delta']:+.4g})")
        if r["eval_metric"] == metric and r["improves_validation"]:
            print(f"export the cleaned training data with it:\n  gancleanse cleanse {config} --out {out} "
                  f"--export CLEANED_DIR")


def _print_summary(summary: dict) -> None:
    print(f"{'method':<18}{'scored on':<12}{'evaluated':<10}{'rate':>6}{'removed':>9}"
          f"{'mean change':>14}{'std':>11}{'p':>8}")
    for r in summary["by_rate"]:
        p = "" if r["p_value"] is None else f"{r['p_value']:.3f}"
        print(f"{r['method']:<18}{r['score_metric']:<12}{r['eval_metric']:<10}{r['removal_rate']:>6g}"
              f"{r['n_removed']:>9}{r['mean_delta']:>14.4e}{r['std_delta']:>11.2e}{p:>8}")
    if summary.get("checks"):
        print("\ntrust check (Kendall tau of the ranking against retraining, per seed, 90% interval):")
        for c in summary["checks"]:
            per_seed = ", ".join("n/a" if t is None else f"{t:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")
                                 for t, iv in zip(c["kendall_tau"], c["kendall_tau_interval"]))
            flag = "" if not c["n_flagged"] else \
                f"   <- trusted on {c['n_trusted']} of {len(c['seeds'])} seeds"
            print(f"  {c['method'] + '-' + c['score_metric']:<28} on {c['check_metric']:<7} {per_seed}{flag}")


def _on_device(cfg: Config, device: str | None) -> Config:
    """The config with ``--device`` as its train.device (a study's runs then record it)."""
    if device is None:
        return cfg
    from .device import resolve

    resolve(device)  # a clear error now rather than in a worker
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import summary_line

    info = api.export(args.scores, args.out, rate=args.rate, count=args.count,
                      min_harmfulness=args.min_harmfulness, run=args.run, link=args.link,
                      all_splits=args.all_splits, force=args.force)
    print(summary_line(info))
    print(f"removed instances: {Path(args.out) / 'removed.csv'}"
          + (f", {Path(args.out) / 'removed.png'}" if info["removed_png"] else ""))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import open_for_replay, verify_run, verify_study

    path = Path(args.run)
    if path.is_dir() and not (path / "run.json").exists():
        print(f"verifying the study {path}")
        verify_study(path, replay=not args.no_replay, report=lambda line: print(f"  ok  {line}"),
                     progress=not args.quiet)
        print(f"{path}: every check passed")
        return 0
    run = open_for_replay(path, args.device)
    print(f"verifying {run.path}")
    verify_run(run, replay=not args.no_replay, report=lambda line: print(f"  ok  {line}"),
               progress=not args.quiet)
    print(f"{run.path}: every check passed")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .study.report import write_report

    path = write_report(Path(args.dir))
    print(f"report: {path}")
    return 0


def embedded_config(name: str) -> Config:
    """A config shipped inside the package (``gancleanse/examples/NAME.toml``)."""
    import tomllib

    text = resources.files("gancleanse").joinpath(f"examples/{name}.toml").read_text()
    return Config.from_dict(tomllib.loads(text), source=f"embedded {name}.toml")


def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cfg = _on_device(embedded_config("demo"), args.device)
    c = cfg.cleanse
    print(f"2D Gaussian GAN: {cfg.data.n_train} instances, {cfg.train.epochs} epochs, seeds {c.seeds}; "
          f"influence on ALL by ITD (last epoch traced); removal rates {c.removal_rates}; -> {out}")
    summary = api.cleanse(cfg, out, workers=args.workers, progress=not args.quiet)
    seed_dir = out / "seeds" / f"seed_{c.seeds[0]}"
    scores_path = seed_dir / "scores" / "itd-all.csv"
    run = Run.open(seed_dir / "run", device="cpu")
    from .study.cleanse import read_scores

    harm = read_scores(scores_path)
    scores = api.Scores("all", "itd", harm, harm)
    print()
    _print_top(scores, 10)
    print(f"\nscores of all {run.n_train} instances (seed {c.seeds[0]}): {scores_path}\n")
    _print_summary(summary)
    print(f"\nresults: {out / 'results.csv'}, {out / 'summary.csv'}\nreport:  {out / 'report.html'}")
    return 0


def _itd_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--relu-smoothing", type=float, default=None, metavar="T",
                    help="itd: differentiate ReLU kinks as if smoothed over a width T (the training is unchanged); "
                         "try 0.2 x the typical |pre-activation| when 5 or more epochs are traced")
    sp.add_argument("--memory-gb", type=float, default=None, metavar="GB",
                    help="itd: memory for the reverse pass's graphs (default: half of what is available); "
                         "a smaller budget replays each checkpoint segment once more, same result")


def _aid_arguments(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("AID solver (with --method aid)")
    g.add_argument("--aid-solver", choices=("gmres", "cg", "neumann"), default=None,
                   help="adjoint solver (default gmres)")
    g.add_argument("--aid-iterations", type=int, default=None,
                   help="Krylov vectors / CG steps / series terms (default 100 / 200 / 1000)")
    g.add_argument("--aid-step", type=float, default=None, help="Neumann step size s")
    g.add_argument("--aid-damping", type=float, default=None, metavar="LAMBDA",
                   help="solve (J + lambda I)^T v = grad V; default: damped on the recorded window's time "
                        "scale in the training's step sizes; 0: the undamped equilibrium")
    g.add_argument("--aid-tol", type=float, default=None, help="relative residual to reach (default 1e-6)")
    g.add_argument("--aid-batch-size", type=int, default=None,
                   help="neumann: fresh minibatches of this many instances and latents per iteration")
    g.add_argument("--aid-operator-size", type=int, default=None,
                   help="training instances (and latents) of the fixed Jacobian operator (default all, up to 2048)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gancleanse", description=(
        "Estimate how each training instance changes a GAN evaluation metric, remove the harmful "
        "ones, and check the result on held-out data."))
    p.add_argument("--version", action="version", version=f"gancleanse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    def device(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default=None, metavar="DEVICE",
                        help="auto, cpu, cuda or cuda:N (default: the config's train.device, auto: CUDA when available)")

    def extractor(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--extractor", default=None, metavar="FILE.pt",
                        help="TorchScript feature extractor for is/log_is/fid/kid (loading it runs its code, so a "
                             "run's stored metric.extractor is used only when named here)")

    sp = sub.add_parser("train", help="train a GAN and record a run directory")
    sp.add_argument("config", help="TOML config file")
    sp.add_argument("--out", required=True, help="run directory to create")
    sp.add_argument("--force", action="store_true", help="replace an existing run directory")
    device(sp)
    common(sp)
    sp.set_defaults(func=_cmd_train)

    sp = sub.add_parser("influence", help="score every training instance")
    sp.add_argument("run", help="run directory written by `gancleanse train`")
    sp.add_argument("--metric", choices=METRICS, default="all")
    sp.add_argument("--method", choices=METHODS, default="itd")
    sp.add_argument("--out", required=True, help="SCORES.csv to write (index,influence,harmfulness,key); "
                    "SCORES.json beside it says what produced it")
    sp.add_argument("--force", action="store_true", help="replace an existing SCORES.csv")
    sp.add_argument("--horizons", action="store_true",
                    help="also write the estimate for every number of epochs traced back (SCORES.horizons.csv)")
    sp.add_argument("--top", type=positive_int, default=0, metavar="K", help="print the K most harmful instances")
    sp.add_argument("--features", choices=("raw", "classifier"), default=None,
                    help="isolation_forest / knn_density: raw data (default) or the metric classifier's features")
    sp.add_argument("--neighbors", type=positive_int, default=None, metavar="K",
                    help="knn_density: rank by the distance to the K-th nearest instance (default 5)")
    sp.add_argument("--seed", type=int, default=0, help="random / isolation_forest / aid / trust-check seed")
    sp.add_argument("--check", type=int, default=None, metavar="K",
                    help=f"trust check: retrain without K instances (half from the ranking's extremes) and report "
                         f"Kendall tau and Pearson against the actual changes, with 90%% intervals, in SCORES.json "
                         f"(default {DEFAULT_CHECK}; 0: skip)")
    _itd_arguments(sp)
    _aid_arguments(sp)
    device(sp)
    common(sp)
    extractor(sp)
    sp.set_defaults(func=_cmd_influence)

    sp = sub.add_parser("counterfactual", help="retrain the recorded window without some instances")
    sp.add_argument("run")
    sp.add_argument("--remove", required=True, metavar="I[,I...]", help="training indices to remove")
    sp.add_argument("--metric", choices=METRICS, default="all")
    sp.add_argument("--from-epoch", type=int, default=None,
                    help="restart at this epoch's start (inside the recorded window) instead of the window start")
    device(sp)
    common(sp)
    extractor(sp)
    sp.set_defaults(func=_cmd_counterfactual)

    sp = sub.add_parser("validate", help="compare estimates with counterfactual retraining")
    sp.add_argument("run")
    sp.add_argument("--metric", choices=METRICS, default="all")
    sp.add_argument("--method", choices=METHODS, default="itd")
    sp.add_argument("--instances", type=int, default=20, metavar="K", help="instances to retrain without")
    sp.add_argument("--out", required=True, help="VALID.json to write (a scatter plot goes beside it)")
    sp.add_argument("--force", action="store_true", help="replace an existing VALID.json")
    sp.add_argument("--seed", type=int, default=0, help="seed of the instance choice")
    sp.add_argument("--extremes", action="store_true",
                    help="take half of the instances from the extremes of the estimate")
    sp.add_argument("--horizons", action="store_true", help="validate every recorded horizon (itd)")
    sp.add_argument("--executor", choices=("local", "ray"), default="local")
    sp.add_argument("--workers", type=int, default=1, help="parallel retrains")
    sp.add_argument("--batched", action="store_true",
                    help="advance retrains together by one vmapped step (faster on small networks; equal to "
                         "rounding, not bitwise)")
    _itd_arguments(sp)
    _aid_arguments(sp)
    device(sp)
    common(sp)
    extractor(sp)
    sp.set_defaults(func=_cmd_validate)

    sp = sub.add_parser("lds", help="linear datamodeling score: summed scores vs retraining without random subsets")
    sp.add_argument("run")
    sp.add_argument("--metric", choices=METRICS, default="all")
    sp.add_argument("--methods", default="itd,aid,isolation_forest,knn_density,discriminator,random",
                    metavar="M[,M...]", help="scorers to compare (default: every one)")
    sp.add_argument("--subsets", type=int, default=50, metavar="S", help="random subsets to retrain without")
    sp.add_argument("--fraction", type=float, default=0.1, metavar="F",
                    help="each subset's share of the training split (0 < F < 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the subsets (and of seeded scorers)")
    sp.add_argument("--out", default=None, help="LDS.json to write (per scorer: lds, interval, predicted; actual)")
    sp.add_argument("--force", action="store_true", help="replace an existing LDS.json")
    _itd_arguments(sp)
    _aid_arguments(sp)
    device(sp)
    common(sp)
    extractor(sp)
    sp.set_defaults(func=_cmd_lds)

    sp = sub.add_parser("cleanse", help="the whole cleansing study of a config, with report")
    sp.add_argument("config", help="TOML config with a [cleanse] section")
    sp.add_argument("--out", required=True, help="study directory (resumed if it exists)")
    sp.add_argument("--executor", choices=("local", "ray"), default="local")
    sp.add_argument("--workers", type=int, default=1, help="parallel jobs")
    sp.add_argument("--no-report", action="store_true", help="skip report.html")
    sp.add_argument("--export", default=None, metavar="CLEANED_DIR",
                    help="apply the scorer and rate chosen on the validation split (first metric) to the full "
                         "training split and write the cleaned data there, in its own format")
    sp.add_argument("--force", action="store_true", help="replace an earlier export at --export")
    device(sp)
    common(sp)
    sp.set_defaults(func=_cmd_cleanse)

    sp = sub.add_parser("export", help="write the training data minus the most harmful instances, in its format")
    sp.add_argument("scores", help="SCORES.csv written by `gancleanse influence` (its .json names the run)")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, default=None, help="remove the most harmful fraction R of the training split")
    how.add_argument("--count", type=int, default=None, help="remove the N most harmful instances")
    sp.add_argument("--min-harmfulness", type=float, default=None, metavar="H",
                    help="remove only instances with harmfulness >= H (alone: all of them)")
    sp.add_argument("--out", required=True, help="directory to create (the data, removed.csv, removed.png)")
    sp.add_argument("--run", default=None, help="run directory of the scores (default: from SCORES.json)")
    sp.add_argument("--link", action="store_true", help="hard-link image files instead of copying them")
    sp.add_argument("--all-splits", action="store_true", help="also export the validation and test instances")
    sp.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    sp.set_defaults(func=_cmd_export)

    sp = sub.add_parser("report", help="regenerate DIR/report.html from a study's outputs")
    sp.add_argument("dir", help="study directory written by `gancleanse cleanse`")
    sp.set_defaults(func=_cmd_report)

    sp = sub.add_parser("verify", help="check a run (or every run of a study): hashes, schedule, latents, "
                        "bitwise replay")
    sp.add_argument("run", help="run directory written by `gancleanse train`, or a study directory")
    sp.add_argument("--no-replay", action="store_true", help="skip replaying the recorded window")
    device(sp)
    common(sp)
    sp.set_defaults(func=_cmd_verify)

    sp = sub.add_parser("demo", help="the main job: a reduced 2D cleansing study on the embedded default")
    sp.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; resumed)")
    sp.add_argument("--workers", type=int, default=1, help="parallel jobs")
    device(sp)
    common(sp)
    sp.set_defaults(func=_cmd_demo)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"gancleanse: warning: {message}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staging directories, locks and workers are cleaned up."""


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line per warning; restored on exit
            return args.func(args)
    except GancleanseError as e:
        print(f"gancleanse: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named cannot be read or written
        where = f": {e.filename}" if e.filename else ""
        print(f"gancleanse: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gancleanse: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("gancleanse: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``gancleanse COMMAND``, one per entry of ``COMMANDS`` (train, influence, ..., verify, demo).

Every subcommand is a thin shell over ``gancleanse.api``; the choices, defaults and scorer flags come from the
registries (``gancleanse.specs``, ``gancleanse.options``), so the CLI and the API cannot disagree. User errors print one
line naming the problem and exit 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, NoReturn

from . import api
from .cli_arguments import (cleanse_arguments, counterfactual_arguments, demo_arguments, export_arguments,
                            given_options, influence_arguments, lds_arguments, report_arguments, train_arguments,
                            validate_arguments, verify_arguments, weights_arguments)
from .config import embedded_config
from .errors import GancleanseError
from .specs import METHODS
from .version import __version__


def _cmd_train(args: argparse.Namespace) -> None:
    run = api.train(api.load_config(args.config), args.out, force=args.force, progress=not args.quiet,
                    device=args.device)
    print(describe_data(run.meta["data"]))
    print(f"trained {run.meta['total_steps']} steps in {run.meta['seconds']['train']:.1f} s; run directory: {run.path}")


def describe_data(data: dict) -> str:
    """One line on the data a run trained on: where from, how many read / skipped, the split."""
    split = (f"{data['train']} train / {data['valid']} valid / {data['test']} test, "
             f"samples {tuple(data['sample_shape'])}")
    if "format" not in data:
        return f"data: {split}"
    skipped = f", {data['n_skipped']} unreadable skipped" if data["n_skipped"] else ""
    return (f"data: {data['n_read']} images read from {data['path']} ({data['format']}{skipped}; labels: "
            f"{data['labels']}); {split}")


def _open(args: argparse.Namespace, features: bool = True) -> api.Run:
    """The run named on the command line (``features``: with its metrics in ``--features``)."""
    return api.open_run(args.run, extractor=args.extractor, device=args.device,
                        features=args.features if features else None)


def _print_top(scores: api.Scores, k: int) -> None:
    keys, harm = scores.key_list(), scores.harmfulness
    print(f"{k} most harmful instances for {scores.metric} (removal predicted to improve it most):")
    print(f"{'rank':>4}  {'index':>7}  {'influence':>13}  {'harmfulness':>13}  key")
    for r, i in enumerate(scores.most_harmful(k), 1):
        print(f"{r:>4}  {i:>7}  {scores.influence[i]:>13.5e}  {harm[i]:>13.5e}  {keys[i]}")


def _cmd_influence(args: argparse.Namespace) -> None:
    out = Path(args.out)
    run = _open(args, features=False)  # api.influence applies --features (it may mean raw data)
    options = given_options(args, [args.method], option="--method").get(args.method)
    scores = api.influence(run, args.metric, args.method, features=args.features, seed=args.seed,
                           check=args.check, progress=not args.quiet, options=options)
    if not args.horizons:
        scores.horizons = {}
    scores.save(out, run)
    if args.top:
        _print_top(scores, min(args.top, run.n_train))
    for key in ("metric_features", "feature_model"):
        if key in scores.info:
            print(api.describe_features(scores.info[key]), file=sys.stderr)
    if "check" in scores.info:
        print(api.describe_check(scores.info["check"]), file=sys.stderr)
    print(f"wrote {args.out} ({run.n_train} rows) in {scores.info.get('seconds', 0.0):.1f} s", file=sys.stderr)


def _cmd_counterfactual(args: argparse.Namespace) -> None:
    run = _open(args)
    removed = api.parse_indices(args.remove, run.n_train)
    print(json.dumps(api.counterfactual(run, removed, args.metric, from_epoch=args.from_epoch,
                                        progress=not args.quiet)))


def _cmd_validate(args: argparse.Namespace) -> None:
    options = given_options(args, [args.method], option="--method").get(args.method)
    res = api.validate(_open(args), args.metric, args.method, args.instances, seed=args.seed, extremes=args.extremes,
                       horizons=args.horizons, executor=args.executor, workers=args.workers, out=args.out,
                       progress=not args.quiet, batched=args.batched, options=options)
    rows = list(res["horizons"].values()) if args.horizons else [res]
    print(f"{'epochs traced':>13}  {'kendall tau':>11}  {'pearson':>8}  {'jaccard':>8}  (random jaccard "
          f"{res['random_jaccard']:.3f}, {res['n_instances']} instances)")
    for r in rows:
        tau, pearson = (("n/a" if v is None else f"{v:.3f}") for v in (r["kendall_tau"], r["pearson"]))
        print(f"{r['epochs_traced']:>13}  {tau:>11}  {pearson:>8}  {r['jaccard']:>8.3f}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}", file=sys.stderr)


def _cmd_lds(args: argparse.Namespace) -> None:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise GancleanseError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'} "
                              f"(known: {', '.join(METHODS)})")
    options = given_options(args, methods, option="--methods")
    res = api.lds(_open(args), args.metric, methods, subsets=args.subsets, fraction=args.fraction,
                  seed=args.seed, out=args.out, progress=not args.quiet, options=options)
    cost = "" if res["retrain_cost_epochs"] is None else f", {res['retrain_cost_epochs']:.1f} training epochs"
    print(f"LDS on {res['metric']}: {res['subsets']} subsets of {res['n_removed']} instances "
          f"({res['fraction']:g} of the training split) retrained in {res['retrain_seconds']:.1f} s{cost}")
    print(f"{'scorer':<28}{'LDS (Spearman)':>15}  90% interval")
    for name, r in res["scorers"].items():
        value = "n/a" if r["lds"] is None else f"{r['lds']:.3f}"
        interval = "" if r["interval"] is None else f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
        print(f"{name:<28}{value:>15}  {interval}")
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


def _cmd_cleanse(args: argparse.Namespace) -> None:
    cfg = api.on_device(api.load_config(args.config), args.device)
    summary = api.cleanse(cfg, args.out, executor=args.executor, workers=args.workers, report=not args.no_report,
                          progress=not args.quiet, export=args.export, force_export=args.force)
    _print_summary(summary)
    out = Path(args.out)
    _print_recommendation(summary, args.config, out, cfg.cleanse.metrics[0])
    if "export" in summary:
        print(api.describe_export(summary["export"]))
    print(f"\nresults: {out / 'results.csv'}, {out / 'summary.csv'}"
          + ("" if args.no_report else f"\nreport:  {out / 'report.html'}"))


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
            flag = f"   <- trusted on {c['n_trusted']} of {len(c['seeds'])} seeds" if c["n_flagged"] else ""
            print(f"  {c['method'] + '-' + c['score_metric']:<28} on {c['check_metric']:<7} {per_seed}{flag}")


def _cmd_export(args: argparse.Namespace) -> None:
    info = api.export(args.scores, args.out, rate=args.rate, count=args.count, min_harmfulness=args.min_harmfulness,
                      run=args.run, link=args.link, all_splits=args.all_splits, force=args.force)
    print(api.describe_export(info))
    print(f"removed instances: {Path(args.out) / 'removed.csv'}"
          + (f", {Path(args.out) / 'removed.png'}" if info["removed_png"] else ""))


def _cmd_verify(args: argparse.Namespace) -> None:
    print(f"verifying the study {args.run}" if api.is_study_path(args.run) else f"verifying {args.run}")
    verified = api.verify(args.run, replay=not args.no_replay, device=args.device,
                          report=lambda line: print(f"  ok  {line}"), progress=not args.quiet)
    print(f"{verified}: every check passed")


def _cmd_report(args: argparse.Namespace) -> None:
    print(f"report: {api.report(args.dir)}")


def _cmd_weights(args: argparse.Namespace) -> None:
    path = api.download_weights(args.name, to=args.to, url=args.url)
    print(f"{args.name} weights: {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cfg = api.on_device(embedded_config("demo"), args.device)
    c = cfg.cleanse
    print(f"2D Gaussian GAN: {cfg.data.n_train} instances, {cfg.train.epochs} epochs, seeds {c.seeds}; "
          f"influence on ALL by ITD (last epoch traced); removal rates {c.removal_rates}; -> {out}")
    summary = api.cleanse(cfg, out, workers=args.workers, progress=not args.quiet)
    scores_path = out / "seeds" / f"seed_{c.seeds[0]}" / "scores" / "itd-all.csv"
    scores = api.Scores.load(scores_path)
    print()
    _print_top(scores, 10)
    print(f"\nscores of all {len(scores.harmfulness)} instances (seed {c.seeds[0]}): {scores_path}\n")
    _print_summary(summary)
    print(f"\nresults: {out / 'results.csv'}, {out / 'summary.csv'}\nreport:  {out / 'report.html'}")


OUTPUTS = {"influence": ".csv", "validate": ".json", "lds": ".json"}  # commands writing the one file --out names
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]] = {
    "train": ("train a GAN and record a run directory", train_arguments, _cmd_train),
    "influence": ("score every training instance", influence_arguments, _cmd_influence),
    "counterfactual": ("retrain the recorded window without some instances", counterfactual_arguments,
                       _cmd_counterfactual),
    "validate": ("compare estimates with counterfactual retraining", validate_arguments, _cmd_validate),
    "lds": ("linear datamodeling score: summed scores vs retraining without random subsets", lds_arguments, _cmd_lds),
    "cleanse": ("the whole cleansing study of a config, with report", cleanse_arguments, _cmd_cleanse),
    "export": ("write the training data minus the most harmful instances in its format", export_arguments, _cmd_export),
    "report": ("regenerate DIR/report.html from a study's outputs", report_arguments, _cmd_report),
    "verify": ("check a run or study: hashes, schedule, latents, bitwise replay", verify_arguments, _cmd_verify),
    "weights": ("download a feature network's published weights once (the only command that uses a network)",
                weights_arguments, _cmd_weights),
    "demo": ("the main job: a reduced 2D cleansing study on the embedded default", demo_arguments, _cmd_demo),
}


class Parser(argparse.ArgumentParser):
    """argparse with gancleanse's error format: one line naming the argument, exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("gancleanse").strip()
        self.exit(2, f"gancleanse: error: {command + ': ' if command else ''}{_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gancleanse", description="Estimate how each training instance changes a GAN evaluation metric, "
               "remove the harmful ones, and check the result on held-out data.")
    p.add_argument("--version", action="version", version=f"gancleanse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, add_arguments, command) in COMMANDS.items():
        sp = sub.add_parser(name, help=text)
        add_arguments(sp)
        sp.set_defaults(func=command)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"gancleanse: warning: {message}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staging directories, locks and workers are cleaned up."""


def _on_sigterm(signum, frame) -> None:  # noqa: ANN001
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may install signal handlers
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line per warning; restored on exit
            suffix = OUTPUTS.get(args.command)
            if suffix is None or args.out is None:
                args.func(args)
                return 0
            with api.claim_output(args.out, suffix, args.force):  # held until the command ends
                args.func(args)
            return 0
    except GancleanseError as e:
        print(f"gancleanse: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named cannot be read or written
        where = f": {e.filename}" if e.filename else ""
        print(f"gancleanse: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        print(f"gancleanse: {'interrupted' if interrupted else 'terminated'}", file=sys.stderr)
        return 130 if interrupted else 143  # 128 + the number of SIGINT or SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())

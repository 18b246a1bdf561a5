"""Estimation accuracy against counterfactual retraining over seeds, beside the paper's table.

The ICLR 2021 Experiment-1 protocol: per seed (data draw and training seed), train with the
whole training recorded, take ITD's estimate for every horizon k from one backward sweep
over the last max(k) epochs, retrain without each of K instances from the start of each
horizon (forked, vmapped retrains), and compare: Kendall tau and the Jaccard index of the
extremes (5% + 5%: 10 + 10 at K = 200). The final table gives, per k, the mean and std
over seeds beside the paper's row.

``--surrogate T ...`` also takes ITD with the ReLUs kink-smoothed at temperature T
(``gancleanse.influence.surrogate``: the same trajectory, the Dirac of ReLU's second
derivative spread over a width T) and scores it against the same retrains.
``--aid gmres`` adds AID damped on each horizon's time scale (single-seed style; slow).

``--setup mnist`` is the paper's own MNIST protocol on the real files in ../shared/data/mnist (``--data
DIR`` elsewhere; the four gzipped IDX files): 10k / 10k / 10k, the 7-layer sigmoid + LayerNorm DCGAN,
SGD lr 1e-3, batch 100, weight decay 1e-3, 50 epochs (all recorded; ITD sweeps the last max(k)), FID and
log IS on 10k generated samples, k = 1, 5, 10. A seed costs many hours on a CPU (the retrains dominate:
K instances x about k epochs each), so ``--instances`` says how many of the paper's 200 the run affords.
``--smoke`` checks the same pipeline in minutes (1,000 images, 5 epochs, k = 1, 2, 6 instances, 1 seed;
its numbers mean nothing).

Run dirs (a killed training resumes), retrains (``*.parts``), estimates and per-seed results are kept in
``--workdir``: a rerun with the same workdir and options resumes, and reuses every finished seed. With
``--workers N`` every job of the unfinished seeds runs on one pool of N processes (one core each): a seed's
training and estimates, then, queued as soon as they are done, its retrains, ``--chunk`` per job (one on
mnist, so that a killed sitting loses at most one retrain per worker). Costs are reported in one core's
seconds (training, each sweep, the retrains summed), which do not depend on the workers or the sittings.

Usage:
  .venv/bin/python bench/validation_accuracy.py --setup 2d --workdir /tmp/acc-relu \
      --surrogate 0.01 0.03 0.1
  .venv/bin/python bench/validation_accuracy.py --setup 2d --activation softplus --horizons 1 \
      --workdir /tmp/acc-softplus
  .venv/bin/python bench/validation_accuracy.py --setup digits --seeds 1 --instances 20 --horizons 1 5 \
      --aid gmres --aid-iterations 20 --aid-operator-size 200
  .venv/bin/python bench/validation_accuracy.py --setup mnist --seeds 3 --instances 40 --workers 2 \
      --workdir runs/acc-mnist                     # resumable across sittings
  .venv/bin/python bench/validation_accuracy.py --setup mnist --smoke --workdir /tmp/acc-mnist-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch

import gancleanse as gc
from cleansing_tables import MNIST_DIR, check_mnist
from gancleanse.config import Config
from gancleanse.data.base import as_float
from gancleanse.files import atomic_write, write_json_atomic
from gancleanse.influence.itd import itd_influence
from gancleanse.influence.surrogate import smoothed_relu
from gancleanse.metrics import make_metric
from gancleanse.progress import current_job
from gancleanse.study.executor import call, run_tasks
from gancleanse.locks import DirectoryLock
from gancleanse.study.validate import (RETRAIN_CHUNK, Retrain, accuracy, choose_instances, counterfactual_deltas,
                                       random_jaccard, retrain_all, retrain_tasks, store_retrains, stored_retrains)
from gancleanse.training import recorder

PAPER = {  # DESIGN.md section 3: ICLR 2021, 10 seeds, 200 instances; setup -> metric -> row
    "2d": {"all": {"tau": {1: 0.87, 5: 0.84, 10: 0.85, 20: 0.84, 50: 0.67},
                   "jaccard": {1: 0.57, 5: 0.46, 10: 0.53, 20: 0.43, 50: 0.29}}},
    "digits": {"fid": {"tau": {1: 0.95, 5: 0.87, 10: 0.73, 20: 0.44, 50: 0.23},
                       "jaccard": {1: 0.82, 5: 0.70, 10: 0.50, 20: 0.27, 50: 0.18}},
               "log_is": {"tau": {1: 0.92, 5: 0.80, 10: 0.68, 20: 0.35, 50: 0.07},
                          "jaccard": {1: 0.78, 5: 0.63, 10: 0.42, 20: 0.23, 50: 0.16}}},
}

PAPER["mnist"] = PAPER["digits"]

DCGAN = {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid", "norm": "layer",
         "bias": True, "dtype": "float32"}  # the paper's 7-layer MNIST DCGAN
SETUPS = {
    "2d": {"data": {"name": "gaussian2d", "n_train": 10000, "n_valid": 1000, "n_test": 1000},
           "model": {"activation": "relu"},
           "train": {"epochs": 50, "record_from_epoch": 0, "checkpoint_every": 50}},
    "digits": {"data": {"name": "digits", "n_train": 1000, "n_valid": 400, "n_test": 397, "image_size": 28},
               "model": DCGAN,
               "train": {"epochs": 20, "batch_size": 100, "weight_decay_d": 1e-3, "weight_decay_g": 1e-3,
                         "record_from_epoch": 0, "checkpoint_every": 10},
               "metric": {"n_samples": 400}},
    # the ICLR 2021 protocol (METHOD_NOTES 3.1); data.path is added from --data. Checkpoints every epoch: the
    # retrains fork off one replay from each horizon's start, an epoch boundary.
    "mnist": {"data": {"name": "mnist", "n_train": 10000, "n_valid": 10000, "n_test": 10000},
              "model": DCGAN,
              "train": {"epochs": 50, "batch_size": 100, "optimizer": "sgd", "lr_d": 1e-3, "lr_g": 1e-3,
                        "weight_decay_d": 1e-3, "weight_decay_g": 1e-3, "record_from_epoch": 0,
                        "checkpoint_every": 100},
              "metric": {"n_samples": 10000, "classifier_epochs": 50}},
}
SMOKE = {  # --smoke (mnist): the pipeline end to end in minutes, not the protocol
    "spec": {"data": {"n_train": 1000, "n_valid": 500, "n_test": 500}, "train": {"epochs": 5},
             "metric": {"n_samples": 500, "classifier_epochs": 2}},
    "horizons": [1, 2], "instances": 6, "seeds": 1,
}
DEFAULT_METRICS = {"mnist": ["fid", "log_is"]}  # else the first of the paper's rows


class LastEpochs:
    """A run seen as if recorded only over its last ``epochs`` epochs.

    ITD's snapshot for horizon k only depends on the last k epochs of the backward sweep,
    so sweeping the last max(k) epochs gives the same estimates as the whole window at a
    fraction of the cost. Everything but the window start is the run's own.
    """

    def __init__(self, run: gc.Run, epochs: int) -> None:
        final_epoch = run.final_step // run.steps_per_epoch
        self._run = run
        self.window_start = run.epoch_start_step(max(final_epoch - epochs, run.window_start // run.steps_per_epoch))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)


def itd_horizons(run: gc.Run, metric: str, horizons: list[int], cache: Path, label: str,
                 temperature: float | None = None) -> tuple[dict[int, np.ndarray], float]:
    """ITD's estimate per horizon (cached by run id and variant) and the sweep's seconds."""
    if cache.is_file():
        rec = np.load(cache)
        if str(rec["run_id"]) == run.id and sorted(int(k) for k in rec["horizons"]) == sorted(horizons):
            return {int(k): rec[f"k{k}"] for k in rec["horizons"]}, float(rec["seconds"])
    view = LastEpochs(run, max(horizons))
    m = make_metric(metric, run, "valid")
    if temperature is None:
        res = itd_influence(view, m, progress=False)
    else:
        with smoothed_relu(run.models, temperature) as n:
            if n == 0:
                raise SystemExit(f"--surrogate: the {label} model has no ReLU to smooth")
            res = itd_influence(view, m, progress=False)
    out = {k: res.horizons[k].numpy() for k in horizons}
    with atomic_write(cache, binary=True) as f:
        np.savez(f, run_id=run.id, horizons=np.array(horizons), seconds=res.seconds,
                 **{f"k{k}": v for k, v in out.items()})
    return out, res.seconds


def preactivation_scale(run: gc.Run) -> float:
    """Median |input| of the ReLUs at the final state (D on real and generated validation
    data, G on the validation latents): the scale temperatures are compared with."""
    seen: list[torch.Tensor] = []
    hooks = [mod.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach().abs().flatten()))
             for root in (run.models.generator, run.models.discriminator) for mod in root.modules()
             if isinstance(mod, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    try:
        state = run.final_state()
        z = run.eval_latents("valid")
        fake = run.models.generate(state["g"], z)
        run.models.discriminate(state["d"], fake)
        real = as_float(run.splits.valid[: len(z)], run.dtype)
        run.models.discriminate(state["d"], real)
    finally:
        for h in hooks:
            h.remove()
    return float(torch.cat(seen).median()) if seen else float("nan")


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"


def fmt_t(t: float) -> str:
    return f"{t:g}"


def mean_std(values: list[float | None]) -> str:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if not len(v):
        return "n/a"
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def variant_name(estimator: str, metric: str, metrics: list[str]) -> str:
    """``ITD``, or ``ITD [log_is]`` for the metrics after the first."""
    return estimator if metric == metrics[0] else f"{estimator} [{metric}]"


def seed_config(args: argparse.Namespace, seed: int) -> tuple[Config, str]:
    """The setup's config for ``seed`` (data draw and training), and the tag naming its files in the workdir."""
    spec = json.loads(json.dumps(SETUPS[args.setup]))
    for section, values in (SMOKE["spec"] if args.smoke else {}).items():
        spec[section].update(values)
    if args.setup == "mnist":
        spec["data"]["path"] = str(args.data.resolve())
    spec.setdefault("train", {})["seed"] = seed
    spec.setdefault("data", {})["seed"] = seed
    if args.activation:
        spec.setdefault("model", {})["activation"] = args.activation
    cfg = Config.from_dict(spec)
    return cfg, f"{args.setup}{'-smoke' if args.smoke else ''}-{cfg.model.activation}-seed{seed}"


def request(args: argparse.Namespace) -> dict[str, Any]:
    """What a seed's stored result was computed for: reused only when all of it matches."""
    # format 3: costs in one core's seconds, the metric classifier's included; older results are recomputed from parts
    return {"format": 3,
            "setup": args.setup, "smoke": args.smoke, "activation": args.activation, "metrics": args.metrics,
            "horizons": args.horizons, "instances": args.instances, "surrogate": args.surrogate,
            "aid": [args.aid, args.aid_iterations, args.aid_operator_size]}


def stored_result(path: Path, run_dir: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """A finished seed's result from an earlier sitting, if of the same request and of the run now in ``run_dir``."""
    if not (path.is_file() and (run_dir / "run.json").is_file()):
        return None
    stored = json.loads(path.read_text())
    if stored.get("request") != wanted or stored.get("run_id") != gc.Run.open(run_dir).id:
        return None
    return {**stored, "reused": True}


def train_and_estimate(args: argparse.Namespace, seed: int, work: Path) -> tuple[gc.Run, dict[str, Any]]:
    """A seed's run (trained unless done; a killed training resumes) and ITD's estimates per metric and surrogate
    (cached in ``work``): everything of a seed but its retrains, one core's work. ``trained``: the run was trained
    (or its killed training resumed) by this call."""
    cfg, tag = seed_config(args, seed)
    run_dir, report = work / tag, current_job()
    trained = not (run_dir / "run.json").is_file()
    if not trained:
        run = gc.Run.open(run_dir)
    else:
        report.stage("train")
        run = recorder.train(cfg.validate(), run_dir, progress=args.progress and report.channel is None,
                              on_step=report.step)  # a pool job's lines come from the display
    final_epoch = run.final_step // run.steps_per_epoch
    horizons = [k for k in args.horizons if 1 <= k <= final_epoch - run.window_start // run.steps_per_epoch]
    variants: dict[str, dict[int, np.ndarray]] = {}
    variant_metric: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for m in args.metrics:
        name = variant_name("ITD", m, args.metrics)
        report.stage(f"ITD {m}")
        cache = work / (f"{tag}.itd.npz" if m == args.metrics[0] else f"{tag}.itd-{m}.npz")
        variants[name], seconds[name] = itd_horizons(run, m, horizons, cache, tag)
        variant_metric[name] = m
    for t in args.surrogate:
        name = f"ITD~T={fmt_t(t)}"
        report.stage(f"ITD~T={fmt_t(t)}")
        variants[name], seconds[name] = itd_horizons(run, args.metrics[0], horizons,
                                                     work / f"{tag}.itd-T{fmt_t(t)}.npz", tag, temperature=t)
        variant_metric[name] = args.metrics[0]
    return run, {"horizons": horizons, "variants": variants, "variant_metric": variant_metric, "seconds": seconds,
                 "trained": trained}


def prepare_seed(args: argparse.Namespace, seed: int, work: Path) -> bool:
    """``train_and_estimate`` as a pool job: whether it trained the run here."""
    return train_and_estimate(args, seed, work)[1]["trained"]


def unfinished_seeds(args: argparse.Namespace, seeds: list[int], work: Path) -> list[int]:
    """The seeds without a stored result of this request."""
    tags = {s: seed_config(args, s)[1] for s in seeds}
    return [s for s, tag in tags.items()
            if stored_result(work / f"{tag}.result.json", work / tag, request(args)) is None]


def retrain_plan(args: argparse.Namespace, seed: int, work: Path, run: gc.Run, horizons: list[int],
                 estimate: dict[int, np.ndarray]) -> tuple[list[int], list[Retrain], Path]:
    """A prepared seed's instances (drawn from ITD's estimate for the longest horizon), its retrains
    (instance, from_epoch) and the directory keeping them."""
    final_epoch = run.final_step // run.steps_per_epoch
    chosen = choose_instances(estimate[horizons[-1]], args.instances, seed, extremes=False)
    jobs = [(j, final_epoch - k) for k in horizons for j in chosen]
    return chosen, jobs, work / f"{seed_config(args, seed)[1]}.parts"


def job_label(key: Hashable) -> str:
    kind, seed, *rest = key
    if kind == "prepare":
        return f"seed {seed}"
    epoch, indices = rest
    return f"seed {seed} i{indices[0]}{f' +{len(indices) - 1}' if len(indices) > 1 else ''} from epoch {epoch}"


def run_seeds(args: argparse.Namespace, seeds: list[int], work: Path) -> dict[int, bool]:
    """Every job of ``seeds`` on one pool of ``--workers``: each seed's training and estimates, and as soon as
    they are done its retrains (stored in its ``.parts``), so no worker idles while a last seed trains alone.
    Returns, per seed, whether its run was trained (or its killed training resumed) here."""
    trained: dict[int, bool] = {}
    plans: dict[int, tuple[gc.Run, Path, dict]] = {}
    with ExitStack() as locks:
        def then(key: Hashable, result: Any) -> list[tuple[Hashable, tuple]]:
            kind, seed = key[0], key[1]
            if kind != "prepare":
                return []
            trained[seed] = result
            run, prepared = train_and_estimate(args, seed, work)  # opens the run, reads the cached estimates
            _, jobs, parts = retrain_plan(args, seed, work, run, prepared["horizons"], prepared["variants"]["ITD"])
            parts.mkdir(parents=True, exist_ok=True)
            locks.enter_context(DirectoryLock(parts, "validation"))
            done = stored_retrains(run, args.metrics, parts)
            plans[seed] = (run, parts, done)
            return [(("retrain", seed, *k), (counterfactual_deltas, a))
                    for k, a in retrain_tasks(run, jobs, args.metrics, done, args.workers, args.chunk, None)]

        tasks = [(("prepare", s), (prepare_seed, (args, s, work))) for s in seeds]
        for key, result in run_tasks(call, tasks, workers=args.workers, progress=args.progress,
                                     desc="train+ITD+retrain", label=job_label, then=then):
            if key[0] == "retrain":
                run, parts, done = plans[key[1]]
                store_retrains(run, parts, args.metrics, tuple(key[2:]), result, done)
    return trained


def one_seed(args: argparse.Namespace, seed: int, work: Path, trained_here: bool | None = None) -> dict[str, Any]:
    """A seed's accuracy (stored in ``work``; a stored one of the same request is reused). ``trained_here``:
    ``prepare_seed``'s answer when ``run_seeds`` ran it in this sitting."""
    metrics = args.metrics
    metric = metrics[0]
    cfg, tag = seed_config(args, seed)
    run_dir = work / tag
    if (stored := stored_result(work / f"{tag}.result.json", run_dir, request(args))) is not None:
        return stored
    run, prepared = train_and_estimate(args, seed, work)
    resumed = not (prepared["trained"] if trained_here is None else trained_here)
    horizons, variants, variant_metric, seconds = (prepared["horizons"], prepared["variants"],
                                                   prepared["variant_metric"], prepared["seconds"])
    epoch_seconds = run.meta["seconds"]["train"] / cfg.train.epochs
    final_epoch = run.final_step // run.steps_per_epoch
    chosen, jobs, parts = retrain_plan(args, seed, work, run, horizons, variants["ITD"])
    actual = retrain_all(run, jobs, metrics, parts, executor="local", workers=args.workers,
                         progress=args.progress, batched=None,  # vmapped where that pays; each on every metric
                         chunk=args.chunk)
    own = [stored_retrains(run, [metric], parts)[metric][key].get("seconds") for key in jobs]
    retrain_s = None if None in own else float(sum(own))  # one core's seconds, whatever the workers and sittings

    if args.aid != "none":
        lr = max(cfg.train.lr_d, cfg.train.lr_g)
        for k in horizons:
            # Damped on k epochs' time scale (SGD: lambda = 1 / (lr k S)); else the run's default.
            damping = 1.0 / (lr * k * run.steps_per_epoch) if cfg.train.optimizer == "sgd" else None
            options = {"iterations": args.aid_iterations, "operator_size": args.aid_operator_size}
            est = gc.influence(run, metric, "aid", solver=args.aid, damping=damping, check=0, progress=False,
                               **{n: v for n, v in options.items() if v is not None})
            variants.setdefault("AID", {})[k] = np.asarray(est.influence)
            seconds["AID"] = seconds.get("AID", 0.0) + float(est.info["seconds"])
            variant_metric["AID"] = metric

    acc: dict[str, dict[int, dict[str, float | None]]] = {}
    for name, est in variants.items():
        acc[name] = {}
        for k in horizons:
            a = [actual[variant_metric[name]][(j, final_epoch - k)] for j in chosen]
            acc[name][k] = accuracy([float(est[k][j]) for j in chosen], a)
    train_s, classifier_s = run.meta["seconds"]["train"], classifier_seconds(run)
    result = {
        "seed": seed, "run_id": run.id, "data_fingerprint": run.meta.get("data_fingerprint"),
        "horizons": horizons, "instances": len(chosen),
        "metrics": variant_metric,
        "accuracy": {n: {str(k): v for k, v in a.items()} for n, a in acc.items()},
        "estimate_seconds": seconds, "retrain_seconds": retrain_s,
        "retrain_steps": sum(k * run.steps_per_epoch for k in horizons) * len(chosen),
        "epoch_seconds": epoch_seconds, "train_seconds": train_s, "run_resumed": resumed,
        "preactivation_median": preactivation_scale(run) if args.surrogate else None,
        "classifier_seconds": classifier_s,
        "core_seconds": None if retrain_s is None else train_s + (classifier_s or 0.0) + sum(seconds.values())
        + retrain_s,
        "request": request(args),
    }
    write_json_atomic(work / f"{tag}.result.json", result)
    return result


def classifier_seconds(run: gc.Run) -> float | None:
    """Seconds the run's metric classifier took to train (on the first metric's first use, then cached in the
    run directory), if the run's metrics use one."""
    path = run.path / "classifier.json"
    return json.loads(path.read_text()).get("train_seconds") if path.is_file() else None


def print_seed(r: dict[str, Any]) -> None:
    names = list(r["accuracy"])
    head = " ".join(f"{n + ' tau':>14} {'J':>5}" for n in names)
    trace = f"run {r['run_id'][:12]}" + (f", data {r['data_fingerprint']}" if r.get("data_fingerprint") else "")
    print(f"\nseed {r['seed']} ({trace}){' (stored by an earlier sitting)' if r.get('reused') else ''}: "
          f"{seconds(r['core_seconds'])} of one core (training {r['train_seconds']:.0f} s, "
          + (f"metric classifier {r['classifier_seconds']:.0f} s, " if r.get("classifier_seconds") else "")
          + f"retrains {seconds(r['retrain_seconds'])}, "
          + "estimates " + ", ".join(f"{n} {s:.0f} s" for n, s in r["estimate_seconds"].items()) + ")"
          + (f"; median |ReLU input| {r['preactivation_median']:.3g}" if r["preactivation_median"] else ""))
    print(f"{'k':>4} | {head}")
    for k in r["horizons"]:
        cells = []
        for n in names:
            a = r["accuracy"][n][str(k)]
            tau = "n/a" if a["kendall_tau"] is None else f"{a['kendall_tau']:.3f}"
            cells.append(f"{tau:>14} {a['jaccard']:>5.2f}")
        print(f"{k:>4} | {' '.join(cells)}", flush=True)


def print_summary(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    names = list(results[0]["accuracy"])
    of_metric = results[0]["metrics"]
    horizons = results[0]["horizons"]
    n_inst = results[0]["instances"]
    smoke = " SMOKE RUN (checks the pipeline; its numbers mean nothing)" if args.smoke else ""
    activation = args.activation or SETUPS[args.setup].get("model", {}).get("activation")
    print(f"\n{args.setup}{smoke}, activation {activation}, "
          f"metrics {', '.join(args.metrics)}: {len(results)} seed(s) "
          f"({', '.join(str(r['seed']) for r in results)}), K = {n_inst} instances; mean ± std over seeds")
    print(f"{'k':>4} | {'estimator':<16} | {'Kendall tau':>12} | {'Jaccard':>12}")
    for k in horizons:
        for m in args.metrics:
            for n in (n for n in names if of_metric[n] == m):
                rows = [r["accuracy"][n][str(k)] for r in results]
                print(f"{k:>4} | {n:<16} | {mean_std([a['kendall_tau'] for a in rows]):>12} | "
                      f"{mean_std([a['jaccard'] for a in rows]):>12}")
            paper = PAPER[args.setup].get(m)
            if paper:
                print(f"{k:>4} | {variant_name('paper (ITD)', m, args.metrics):<16} | "
                      f"{paper['tau'].get(k, math.nan):>12.2f} | {paper['jaccard'].get(k, math.nan):>12.2f}")
    print(f"random: tau 0, Jaccard {random_jaccard(n_inst):.3f}")
    if len(names) > 1:
        print("\nper-seed Kendall tau (k: estimator: seeds in order)")
        for k in horizons:
            for n in names:
                taus = [r["accuracy"][n][str(k)]["kendall_tau"] for r in results]
                print(f"{k:>4} | {n:<14} | " + " ".join("  n/a" if t is None else f"{t:5.2f}" for t in taus))
        rivals = [n for n in names[1:] if of_metric[n] == of_metric["ITD"]]  # other estimators of ITD's metric
        if rivals:
            print("\nmean change of tau against ITD (std over seeds; seeds where it rises)")
        for k in horizons if rivals else []:
            base = [r["accuracy"]["ITD"][str(k)]["kendall_tau"] for r in results]
            for n in rivals:
                d = np.array([r["accuracy"][n][str(k)]["kendall_tau"] - b for r, b in zip(results, base)])
                print(f"{k:>4} | {n:<14} | {d.mean():+.3f} ({d.std(ddof=1) if len(d) > 1 else 0.0:.3f}); "
                      f"{int((d > 0).sum())}/{len(d)} up")
    costed = [r for r in results if r.get("core_seconds") is not None]
    steps = results[0]["retrain_steps"]
    print("\ncost per seed in one core's seconds (mean over seeds; each job ran on one core, whatever the "
          "workers and sittings)")
    print(f"  training: {np.mean([r['train_seconds'] for r in results]):.0f} s")
    if (cls := [r["classifier_seconds"] for r in results if r.get("classifier_seconds")]):
        print(f"  the metric classifier (trained on the seed's labelled split): {np.mean(cls):.0f} s")
    for n in results[0]["estimate_seconds"]:
        s = np.array([r["estimate_seconds"][n] for r in results])
        print(f"  {n}: {s.mean():.1f} s (sweep over the last {max(horizons)} epochs)")
    if costed:
        rs = np.array([r["retrain_seconds"] for r in costed])
        ep = np.array([r["epoch_seconds"] for r in costed])
        print(f"  retrains ({len(horizons)} horizons x {n_inst} instances, {steps} retrain-steps if unforked): "
              f"{rs.mean():.0f} s = {np.mean(rs / ep):.0f} training epochs "
              f"({rs.mean() / (len(horizons) * n_inst):.1f} s per retrain)")
        print(f"  total: {np.mean([r['core_seconds'] for r in costed]) / 3600:.2f} core-hours per seed"
              + (f" ({len(costed)} of {len(results)} seeds; the others' retrains were stored without their times)"
                 if len(costed) < len(results) else ""))
    else:
        print("  retrains: stored without their times (by an older version); delete the .parts to time them")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=list(SETUPS), default="2d")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (data draw and training; default 10)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--activation", choices=["relu", "softplus", "elu"], default=None,
                    help="the model's activation (default: relu on 2d, the setup's own on digits)")
    ap.add_argument("--instances", type=int, default=None, help="instances retrained per seed (default 200)")
    ap.add_argument("--horizons", type=int, nargs="+", default=None, help="epochs traced back (default 1 5 10)")
    ap.add_argument("--metrics", nargs="+", default=None,
                    help="metrics to estimate and retrain for (default: all on 2d, fid on digits, fid log_is on "
                         "mnist: the paper's MNIST rows); the first one picks the instances")
    ap.add_argument("--surrogate", type=float, nargs="*", default=[],
                    help="temperatures of kink-smoothed ReLU ITD, scored against the same retrains")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes: seeds trained and estimated at once, then each seed's retrains")
    ap.add_argument("--chunk", type=int, default=None,
                    help="most retrains per job (they share a replay up to their forks; a killed sitting loses up "
                         f"to one job per worker): default 1 on mnist (minutes each), else {RETRAIN_CHUNK}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--aid", default="none", help="AID solver (e.g. gmres), or 'none' to skip AID")
    ap.add_argument("--aid-iterations", type=int, default=None)
    ap.add_argument("--aid-operator-size", type=int, default=None,
                    help="instances per Jacobian product (keep small for image GANs)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--progress", action="store_true", help="training and retrain progress (stderr)")
    ap.add_argument("--data", type=Path, default=MNIST_DIR, help="mnist: the directory of the four IDX files")
    ap.add_argument("--smoke", action="store_true", help="mnist: a SMOKE RUN to check the pipeline "
                    "(1,000 images, 5 epochs, k = 1 2, 6 instances, 1 seed unless given), not the protocol")
    args = ap.parse_args()
    if args.smoke and args.setup != "mnist":
        raise SystemExit("--smoke applies to --setup mnist")
    if args.setup == "mnist":
        check_mnist(args.data)
    defaults = SMOKE if args.smoke else {"horizons": [1, 5, 10], "instances": 200, "seeds": 10}
    for key, value in defaults.items():
        if key != "spec" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.chunk is None:
        args.chunk = 1 if args.setup == "mnist" else RETRAIN_CHUNK
    if args.chunk < 1:
        raise SystemExit(f"--chunk must be at least 1, got {args.chunk}")
    torch.set_num_threads(args.threads)
    args.horizons = sorted(set(args.horizons))
    args.metrics = list(dict.fromkeys(args.metrics or DEFAULT_METRICS.get(args.setup, [next(iter(PAPER[args.setup]))])))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gancleanse-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{' '.join(sys.argv)}\nworkdir {work}", flush=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    trained: dict[int, bool] = {}
    if args.workers > 1 and args.aid == "none" and (todo := unfinished_seeds(args, seeds, work)):
        trained = run_seeds(args, todo, work)  # one core per job; AID (in one_seed) is not a pool job
    results = []
    for seed in seeds:
        results.append(one_seed(args, seed, work, trained.get(seed)))
        print_seed(results[-1])
    print_summary(args, results)


if __name__ == "__main__":
    main()

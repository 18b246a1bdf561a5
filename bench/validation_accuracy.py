"""Estimation accuracy against counterfactual retraining, per horizon, beside the paper's table.

Trains once with the whole training recorded, takes ITD's estimate for every horizon k from
one backward sweep, retrains without each of K instances from the start of each horizon,
and prints Kendall tau and Jaccard (5% + 5% extremes) per k for ITD, and for AID at the
final point damped on each horizon's time scale. Also prints AID's time against one
training epoch.

Usage:
  .venv/bin/python bench/validation_accuracy.py --setup 2d [--instances 40] [--workers 2]
  .venv/bin/python bench/validation_accuracy.py --setup digits --instances 20 --horizons 1 5 \
      --aid-iterations 20 --aid-operator-size 200
The paper used K = 200 and 10 seeds; K is smaller here for time (it is printed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.study.validate import accuracy, choose_instances, retrain_all

PAPER = {  # DESIGN.md section 3: ICLR 2021, 10 seeds, 200 instances
    "2d": {"metric": "all", "tau": {1: 0.87, 5: 0.84, 10: 0.85, 20: 0.84, 50: 0.67},
           "jaccard": {1: 0.57, 5: 0.46, 10: 0.53, 20: 0.43, 50: 0.29}},
    "digits": {"metric": "fid", "tau": {1: 0.95, 5: 0.87, 10: 0.73, 20: 0.44, 50: 0.23},
               "jaccard": {1: 0.82, 5: 0.70, 10: 0.50, 20: 0.27, 50: 0.18}},
}

SETUPS = {
    "2d": {"data": {"name": "gaussian2d", "n_train": 10000, "n_valid": 1000, "n_test": 1000},
           "train": {"epochs": 50, "record_from_epoch": 0, "checkpoint_every": 50}},
    "digits": {"data": {"name": "digits", "n_train": 1000, "n_valid": 400, "n_test": 397, "image_size": 28},
               "model": {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid",
                         "norm": "layer", "bias": True, "dtype": "float32"},
               "train": {"epochs": 20, "batch_size": 100, "weight_decay_d": 1e-3, "weight_decay_g": 1e-3,
                         "record_from_epoch": 0, "checkpoint_every": 10},
               "metric": {"n_samples": 400}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", choices=list(SETUPS), default="2d")
    ap.add_argument("--instances", type=int, default=40)
    ap.add_argument("--horizons", type=int, nargs="*", default=[1, 5, 10, 20, 50])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aid", default="gmres", help="AID solver, or 'none' to skip AID")
    ap.add_argument("--aid-iterations", type=int, default=None)
    ap.add_argument("--aid-operator-size", type=int, default=None,
                    help="instances per Jacobian product (keep small for image GANs)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    metric = PAPER[args.setup]["metric"]
    spec = json.loads(json.dumps(SETUPS[args.setup]))
    spec.setdefault("train", {})["seed"] = args.seed
    spec.setdefault("data", {})["seed"] = args.seed
    cfg = Config.from_dict(spec)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gancleanse-bench-"))
    run_dir = work / f"{args.setup}-seed{args.seed}"
    run = gc.Run.open(run_dir) if (run_dir / "run.json").is_file() else gc.train(cfg, run_dir)
    epoch_seconds = run.meta["seconds"]["train"] / cfg.train.epochs
    itd = gc.influence(run, metric, "itd")
    horizons = [k for k in args.horizons if k in itd.horizons]
    chosen = choose_instances(itd.influence, args.instances, args.seed, extremes=False)
    final_epoch = run.final_step // run.steps_per_epoch
    jobs = [(j, final_epoch - k) for k in horizons for j in chosen]
    tic = time.perf_counter()
    actual = retrain_all(run, jobs, metric, work / f"{args.setup}-seed{args.seed}.parts",
                         executor="local", workers=args.workers, progress=True)
    retrain_s = time.perf_counter() - tic
    aid: dict[int, gc.Scores] = {}
    if args.aid != "none":
        # One AID estimate per horizon: damped on k epochs' time scale (SGD: lambda = 1 / (lr k S));
        # with other optimizers, the run's default (the whole recorded window).
        lr = max(cfg.train.lr_d, cfg.train.lr_g)
        for k in horizons:
            damping = 1.0 / (lr * k * run.steps_per_epoch) if cfg.train.optimizer == "sgd" else None
            options = {"iterations": args.aid_iterations, "operator_size": args.aid_operator_size}
            aid[k] = gc.influence(run, metric, "aid", solver=args.aid, damping=damping, progress=False,
                                  **{n: v for n, v in options.items() if v is not None})
    paper = PAPER[args.setup]
    print(f"\n{args.setup}: metric {metric}, {run.n_train} instances, {cfg.train.epochs} epochs, "
          f"K = {len(chosen)} instances (paper: 200), seed {args.seed}; retrains took {retrain_s:.0f} s")
    print(f"{'k':>4} | {'ITD tau':>8} {'ITD J':>7} | {'AID tau':>8} {'AID J':>7} | "
          f"{'paper tau':>9} {'paper J':>8} | random J")
    for k in horizons:
        a = [actual[(j, final_epoch - k)] for j in chosen]
        acc = accuracy([float(itd.horizons[k][j]) for j in chosen], a)
        acc_aid = accuracy([float(aid[k].influence[j]) for j in chosen], a) if aid else None
        aid_cols = f"{acc_aid['kendall_tau']:>8.3f} {acc_aid['jaccard']:>7.3f}" if aid else f"{'-':>8} {'-':>7}"
        print(f"{k:>4} | {acc['kendall_tau']:>8.3f} {acc['jaccard']:>7.3f} | {aid_cols} | "
              f"{paper['tau'].get(k, float('nan')):>9.2f} {paper['jaccard'].get(k, float('nan')):>8.2f} | "
              f"{acc['random_jaccard']:.3f}")
    print(f"ITD sweep over all {cfg.train.epochs} epochs: {itd.info['seconds']:.1f} s "
          f"({itd.info['seconds'] / epoch_seconds:.2f} training epochs)")
    for k, est in aid.items():
        info = est.info
        print(f"AID ({info['solver']}, damped for k = {k}): {info['seconds']:.1f} s = "
              f"{info['seconds'] / epoch_seconds:.2f} training epochs; residual {info['residual']:.2e}, "
              f"{info['iterations']} iterations, converged {info['converged']}")


if __name__ == "__main__":
    main()

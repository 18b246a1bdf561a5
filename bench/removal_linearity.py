"""Is a removal inside the estimate's linear range? Finite differences of one instance's weight, on a real run.

ITD is the derivative of the metric in an instance's weight, followed back through the training; removing
the instance is a step of the whole weight (1 -> 0). Where the two disagree, this tells why: for each
instance, retrain from the horizon's start with its weight 1 - f for each fraction f, and print
(V(1 - f) - V) / f. As f -> 0 this tends to the derivative, so it should meet ITD's estimate (else the
estimate is wrong); at f = 1 it is the removal. A slope that drifts away from the estimate as f grows
measures how far the removal is outside the linear range of the training's response.

Each retrain is evaluated on every ``--metrics``. Estimates come from the accuracy bench's caches
(``--estimates``, one per metric: its ``<seed tag>.itd*.npz`` of the same run), else from an ITD sweep over
the last k epochs here.

Usage (a seed of the MNIST accuracy protocol: the two instances whose retrains disagree most with ITD at
k = 5, and one it gets right):
  .venv/bin/python bench/removal_linearity.py --run runs/acc-mnist/mnist-sigmoid-seed0 --horizon 5 \\
      --metrics fid log_is --estimates runs/acc-mnist/mnist-sigmoid-seed0.itd{,-log_is}.npz \\
      --instances 409 1750 5435 --fractions 0.01 0.1 0.5 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import gancleanse as gc
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.study.validate import weighted_values
from validation_accuracy import LastEpochs


def estimates(run: gc.Run, metric: str, k: int, cache: Path | None) -> np.ndarray:
    """ITD's estimate of removal during the last ``k`` epochs: from the accuracy bench's cache of this run, or
    swept here."""
    if cache is not None:
        rec = np.load(cache)
        if str(rec["run_id"]) != run.id:
            raise SystemExit(f"--estimates: {cache} is of another run ({rec['run_id']}, not {run.id})")
        if f"k{k}" not in rec:
            raise SystemExit(f"--estimates: {cache} has no horizon {k} (it has {sorted(rec['horizons'].tolist())})")
        return rec[f"k{k}"]
    res = itd_influence(LastEpochs(run, k), make_metric(metric, run, "valid"), progress=False)
    return res.horizons[k].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--metrics", nargs="+", default=["fid"])
    ap.add_argument("--horizon", type=int, required=True, help="k: the weight changes during the last k epochs")
    ap.add_argument("--instances", type=int, nargs="+", required=True)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--estimates", type=Path, nargs="+", default=None,
                    help="the accuracy bench's ITD caches of this run, one per metric in the same order")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not all(0 < f <= 1 for f in args.fractions):
        raise SystemExit(f"--fractions must be in (0, 1], got {args.fractions}")
    torch.set_num_threads(args.threads)
    run = gc.Run.open(args.run)
    final_epoch = run.final_step // run.steps_per_epoch
    if not 1 <= args.horizon <= final_epoch - run.window_start // run.steps_per_epoch:
        raise SystemExit(f"--horizon {args.horizon}: the run records epochs {run.window_start // run.steps_per_epoch}"
                         f" to {final_epoch}")
    if not all(0 <= j < run.n_train for j in args.instances):
        raise SystemExit(f"--instances must be training indices below {run.n_train}")
    if args.estimates is not None and len(args.estimates) != len(args.metrics):
        raise SystemExit(f"--estimates: one per metric ({len(args.metrics)}), got {len(args.estimates)}")
    caches = args.estimates or [None] * len(args.metrics)
    est = {m: estimates(run, m, args.horizon, c) for m, c in zip(args.metrics, caches)}
    fractions = sorted(set(args.fractions))
    pairs = [(j, f) for j in args.instances for f in fractions]
    weights = torch.ones(len(pairs), run.n_train, dtype=run.dtype)
    for row, (j, f) in enumerate(pairs):
        weights[row, j] = 1.0 - f
    step = {pair: 1.0 - float(weights[row, pair[0]]) for row, pair in enumerate(pairs)}  # f in the run's dtype
    tic = time.perf_counter()
    before, after = weighted_values(run, weights, args.metrics,
                                    start=run.epoch_start_step(final_epoch - args.horizon))
    seconds = time.perf_counter() - tic

    print(f"run {args.run} ({run.id[:12]}): weight 1 - f during the last {args.horizon} epochs (from epoch "
          f"{final_epoch - args.horizon}); (V(1 - f) - V) / f per instance, f = 1 is the removal; the ratio to "
          "ITD's estimate in brackets")
    for m in args.metrics:
        slope = {pair: (v - before[m]) / step[pair] for pair, v in zip(pairs, after[m])}
        print(f"\n{m} on valid = {before[m]:.6g}")
        print(f"{'instance':>8} | {'ITD':>10} | " + " | ".join(f"{'f = ' + format(f, 'g'):>20}" for f in fractions))
        for j in args.instances:
            e = est[m][j]
            cells = [f"{slope[j, f]:>10.3e} ({slope[j, f] / e if e else float('nan'):>5.2f})" for f in fractions]
            print(f"{j:>8} | {e:>10.3e} | " + " | ".join(f"{c:>20}" for c in cells))
    print(f"{len(pairs)} retrains in {seconds:.0f} s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()

"""Counterfactual retrains per second: one replay per retrain vs forked late starts vs vmap.

The paper's 2D setting (examples/gaussian2d.toml: 10,000 instances, batch 100, ReLU MLP,
SGD), the last epoch recorded; N one-instance removals (seeded), each retrained over that
epoch and evaluated (ALL on the validation split). All sides run in this process at the
same thread count (``--threads``, also the run's ``[train] threads``) and are checked equal:
the forked path bitwise, the vmapped one to rounding.

    python bench/retrain_speed.py [--n 200] [--epochs 5] [--chunk 64] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import gancleanse as gc
from gancleanse.cli import embedded_config
from gancleanse.metrics import make_metric
from gancleanse.training.replay import replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="retrains (one instance removed each)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (the last one is retrained)")
    p.add_argument("--chunk", type=int, default=64, help="retrains per call in the chunked line")
    p.add_argument("--out", default="/tmp/retrain_bench")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every path runs there)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every side")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    raw = embedded_config("gaussian2d").to_dict()
    raw["train"].update(epochs=args.epochs, record_from_epoch=args.epochs - 1, device=args.device,
                        threads=args.threads)
    cfg = gc.Config.from_dict({k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in raw.items()})
    run = gc.train(cfg, Path(args.out) / "run", force=True, progress=False)
    chosen = np.random.default_rng(0).choice(run.n_train, size=args.n, replace=False).tolist()
    print(f"{run.n_train} instances, {run.steps_per_epoch} steps per epoch, checkpoint every "
          f"{cfg.train.checkpoint_every} steps; {args.n} one-epoch retrains, {args.threads} thread(s)")

    metric = make_metric("all", run, "valid")
    before = metric.value(run.final_state())

    def sequential() -> list[float]:  # what every retrain cost before: a replay of the whole window
        out = []
        for j in chosen:
            w = torch.ones(run.n_train, dtype=run.dtype)
            w[j] = 0.0
            out.append(metric.value(replay(run, run.window_start, weights=w)) - before)
        return out

    def forked(batched: bool, chunk: int) -> list[float]:
        out = []
        for i in range(0, len(chosen), chunk):
            res = gc.counterfactuals(run, [[j] for j in chosen[i:i + chunk]], "all", batched=batched)
            out += [r["delta"] for r in res]
        return out

    sides = {"sequential, whole window each": sequential,
             "forked late starts (bitwise)": lambda: forked(False, args.n),
             f"forked + vmap, {args.chunk} per call": lambda: forked(True, args.chunk),
             f"forked + vmap, all {args.n} in one call": lambda: forked(True, args.n)}
    results, seconds = {}, {}
    for name, fn in sides.items():
        tic = time.perf_counter()
        results[name] = fn()
        seconds[name] = time.perf_counter() - tic
    final = run.final_state()
    tic = time.perf_counter()
    for _ in chosen:
        metric.value(final)
    metric_seconds = time.perf_counter() - tic
    base_name = next(iter(sides))
    base = np.asarray(results[base_name])
    print(f"{'path':<38}{'seconds':>9}{'retrains/s':>12}{'speedup':>9}  agreement with sequential")
    for name in sides:
        got = np.asarray(results[name])
        diff = np.abs(got - base).max() / np.abs(base).max()
        agree = "bitwise" if np.array_equal(got, base) else f"max rel. diff {diff:.1e}"
        print(f"{name:<38}{seconds[name]:>9.2f}{args.n / seconds[name]:>12.1f}"
              f"{seconds[base_name] / seconds[name]:>8.1f}x  {agree}")
    print(f"every path includes {args.n} evaluations of ALL (1000 x 1000 kernel): {metric_seconds:.2f} s; "
          f"retraining alone, sequential / forked + vmap: "
          f"{(seconds[base_name] - metric_seconds) / (min(seconds.values()) - metric_seconds):.1f}x")


if __name__ == "__main__":
    main()

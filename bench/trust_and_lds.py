"""Trust check and LDS of every scorer on the shipped examples, beside a larger validation.

Per replicate seed of an example config (examples/gaussian2d.toml or examples/digits.toml,
the recorded last epoch): score with every scorer, run the trust check (K retrains, shared
between scorers), validate ITD and AID on a larger set of the same design (N instances,
half from the extremes; another seed) to see whether the check's 90% interval covers that
tau, and compute the LDS (S subsets of a fraction F) of every scorer. Prints per-seed rows
and a table per scorer; costs in seconds and in training epochs of the run.

    .venv/bin/python bench/trust_and_lds.py --setup 2d [--seeds 0 1 2] [--check 32] [--full 200]
    .venv/bin/python bench/trust_and_lds.py --setup digits --seeds 0 1 --full 96
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

import gancleanse as gc
from gancleanse.cli import embedded_config
from gancleanse.specs import HIGHER_IS_BETTER
from gancleanse.influence import variant_arguments, variants
from gancleanse.study.cleanse import replicate_config
from gancleanse.study.lds import lds
from gancleanse.study.trust import check_instances, seconds_per_epoch, trust_checks
from gancleanse.study.validate import removal_changes

SETUPS = {"2d": ("gaussian2d", "all"), "digits": ("digits", "fid")}
METHODS = ("itd", "aid", "isolation_forest", "knn_density", "discriminator", "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=list(SETUPS), default="2d")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--check", type=int, default=32)
    ap.add_argument("--full", type=int, default=200, help="instances of the larger validation (ITD, AID)")
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--workdir", default="/tmp/gancleanse-trust-bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    example, metric = SETUPS[args.setup]
    base = embedded_config(example)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        cfg = replicate_config(base, seed)
        run_dir = Path(args.workdir) / f"{args.setup}-seed{seed}"
        run = gc.Run.open(run_dir) if (run_dir / "run.json").is_file() else gc.train(cfg, run_dir, progress=False)
        epoch = seconds_per_epoch(run)
        names, rankings = score_all(run, metric, run.feature_space, cfg, seed)
        tic = time.perf_counter()
        checks = trust_checks(run, rankings, [metric] * len(rankings), args.check, seed=seed)
        check_s = time.perf_counter() - tic
        tic = time.perf_counter()
        lds_res = lds(run, rankings, metric, subsets=args.subsets, fraction=args.fraction, seed=seed, names=names)
        lds_s = time.perf_counter() - tic
        full = {}
        tic = time.perf_counter()
        for name, s in zip(names, rankings):
            if s.method in ("itd", "aid"):
                idx = check_instances(s.harmfulness, args.full, seed + 1000)
                actual = removal_changes(run, [[j] for j in idx], [metric])[metric]
                full[name] = float(kendalltau([s.harmfulness[j] for j in idx], [sign * a for a in actual]).statistic)
        full_s = time.perf_counter() - tic
        print(f"\nseed {seed}: check {check_s:.0f} s ({check_s / epoch:.1f} epochs), LDS {lds_s:.0f} s "
              f"({lds_s / epoch:.1f} epochs), validation of {args.full} {full_s:.0f} s")
        for s, c, (name, l) in zip(rankings, checks, lds_res["scorers"].items()):
            lo, hi = c["kendall_tau_interval"] or (float("nan"), float("nan"))
            f = full.get(name)
            covered = None if f is None else bool(lo <= f <= hi)
            row = {"tau": c["kendall_tau"], "lo": lo, "hi": hi, "trusted": c["trusted"], "full_tau": f,
                   "covered": covered, "lds": l["lds"], "lds_interval": l["interval"]}
            rows.setdefault(name, []).append(row)
            print(f"  {name:<24} check tau {c['kendall_tau']:+.2f} [{lo:+.2f}, {hi:+.2f}] "
                  f"{'trusted' if c['trusted'] else 'FLAGGED':<8}"
                  + ("" if f is None else f" full tau {f:+.2f} ({'inside' if covered else 'OUTSIDE'})")
                  + f"  LDS {l['lds']:+.2f}")
    print(f"\n{args.setup} ({metric}), seeds {args.seeds}: check K = {args.check}, validation N = {args.full}, "
          f"LDS {args.subsets} subsets x {args.fraction:g}")
    print(f"{'scorer':<24}{'check tau':>10}{'trusted':>9}{'full tau':>10}{'covered':>9}{'LDS':>14}")
    for name, rs in rows.items():
        taus = [r["tau"] for r in rs if r["tau"] is not None]
        full_taus = [r["full_tau"] for r in rs if r["full_tau"] is not None]
        cov = [r["covered"] for r in rs if r["covered"] is not None]
        ldss = [r["lds"] for r in rs if r["lds"] is not None]
        print(f"{name:<24}{np.mean(taus):>10.2f}{sum(r['trusted'] for r in rs):>6}/{len(rs)}"
              + (f"{np.mean(full_taus):>10.2f}{sum(cov):>6}/{len(cov)}" if full_taus else f"{'-':>10}{'-':>9}")
              + f"{np.mean(ldss):>8.2f} ± {np.std(ldss):.2f}")
    Path(args.workdir, f"{args.setup}-summary.json").write_text(json.dumps(rows, indent=1))


def score_all(run: gc.Run, metric: str, space: str | None, cfg: gc.Config, seed: int) -> tuple[list[str], list[gc.Scores]]:
    """Every scorer (AID with the example's own options), plus AID damped on the recorded window
    in the optimizer's own step sizes (Adam: lr / (sqrt(v_hat) + eps)) where the example sets a damping."""
    names, out = [], []
    for method in METHODS:
        for v in variants(method, [metric], space):
            options = cfg.cleanse.scorer_options(method)
            out.append(gc.influence(run, method=method, seed=seed, check=0, progress=False, **variant_arguments(method, v),
                                    **options))
            names.append(method if v in ("none", metric) else f"{method}-{v}")
            if method == "aid" and "damping" in options:
                names[-1] = f"aid (damping {options['damping']:g})"
                window = {k: val for k, val in options.items() if k != "damping"}
                out.append(gc.influence(run, metric, "aid", seed=seed, check=0, progress=False, **window))
                names.append("aid (window, preconditioned)")
    return names, out


if __name__ == "__main__":
    main()

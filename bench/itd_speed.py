"""ITD speed and memory, as ratios measured in one run.

For each model (the paper's 2D GAN on 10k instances, batch 100; a small conv GAN on digits):
  (a) reverse pass (ITD over the recorded window) / training the same window (replay), median of repeats;
  (b) the reference approach (adjoint by double backprop plus one backward pass per instance per
      step) / ours, per reverse step, on a sample of steps;
  (c) peak resident memory of the reverse pass, in a fresh process, against replay alone, for two
      checkpoint intervals (memory follows the segment length, not the window length);
  (d) for the conv GAN: seconds per training epoch, and the time of each metric's gradient
      with respect to the state (the start of every reverse pass), also in training steps.

Usage: .venv/bin/python bench/itd_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.influence.itd import itd_influence, metric_gradient
from gancleanse.metrics import make_metric
from gancleanse.training.losses import d_real_term
from gancleanse.training.replay import replay

SETUPS = {
    "mlp-2d": {
        "data": {"name": "gaussian2d", "n_train": 10000, "n_valid": 1000, "n_test": 1000},
        "train": {"epochs": 2, "batch_size": 100, "lr_d": 1e-3, "lr_g": 1e-3},
        "metric_name": "all",
    },
    "dcgan-digits": {
        "data": {"name": "digits", "n_train": 1000, "n_valid": 300, "n_test": 297, "image_size": 28},
        "model": {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid",
                  "norm": "layer", "bias": True, "dtype": "float32"},
        "train": {"epochs": 2, "batch_size": 100, "lr_d": 1e-3, "lr_g": 1e-3,
                  "weight_decay_d": 1e-3, "weight_decay_g": 1e-3, "checkpoint_every": 2},
        "metric": {"n_samples": 300},
        "metric_name": "fid",
        "gradient_metrics": ["is", "log_is", "fid", "kid", "loss_d"],
    },
}


def reference_reverse_step(run, step, u, metric_influence):
    """The reference code's reverse step: HVP blocks by double backprop, then one backward per instance."""
    dyn = run.dynamics
    state = run.load_state(step)  # callers pick checkpointed steps
    b = run.batch(step)
    pd = {k: v.detach().requires_grad_() for k, v in state["d"].items()}
    pg = {k: v.detach().requires_grad_() for k, v in state["g"].items()}
    w = torch.ones(b.x.shape[0], dtype=run.dtype)
    # per-instance terms: one backward pass per instance of the batch
    for i in range(b.x.shape[0]):
        li = d_real_term(dyn.loss, dyn.models.discriminate(pd, b.x[i:i + 1])).sum()
        gi = torch.autograd.grad(li, list(pd.values()))
        metric_influence += sum((g * u["d"][k]).sum() for g, k in zip(gi, pd)).item()
    # adjoint: four Hessian-vector blocks by double backprop (simultaneous SGD)
    ld = dyn.loss_d(pd, pg, b.x, b.z_d, w)
    lg = dyn.loss_g(pg, pd, b.z_g)
    gd = torch.autograd.grad(ld, list(pd.values()), create_graph=True)
    gg = torch.autograd.grad(lg, list(pg.values()), create_graph=True)
    dot_d = sum((g * u["d"][k]).sum() for g, k in zip(gd, pd))
    dot_g = sum((g * u["g"][k]).sum() for g, k in zip(gg, pg))
    hd = torch.autograd.grad(dot_d, list(pd.values()) + list(pg.values()), retain_graph=True)
    hg = torch.autograd.grad(dot_g, list(pd.values()) + list(pg.values()))
    return hd, hg


def time_reference(run, metric, n_steps: int) -> float:
    """Seconds per reverse step of the reference approach (measured on checkpointed steps)."""
    u = metric_gradient(metric, run.final_state())
    steps = [s for s in run.checkpoint_steps if run.window_start <= s < run.final_step][:n_steps + 1]
    reference_reverse_step(run, steps[0], u, 0.0)  # warm-up
    times = []
    for s in steps[1:]:
        tic = time.perf_counter()
        reference_reverse_step(run, s, u, 0.0)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def peak_rss_mb(run_dir: Path, metric_name: str, mode: str) -> float:
    code = (
        "import resource, sys, torch; import gancleanse as gc;"
        "from gancleanse.metrics import make_metric; from gancleanse.influence.itd import itd_influence;"
        "from gancleanse.training.replay import replay;"
        f"run = gc.Run.open({str(run_dir)!r}); m = make_metric({metric_name!r}, run);"
        f"(itd_influence(run, m, progress=False) if {mode!r} == 'itd' else replay(run, run.window_start));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def bench(name: str, spec: dict, workdir: Path, repeats: int, ref_steps: int) -> dict:
    spec = dict(spec)
    metric_name = spec.pop("metric_name")
    gradient_metrics = spec.pop("gradient_metrics", [])
    cfg = Config.from_dict(spec)
    run = gc.train(cfg, workdir / name, force=True, progress=False)
    metric = make_metric(metric_name, run)
    window = run.final_step - run.window_start
    replay(run, run.window_start)  # warm-up (the first torch.func call costs about a second)
    itd_influence(run, metric, progress=False)
    t_train = statistics.median(_timed(lambda: replay(run, run.window_start)) for _ in range(repeats))
    t_itd = statistics.median(_timed(lambda: itd_influence(run, metric, progress=False)) for _ in range(repeats))
    t_ref_step = time_reference(run, metric, ref_steps)
    final = run.final_state()
    grad_s = {}
    for name_m in gradient_metrics:
        m = make_metric(name_m, run)
        metric_gradient(m, final)  # warm-up (and the classifier's real-feature cache)
        grad_s[name_m] = statistics.median(_timed(lambda: metric_gradient(m, final)) for _ in range(repeats))
    rss = {}
    for every in (10, 50):
        cfg_mem = Config.from_dict({**spec, "train": {**spec["train"], "checkpoint_every": every}})
        mem_run = gc.train(cfg_mem, workdir / f"{name}-mem{every}", force=True, progress=False)
        rss[every] = {"itd_mb": peak_rss_mb(mem_run.path, metric_name, "itd"),
                      "replay_mb": peak_rss_mb(mem_run.path, metric_name, "replay")}
    return {
        "setup": name, "n_train": run.n_train, "batch": run.cfg.train.batch_size, "window_steps": window,
        "train_window_s": t_train, "itd_s": t_itd, "ratio_itd_over_train": t_itd / t_train,
        "reference_step_s": t_ref_step, "ours_step_s": t_itd / window,
        "ratio_reference_over_ours": t_ref_step / (t_itd / window),
        "peak_rss": rss, "epoch_s": t_train * run.steps_per_epoch / window,
        "metric_gradient_s": grad_s,
    }


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--setups", nargs="*", default=list(SETUPS))
    args = ap.parse_args()
    repeats, ref_steps = (1, 3) if args.quick else (3, 8)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.setups:
            try:
                results.append(bench(name, SETUPS[name], Path(tmp), repeats, ref_steps))
            except gc.GancleanseError as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'setup':<14}{'window':>7}{'train s':>9}{'ITD s':>8}{'ITD/train':>10}"
          f"{'ref/step ms':>12}{'ours/step ms':>13}{'ref/ours':>9}   peak RSS MB (ITD | replay), K=10 / K=50")
    for r in results:
        m = r["peak_rss"]
        print(f"{r['setup']:<14}{r['window_steps']:>7}{r['train_window_s']:>9.2f}{r['itd_s']:>8.2f}"
              f"{r['ratio_itd_over_train']:>10.2f}{1e3 * r['reference_step_s']:>12.1f}"
              f"{1e3 * r['ours_step_s']:>13.1f}{r['ratio_reference_over_ours']:>9.1f}   "
              f"{m[10]['itd_mb']:.0f} | {m[10]['replay_mb']:.0f}  /  {m[50]['itd_mb']:.0f} | {m[50]['replay_mb']:.0f}")
    for r in results:
        if r["metric_gradient_s"]:
            step_s = r["train_window_s"] / r["window_steps"]
            print(f"{r['setup']}: one training epoch {r['epoch_s']:.2f} s; metric gradient "
                  f"(n_samples generated images), seconds and training steps:")
            for name_m, sec in r["metric_gradient_s"].items():
                print(f"  {name_m:<7}{sec:>8.3f} s {sec / step_s:>7.1f} steps")
    print(json.dumps(results, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()

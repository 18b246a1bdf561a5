"""ITD speed and memory, as ratios measured in one run, every side at the same CPU thread count.

For each model (the paper's 2D GAN on 10k instances, batch 100; a small conv GAN on digits;
the same conv GAN fine-tuned through rank-8 adapters, ``dcgan-digits-lora8``, whose state,
adjoint and graphs hold the adapters alone):
  (a) reverse pass (ITD over the recorded window) / training the same window (replay), for each way of
      differentiating a step (``--reverse`` vjp, hvp, auto; the other lines time auto, the default),
      medians of repeats interleaved across the four sides, and which way auto chose;
  (b) the reference approach (adjoint by double backprop plus one backward pass per instance per
      step) / ours, per reverse step, median over consecutive steps of the window: raw, and
      charged with the plain training step the reference needs to recover each step's state
      (it goes backwards in time, so it must replay the training to get there);
  (c) peak resident memory (the process's own high-water mark, VmHWM) of the reverse pass (the
      default way, and the hvp way, which keeps states instead of graphs), in a fresh process,
      against replay alone, over a --memory-window-step window (default 50), for train's default
      checkpoints (every step where the window's states fit 2 GB) and checkpoints every 10 and 50
      steps (memory follows the segment length, not the window length);
  (d) for the conv GAN: seconds per training epoch, and the time of each metric's gradient
      with respect to the state (the start of every reverse pass), also in training steps;
  (e) for the conv GAN, checkpoints every 10 steps: ITD with the default budget (memory_gb=None,
      which holds whole segments here; the stretch is printed) against a budget of about two
      steps' graphs, each in a fresh process: time and peak-memory ratios, and whether the two
      influence vectors are bitwise equal;
  (f) for the conv GAN, one vjp reverse step with LayerNorm's second derivative in closed form (the
      default) against torch's double backward, interleaved medians, beside a training step;
  (g) AID's product with the game Jacobian's transpose, J^T v at the trained point on AID_INSTANCES
      instances: the VJP of the game's gradient (what ``influence/aid.py`` runs) against the same product as
      forward-over-reverse Hessian-vector products of the two losses (H_{L_D} [v_D; 0] + H_{L_G} [0; v_G]),
      interleaved medians, and their relative gap.

With --mnist, also an MNIST-sized timing: 50,000 random 28x28 images given to the Python API,
the DCGAN of examples/digits.toml at batch 100, one recorded epoch: seconds of the training
epoch, of ITD over it, and of validating by retraining without each of K single instances
(gc.counterfactuals; K = 200 by default). Try it small first: --mnist-n 2000 --mnist-validate 4.

With --ratios-only, (a) alone.

Usage: .venv/bin/python bench/itd_speed.py [--quick] [--threads T] [--device cpu|cuda] [--setups NAME ...]
           [--ratios-only] [--memory-window STEPS]
           [--mnist | --mnist-only] [--mnist-n N] [--mnist-validate K] [--mnist-metric fid|loss_d]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.device import check_threads
from gancleanse.data import Splits
from gancleanse.influence import aid
from gancleanse.influence.itd import itd_influence, metric_gradient
from gancleanse.metrics import Metric, make_metric
from gancleanse.models.layer_norm import second_derivatives
from gancleanse.options import REVERSE_PASSES
from gancleanse.training.adjoint import hvp_loss_d, hvp_loss_g, warm_forward_mode
from gancleanse.training.dynamics import State, StepBatch
from gancleanse.training.losses import d_real_term
from gancleanse.training.replay import replay

DIGITS_MODEL = {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid",
                "norm": "layer", "bias": True, "dtype": "float32"}  # examples/digits.toml

# Config sections per setup; the bench's own keys are taken out by ``split_spec``.
SETUPS: dict[str, dict[str, Any]] = {
    "mlp-2d": {
        "data": {"name": "gaussian2d", "n_train": 10000, "n_valid": 1000, "n_test": 1000},
        "train": {"epochs": 2, "batch_size": 100, "lr_d": 1e-3, "lr_g": 1e-3},
        "metric_name": "all",
    },
    "dcgan-digits": {
        "data": {"name": "digits", "n_train": 1000, "n_valid": 300, "n_test": 297, "image_size": 28},
        "model": DIGITS_MODEL,
        "train": {"epochs": 2, "batch_size": 100, "lr_d": 1e-3, "lr_g": 1e-3,
                  "weight_decay_d": 1e-3, "weight_decay_g": 1e-3, "checkpoint_every": 2},
        "metric": {"n_samples": 300},
        "metric_name": "fid",
        "gradient_metrics": ["is", "log_is", "fid", "kid", "loss_d"],
        "budget_line": True,
    },
}
# the same DCGAN fine-tuned through rank-8 adapters (the weights under them frozen): issue of
# scale for ITD's state, adjoint and graphs
SETUPS["dcgan-digits-lora8"] = {**SETUPS["dcgan-digits"], "model": {**DIGITS_MODEL, "lora_rank": 8},
                                "gradient_metrics": [], "budget_line": False}
BENCH_KEYS = ("metric_name", "gradient_metrics", "budget_line")
MEMORY_EVERY = (None, 10, 50)  # checkpoint intervals of (c); None: train's default (every step where states fit)
MEMORY_WINDOW = 50  # steps of (c)'s recorded window (rounded up to whole epochs): memory follows the segment
BUDGET_EVERY = 10  # checkpoint interval of (e): segments long enough for a budget to split them
BUDGET_STEPS = 2.5  # (e)'s budget, in steps' graphs: two fit
AID_INSTANCES = 200  # (g)'s operator size (AID's default is every instance up to 2048: the ratio is per instance)

MNIST_SPEC: dict[str, Any] = {
    "model": DIGITS_MODEL,
    "train": {"epochs": 1, "record_from_epoch": 0, "batch_size": 100, "optimizer": "adam",
              "lr_d": 2e-4, "lr_g": 2e-4, "betas": [0.5, 0.999], "weight_decay_d": 1e-3,
              "weight_decay_g": 1e-3},
}
MNIST_EVAL = 1000  # validation and test images; also the generated samples per metric evaluation


def config_dict(spec: dict[str, Any], threads: int, device: str = "cpu", **train: Any) -> dict[str, Any]:
    """A setup's Config dict at the bench's thread count and device: the one place where the
    compute device is set (every side of a ratio runs on it, at equal threads)."""
    out = {k: dict(v) for k, v in spec.items() if k not in BENCH_KEYS}
    out["train"] = {**out.get("train", {}), "threads": threads, "device": device, **train}
    return out


def split_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config sections, the bench's own options) of a SETUPS entry."""
    return ({k: v for k, v in spec.items() if k not in BENCH_KEYS},
            {k: v for k, v in spec.items() if k in BENCH_KEYS})


# --- peak memory, measured in a fresh process -------------------------------------------------

def peak_memory() -> dict[str, Any]:
    """This process's peak resident memory in MB: VmHWM, its own high-water mark. Where /proc is
    absent, ru_maxrss, which a child may inherit from the process it was forked from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"peak_mb": int(line.split()[1]) / 1024.0, "peak_source": "VmHWM"}
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": rss / (1024.0 ** 2 if sys.platform == "darwin" else 1024.0), "peak_source": "ru_maxrss"}


def device_peak() -> dict[str, Any]:
    """CUDA's allocator peak of this process in MB (where CUDA was used)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {}


def child_main(job: dict[str, Any]) -> None:
    """Run one measured job (ITD or replay of a run directory) and print its numbers as JSON."""
    torch.set_num_threads(job["threads"])
    run = gc.Run.open(job["run"], device=job.get("device"))
    metric = make_metric(job["metric"], run)
    if job.get("warm", True):
        warm_up(run, job["mode"], job.get("reverse", "auto"))
    out: dict[str, Any] = {}
    seconds = []
    for _ in range(job["repeats"]):
        if job["mode"] == "itd":
            res = itd_influence(run, metric, memory_gb=job.get("memory_gb"), progress=False,
                                reverse=job.get("reverse", "auto"))
            seconds.append(res.seconds)
            out.update(stretch=res.stretch, graph_bytes_per_step=res.graph_bytes_per_step)
            if job.get("save"):
                torch.save(res.influence, job["save"])
        else:
            seconds.append(_timed(lambda: replay(run, run.window_start)))
    out.update(seconds=statistics.median(seconds), **peak_memory(), **device_peak())
    print(json.dumps(out))


def warm_up(run: gc.Run, mode: str, reverse: str = "auto") -> None:
    """One step as the job takes it, so that a timing does not carry first-call costs (torch.func's
    is about a second): for ITD, a VJP (one step's graph stays below any reverse pass's peak; the hvp
    way's check of its first step holds one too) and, the hvp way, a Hessian-vector-product step; a
    step without graph for replay (a graph would raise replay's peak)."""
    from torch.func import vjp

    from gancleanse.training.adjoint import step_adjoint

    dyn = run.dynamics
    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
    state, batch = run.load_state(run.window_start), run.batch(run.window_start)
    if mode == "itd":
        vjp(lambda s, w: dyn.step(s, batch, w), state, ones, has_aux=True)
        if reverse == "hvp":
            with torch.no_grad():
                new, _, gradients = dyn.step_with_gradients(state, batch, ones)
            step_adjoint(dyn, state, batch, ones, gradients, new["d"], new)  # any adjoint shaped like a state
    else:
        with torch.no_grad():
            dyn.step(state, batch, ones)


def in_child(**job: Any) -> dict[str, Any]:
    """``child_main`` in a fresh interpreter, so that its peak memory is the job's alone."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring process failed ({job['mode']} of {job['run']}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the reference approach ---------------------------------------------------------------------

def reference_reverse_step(run: gc.Run, state: State, b: StepBatch, u: State, metric_influence: float
                           ) -> tuple:
    """The reference code's reverse step: HVP blocks by double backprop, then one backward per instance."""
    dyn = run.dynamics
    pd = {k: v.detach().requires_grad_() for k, v in state["d"].items()}
    pg = {k: v.detach().requires_grad_() for k, v in state["g"].items()}
    w = torch.ones(b.x.shape[0], dtype=run.dtype, device=b.x.device)
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


def time_reference(run: gc.Run, metric: Metric, n_steps: int) -> dict[str, float]:
    """Median seconds per reverse step of the reference, raw and charged with the plain training
    step (no graph) that recovers its state, over consecutive steps from the window start (the
    first one is a warm-up). States come from that replay, not from checkpoint files."""
    dyn = run.dynamics
    u = metric_gradient(metric, run.final_state())
    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
    end = min(run.final_step, run.window_start + n_steps + 1)
    state = run.load_state(run.window_start)
    raw, plain, charged = [], [], []
    for i, step in enumerate(range(run.window_start, end)):
        b = run.batch(step)
        tic = time.perf_counter()
        with torch.no_grad():
            nxt = dyn.step(state, b, ones)[0]
        t_step = time.perf_counter() - tic
        t_ref = _timed(lambda: reference_reverse_step(run, state, b, u, 0.0))
        if i > 0:
            raw.append(t_ref)
            plain.append(t_step)
            charged.append(t_ref + t_step)
        state = nxt
    return {"raw_s": statistics.median(raw), "replay_step_s": statistics.median(plain),
            "charged_s": statistics.median(charged), "steps": len(raw)}


# --- one setup ----------------------------------------------------------------------------------

def time_ways(run: gc.Run, metric: Metric, repeats: int) -> tuple[float, dict[str, float], list[str]]:
    """Median seconds of training the window (replay) and of ITD over it each way (vjp, hvp, auto), the
    repeats interleaved so that a slower stretch of the machine falls on every side; and auto's choices."""
    replay(run, run.window_start)  # warm-up (the first torch.func call costs about a second)
    for way in REVERSE_PASSES:
        itd_influence(run, metric, progress=False, reverse=way)
    seconds: dict[str, list[float]] = {"train": [], **{way: [] for way in REVERSE_PASSES}}
    chose: list[str] = []
    for _ in range(repeats):
        seconds["train"].append(_timed(lambda: replay(run, run.window_start)))
        for way in REVERSE_PASSES:
            res = itd_influence(run, metric, progress=False, reverse=way)
            seconds[way].append(res.seconds)
            if way == "auto":
                chose.append(res.reverse["reverse"])
    t_train = statistics.median(seconds.pop("train"))
    return t_train, {way: statistics.median(v) for way, v in seconds.items()}, chose


def layer_norm_ab(run: gc.Run, repeats: int) -> dict[str, float]:
    """Median ms of one vjp reverse step (its forward with graph and its VJP) with the built-in LayerNorms' second
    derivative in closed form (``layer_norm_twice``, the default) and by torch's double backward (``F.layer_norm``),
    interleaved, and of a training step."""
    import torch.nn.functional as F

    import gancleanse.models.layer_norm as norms
    from gancleanse.influence.reverse import VJPPass

    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
    way, step, state = VJPPass(run.dynamics, run.batch, ones), run.window_start, run.load_state(run.window_start)

    def reverse_step() -> None:
        new, token = way.forward(state, step)
        way.backward(token, new)

    def train_step() -> None:
        with torch.no_grad():
            run.dynamics.step(state, run.batch(step), ones)

    closed_form = norms.layer_norm_twice
    sides = {"closed_form": closed_form, "torch": F.layer_norm}
    seconds: dict[str, list[float]] = {"train": [], **{side: [] for side in sides}}
    try:
        for i in range(repeats + 1):  # the first round warms up
            seconds["train"].append(_timed(train_step))
            for side, fn in sides.items():
                norms.layer_norm_twice = fn
                seconds[side].append(_timed(reverse_step))
    finally:
        norms.layer_norm_twice = closed_form
    return {side: 1e3 * statistics.median(v[1:]) for side, v in seconds.items()}


def hvp_rmatvec(op: aid.GameOperator, v: aid.Tree) -> aid.Tree:
    """J^T v on ``op``'s instances by the forward-over-reverse products ITD's ``hvp`` way takes
    (``training/adjoint.py``): the symmetric Hessian of each player's loss along its own block of v, in both
    players' blocks (AID's ``rmatvec`` at damping 0 and no scaling)."""
    dyn, (pd, pg), total = op.dyn, (op.params["d"], op.params["g"]), op.x.shape[0]
    out: aid.Tree = {p: {k: torch.zeros_like(t) for k, t in op.params[p].items()} for p in ("d", "g")}
    for lo in range(0, total, aid.CHUNK):
        rows = slice(lo, lo + aid.CHUNK)
        x, z = op.x[rows], op.z[rows]
        y, c = (None if t is None else t[rows] for t in (op.y, op.c))
        # count None: AID's stationary game, lazy penalties at their average strength (as in ``game_gradient``)
        chunk = StepBatch(x, z, z, None, y, c, c)  # type: ignore[arg-type]
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        d_on_d, d_on_g, _ = hvp_loss_d(dyn, pd, pg, chunk, ones, v["d"])
        g_on_g, g_on_d = hvp_loss_g(dyn, pg, pd, z, c, v["g"])
        share = x.shape[0] / total
        for p, parts in (("d", (d_on_d, g_on_d)), ("g", (d_on_g, g_on_g))):
            for k in out[p]:
                out[p][k] += share * (parts[0][k] + parts[1][k])
    return out


def aid_rmatvec_ab(run: gc.Run, repeats: int) -> dict[str, float]:
    """Median ms of J^T v on AID_INSTANCES instances at the trained point, the VJP way (AID's own) and by
    Hessian-vector products, interleaved, and the relative gap between the two products (one random v, from the
    warm-up round)."""
    state = run.final_state()
    params = {p: {k: t.detach() for k, t in state[p].items()} for p in ("d", "g")}
    op = aid.operator_draws(run, params, 0.0, None, 0)(0, min(AID_INSTANCES, run.n_train))
    y = torch.randn(aid.flatten(params).numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = aid.unflatten(y.to(run.dtype), params)
    warm_forward_mode()
    with second_derivatives():
        by_vjp, by_hvp = op.rmatvec(y), aid.flatten(hvp_rmatvec(op, v)).to(torch.float64)  # the warm-up round
        sides = {"vjp": lambda: op.rmatvec(y), "hvp": lambda: hvp_rmatvec(op, v)}
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(repeats):
            for side, fn in sides.items():
                seconds[side].append(_timed(fn))
    return {**{side: 1e3 * statistics.median(times) for side, times in seconds.items()},
            "gap": float((by_vjp - by_hvp).norm() / by_vjp.norm()), "instances": op.x.shape[0]}


def bench(name: str, spec: dict[str, Any], workdir: Path, threads: int, repeats: int, ref_steps: int,
          device: str = "cpu", ratios_only: bool = False, memory_window: int = MEMORY_WINDOW) -> dict[str, Any]:
    sections, opts = split_spec(spec)
    metric_name = opts["metric_name"]
    cfg = Config.from_dict(config_dict(sections, threads, device))
    run = gc.train(cfg, workdir / name, force=True, progress=False)
    if run.threads != threads:
        raise RuntimeError(f"{name}: the run recorded {run.threads} threads, not {threads}")
    metric = make_metric(metric_name, run)
    window = run.final_step - run.window_start
    t_train, t_ways, chose = time_ways(run, metric, repeats)
    t_itd = t_ways["auto"]  # the default
    ways = {"train_window_s": t_train, "itd_s_by_way": t_ways, "auto_chose": chose,
            "ratio_itd_over_train_by_way": {way: t / t_train for way, t in t_ways.items()}}
    if ratios_only:
        return {"setup": name, "n_train": run.n_train, "batch": run.cfg.train.batch_size, "window_steps": window,
                "metric": metric_name, "threads": threads, "itd_s": t_itd, "ratio_itd_over_train": t_itd / t_train,
                **ways}
    ref = time_reference(run, metric, ref_steps)
    final = run.final_state()
    norm_ms = layer_norm_ab(run, 2 * repeats + 1) if opts.get("budget_line") else None  # the LayerNorm DCGAN
    aid_ms = aid_rmatvec_ab(run, 2 * repeats + 1)
    grad_s = {}
    for name_m in opts.get("gradient_metrics", []):
        m = make_metric(name_m, run)
        metric_gradient(m, final)  # warm-up (and the classifier's real-feature cache)
        grad_s[name_m] = statistics.median(_timed(lambda: metric_gradient(m, final)) for _ in range(repeats))

    peak: dict[str, dict[str, Any]] = {}
    mem_runs: dict[int | None, gc.Run] = {}
    window_epochs = -(-memory_window // run.steps_per_epoch)
    epochs = {"epochs": window_epochs + 1, "record_from_epoch": 1}
    for every in MEMORY_EVERY:
        mem_sections = {**sections, "train": {k: v for k, v in sections["train"].items() if k != "checkpoint_every"}}
        mem_run = gc.train(Config.from_dict(config_dict(mem_sections, threads, device, **epochs, checkpoint_every=every)),
                           workdir / f"{name}-mem{every}", force=True, progress=False)
        make_metric(metric_name, mem_run)  # a classifier metric trains and caches its classifier here
        mem_runs[every] = mem_run
        job = {"run": str(mem_run.path), "metric": metric_name, "threads": threads, "repeats": repeats,
               "device": device}
        save = str(workdir / f"{name}-mem{every}-influence.pt") if every == BUDGET_EVERY else None
        label = f"{mem_run.cfg.train.checkpoint_every}{' (default)' if every is None else ''}"
        peak[label] = {"itd": in_child(mode="itd", save=save, **job), "replay": in_child(mode="replay", **job),
                       "itd_hvp": in_child(mode="itd", reverse="hvp", **job),
                       "window_steps": mem_run.final_step - mem_run.window_start}

    budget = None
    if opts.get("budget_line"):
        whole = peak[str(BUDGET_EVERY)]["itd"]
        memory_gb = BUDGET_STEPS * whole["graph_bytes_per_step"] / 1e9
        save = workdir / f"{name}-budget-influence.pt"
        limited = in_child(mode="itd", run=str(mem_runs[BUDGET_EVERY].path), metric=metric_name,
                           threads=threads, repeats=repeats, memory_gb=memory_gb, save=str(save), device=device)
        a = torch.load(workdir / f"{name}-mem{BUDGET_EVERY}-influence.pt")
        b = torch.load(save)
        budget = {"every": BUDGET_EVERY, "memory_gb": memory_gb, "whole": whole, "limited": limited,
                  "bitwise": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}

    return {
        "setup": name, "n_train": run.n_train, "batch": run.cfg.train.batch_size, "window_steps": window,
        "metric": metric_name, "threads": threads, **ways, "itd_s": t_itd, "ratio_itd_over_train": t_itd / t_train,
        "reference": ref, "ours_step_s": t_itd / window,
        "ratio_reference_over_ours": ref["raw_s"] / (t_itd / window),
        "ratio_charged_reference_over_ours": ref["charged_s"] / (t_itd / window),
        "peak": peak, "budget": budget, "epoch_s": t_train * run.steps_per_epoch / window,
        "metric_gradient_s": grad_s, "layer_norm_ms": norm_ms, "aid_rmatvec_ms": aid_ms,
    }


def print_setup(r: dict[str, Any]) -> None:
    """One table for one setup."""
    chose = ", ".join(f"{way} {r['auto_chose'].count(way)}x" for way in sorted(set(r["auto_chose"])))
    rows: list[tuple[str, str]] = [("training the window (replay), s", f"{r['train_window_s']:.2f}")]
    for way, seconds in r["itd_s_by_way"].items():
        rows.append((f"ITD over the window, reverse {way}: s | / training",
                     f"{seconds:.2f} | {r['ratio_itd_over_train_by_way'][way]:.2f}"))
    rows.append(("  auto chose", chose))
    if "reference" not in r:  # --ratios-only
        print(f"\n{r['setup']}: n_train {r['n_train']}, batch {r['batch']}, window {r['window_steps']} steps, "
              f"metric {r['metric']}, {r['threads']} thread(s), medians of interleaved repeats")
        _table(rows)
        return
    ref = r["reference"]
    rows += [
        ("ours per reverse step (auto), ms", f"{1e3 * r['ours_step_s']:.1f}"),
        (f"reference per reverse step, ms (median of {ref['steps']})", f"{1e3 * ref['raw_s']:.1f}"),
        ("  + plain training step to recover its state, ms", f"{1e3 * ref['replay_step_s']:.1f}"),
        ("  = reference charged with its replay, ms", f"{1e3 * ref['charged_s']:.1f}"),
        ("reference / ours, raw", f"{r['ratio_reference_over_ours']:.1f}"),
        ("reference / ours, charged with replay", f"{r['ratio_charged_reference_over_ours']:.1f}"),
    ]
    for every, p in r["peak"].items():
        rows.append((f"peak MB, {p['window_steps']}-step window, checkpoint every {every}: ITD (auto) | ITD hvp | "
                     "replay (stretch: auto | hvp)",
                     f"{p['itd']['peak_mb']:.0f} | {p['itd_hvp']['peak_mb']:.0f} | {p['replay']['peak_mb']:.0f} "
                     f"({p['itd']['stretch']} | {p['itd_hvp']['stretch']} steps)"))
        rows.append(("  ITD (auto) / replay: peak memory | seconds (fresh processes)",
                     f"{p['itd']['peak_mb'] / p['replay']['peak_mb']:.2f} | "
                     f"{p['itd']['seconds'] / p['replay']['seconds']:.2f}"))
        if "cuda_peak_mb" in p["itd"]:
            rows.append((f"  CUDA allocator peak MB, checkpoint every {every}: ITD | replay",
                         f"{p['itd']['cuda_peak_mb']:.0f} | {p['replay'].get('cuda_peak_mb', 0):.0f}"))
    b = r["budget"]
    if b is not None:
        w, lim = b["whole"], b["limited"]
        rows += [
            (f"ITD, checkpoint every {b['every']}, memory_gb=None: s | peak MB (stretch)",
             f"{w['seconds']:.2f} | {w['peak_mb']:.0f} ({w['stretch']} steps)"),
            (f"ITD, memory_gb={b['memory_gb']:.3f} ({BUDGET_STEPS} steps' graphs): s | peak MB (stretch)",
             f"{lim['seconds']:.2f} | {lim['peak_mb']:.0f} ({lim['stretch']} steps)"),
            ("  budget / whole: time | peak memory",
             f"{lim['seconds'] / w['seconds']:.2f} | {lim['peak_mb'] / w['peak_mb']:.2f}"),
            ("  influence, budget vs whole",
             "bitwise" if b["bitwise"] else f"max |difference| {b['max_abs_diff']:.3g}"),
        ]
    if r["layer_norm_ms"]:
        ms = r["layer_norm_ms"]
        rows += [("vjp reverse step, LayerNorm's second derivative closed form | torch's, ms",
                  f"{ms['closed_form']:.0f} | {ms['torch']:.0f}"),
                 ("  torch's / closed form | closed form / training step",
                  f"{ms['torch'] / ms['closed_form']:.2f} | {ms['closed_form'] / ms['train']:.2f}")]
    a = r["aid_rmatvec_ms"]
    rows += [(f"AID's J^T v on {a['instances']} instances, vjp of the game's gradient | Hessian-vector products, ms",
              f"{a['vjp']:.1f} | {a['hvp']:.1f}"),
             ("  hvp / vjp | relative gap between the two", f"{a['hvp'] / a['vjp']:.2f} | {a['gap']:.1e}")]
    if r["metric_gradient_s"]:
        step_s = r["train_window_s"] / r["window_steps"]
        rows.append(("one training epoch, s", f"{r['epoch_s']:.2f}"))
        for name_m, sec in r["metric_gradient_s"].items():
            rows.append((f"gradient of {name_m}, s | training steps", f"{sec:.3f} | {sec / step_s:.1f}"))
    print(f"\n{r['setup']}: n_train {r['n_train']}, batch {r['batch']}, window {r['window_steps']} steps, "
          f"metric {r['metric']}, {r['threads']} thread(s)")
    _table(rows)


# --- MNIST-sized timing ---------------------------------------------------------------------

def mnist_splits(n_train: int, seed: int = 0) -> Splits:
    """Random 28x28 uint8 images with random labels 0..9: MNIST's size and shape (the timing
    does not depend on the pixels); the labels let the classifier metrics be built."""
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, 10, (n,), generator=g)

    x = [images(n) for n in (n_train, MNIST_EVAL, MNIST_EVAL)]
    y = [labels(n) for n in (n_train, MNIST_EVAL, MNIST_EVAL)]
    return Splits(x[0], x[1], x[2], y[0], y[1], y[2])


def bench_mnist(workdir: Path, threads: int, n_train: int, n_validate: int, metric_name: str,
                device: str = "cpu") -> dict[str, Any]:
    """One recorded epoch of the digits DCGAN on MNIST-sized data: training, ITD, and validation
    by retraining without each of ``n_validate`` single instances (gc.counterfactuals)."""
    from scipy.stats import kendalltau

    spec = dict(MNIST_SPEC)
    if metric_name != "loss_d":
        spec["metric"] = {"n_samples": MNIST_EVAL, "classifier_epochs": 1}
    cfg = Config.from_dict(config_dict(spec, threads, device))
    data = mnist_splits(n_train)
    _note(f"mnist: training one epoch on {n_train} images")
    wall = time.perf_counter()
    run = gc.train(cfg, workdir / "mnist", data=data, force=True, progress=False)
    wall = time.perf_counter() - wall
    epoch_s = float(run.meta["seconds"]["window_steps"])
    _note(f"mnist: building the {metric_name} metric")
    metric_s = time.perf_counter()
    make_metric(metric_name, run)  # trains and caches the classifier in the run, for the measuring processes
    metric_s = time.perf_counter() - metric_s
    job = {"run": str(run.path), "metric": metric_name, "threads": threads, "repeats": 1, "device": device,
           "save": str(workdir / "mnist-influence.pt"), "warm": False}
    _note("mnist: replaying the epoch (a fresh process)")
    replayed = in_child(mode="replay", **job)
    _note("mnist: ITD over the epoch (a fresh process)")
    itd = in_child(mode="itd", **job)
    influence = torch.load(job["save"])
    chosen = torch.randperm(run.n_train, generator=torch.Generator().manual_seed(1))[:n_validate].tolist()
    _note(f"mnist: validating by {len(chosen)} retrains")
    tic = time.perf_counter()
    changes = gc.counterfactuals(run, [[j] for j in chosen], metric_name)
    validate_s = time.perf_counter() - tic
    est = [float(influence[j]) for j in chosen]
    act = [c["delta"] for c in changes]
    tau = float(kendalltau(est, act).statistic) if len(chosen) >= 2 else float("nan")
    return {"n_train": run.n_train, "batch": run.cfg.train.batch_size, "steps": run.final_step - run.window_start,
            "threads": threads, "metric": metric_name, "metric_options": spec.get("metric", {}),
            "metric_setup_s": metric_s, "train_call_s": wall, "epoch_s": epoch_s, "itd_s": itd["seconds"],
            "stretch": itd["stretch"], "checkpoint_every": run.cfg.train.checkpoint_every,
            "graph_gb_per_step": itd["graph_bytes_per_step"] / 1e9, "ratio_itd_over_train": itd["seconds"] / epoch_s,
            "replay_s": replayed["seconds"], "itd_peak_mb": itd["peak_mb"], "replay_peak_mb": replayed["peak_mb"],
            "n_validate": len(chosen), "validate_s": validate_s, "kendall_tau": tau}


def print_mnist(r: dict[str, Any]) -> None:
    opts = ", ".join(f"{k} {v}" for k, v in r["metric_options"].items())
    n = r["n_validate"]
    print(f"\nmnist-sized ({r['n_train']} random 28x28 images, labels 0..9), DCGAN of examples/digits.toml, "
          f"batch {r['batch']}, one recorded epoch ({r['steps']} steps), metric {r['metric']}"
          f"{f' ({opts})' if opts else ''}, {r['threads']} thread(s)")
    _table([
        ("training epoch (step time), s", f"{r['epoch_s']:.2f}"),
        ("  whole gc.train call (with recording), s", f"{r['train_call_s']:.2f}"),
        ("metric setup (classifier, real features), s", f"{r['metric_setup_s']:.2f}"),
        (f"ITD over the epoch, s (stretch {r['stretch']} steps, {r['graph_gb_per_step']:.3f} GB/step)",
         f"{r['itd_s']:.2f}"),
        ("ITD / training the same window", f"{r['ratio_itd_over_train']:.2f}"),
        ("replay of the epoch (a fresh process), s | ITD / replay", f"{r['replay_s']:.2f} | "
         f"{r['itd_s'] / r['replay_s']:.2f}"),
        (f"peak MB (VmHWM), checkpoint every {r['checkpoint_every']}: ITD | replay | ratio",
         f"{r['itd_peak_mb']:.0f} | {r['replay_peak_mb']:.0f} | {r['itd_peak_mb'] / r['replay_peak_mb']:.2f}"),
        (f"validation: {n} single-instance retrains (gc.counterfactuals), s", f"{r['validate_s']:.2f}"),
        ("  per retrain, s", f"{r['validate_s'] / max(1, n):.2f}"),
        ("  validation / ITD", f"{r['validate_s'] / r['itd_s']:.1f}"),
        (f"  Kendall tau, ITD vs retraining ({n} instances)", f"{r['kendall_tau']:.3f}"),
    ])


# --- helpers and entry point --------------------------------------------------------------------

def _timed(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn``, with CUDA's queued work finished on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    tic = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - tic


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and reference steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for every timing: training, replay, ITD, reference, metric gradients")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: every timing runs there")
    ap.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--ratios-only", action="store_true",
                    help="only (a), ITD / training for each reverse way, without the reference and memory lines")
    ap.add_argument("--memory-window", type=int, default=MEMORY_WINDOW,
                    help="steps of the recorded window of (c)'s runs (rounded up to whole epochs)")
    ap.add_argument("--mnist", action="store_true", help="also the MNIST-sized timing")
    ap.add_argument("--mnist-only", action="store_true", help="only the MNIST-sized timing")
    ap.add_argument("--mnist-n", type=int, default=50000, help="training images of the MNIST-sized timing")
    ap.add_argument("--mnist-validate", type=int, default=200, help="single-instance removals retrained")
    ap.add_argument("--mnist-metric", default="fid", choices=("fid", "loss_d"),
                    help="fid: classifier trained 1 epoch, 1000 samples; loss_d: no classifier")
    args = ap.parse_args()
    try:
        check_threads(args.threads, "--threads")
    except gc.GancleanseError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    repeats, ref_steps = (1, 3) if args.quick else (3, 8)
    setups = [] if args.mnist_only else args.setups
    results: list[dict[str, Any]] = []
    mnist: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in setups:
            _note(f"{name}: measuring")
            try:
                results.append(bench(name, SETUPS[name], Path(tmp), args.threads, repeats, ref_steps,
                                     args.device, args.ratios_only, args.memory_window))
            except gc.GancleanseError as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
        if args.mnist or args.mnist_only:
            mnist = bench_mnist(Path(tmp), args.threads, args.mnist_n, args.mnist_validate, args.mnist_metric,
                                args.device)
    sources = {p[side]["peak_source"] for r in results for p in r.get("peak", {}).values()
               for side in ("itd", "replay")}
    where = args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name(args.device)})"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) for every timing, device {where}")
    if sources:
        print("peak memory: " + ("VmHWM (each measuring process's own high-water mark)" if sources == {"VmHWM"}
                                 else "ru_maxrss where /proc is absent (a child may inherit its parent's peak)"))
    for r in results:
        print_setup(r)
    if mnist is not None:
        print_mnist(mnist)
    print(json.dumps({"setups": results, "mnist": mnist}, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()

"""ITD: influence of every training instance by reverse-mode differentiation of the recorded training.

    u_T = dV/d(state_T)
    for t = T-1 .. t0:   (u_t, g_w) = VJP of step_t at (state_t, w = 1) applied to u_{t+1}
                         influence[S_t] -= g_w
    influence_j ~= V(trained without j) - V(trained with j)

Sweeping segments backwards: each segment between two checkpoints is replayed forward
once, keeping what each step's reverse needs, which is then applied in reverse. The ``vjp``
way keeps ``torch.func.vjp`` closures (that segment's graphs); the ``hvp`` way keeps states and
gradients and differentiates each step by Hessian-vector products (``reverse.py``); ``auto`` times
both on the first reverse step. Memory is one stretch, never steps x parameters: where a
segment's stretch would exceed the memory budget, it is first replayed without graphs,
keeping the states that start each stretch that fits (``memory.py``), at the price of that
replay (about a quarter of the reverse pass's time), with the same result bit for bit. Either way
carries the adjoint through both players (the D<->G cross-Jacobian blocks), the optimizer
state and the generator average, and yields the per-instance terms of the batch.

Snapshots of the running influence at epoch boundaries give, in the same sweep, the
estimate for every horizon k (removal during the last k epochs only).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..options import REVERSE_PASSES, ITDOptions
from ..progress import current_job
from ..errors import ConfigError
from ..metrics import Metric, make_metric
from ..run import Run, torch_threads
from ..scores import Scores
from ..training.dynamics import State
from ..memory import GB, budget_bytes, graph_bytes, steps_within
from .reverse import HVPPass, ReversePass, VJPPass, choose
from .surrogate import smoothed_relu


# Device types where ``auto`` times both ways on the first reverse step; elsewhere (CPU) it takes the vjp way, which
# was faster on every setup of bench/itd_speed.py (one thread: the 2D MLP 2.0x against 5.1x, the digits DCGAN 4.0x
# against 6.3x), also where its graphs do not fit a segment and it replays each segment twice (one step more).
TRIAL_DEVICES = frozenset({"cuda"})


@dataclass
class ITDResult:
    """Influence per training instance (predicted V(without j) - V(with j)), float64."""

    influence: torch.Tensor
    metric_value: float
    horizons: dict[int, torch.Tensor] = field(default_factory=dict)  # epochs traced -> influence
    seconds: float = 0.0
    steps: int = 0
    stretch: int = 0  # steps whose graphs (or, the hvp way, states) were held at once
    graph_bytes_per_step: int = 0
    reverse: dict[str, Any] = field(default_factory=dict)  # the way used (and auto's trial, hvp's fallbacks)


def metric_gradient(metric: Metric, state: State) -> State:
    """dV/d(state), a tree shaped like the state (zero where V does not depend on it), in the metric's chunks
    of generated samples (memory does not grow with their count)."""
    return metric.gradient(state)


def itd_influence(run: Run, metric: Metric, *, memory_gb: float | None = None, progress: bool = True,
                  reverse: str = "auto") -> ITDResult:
    """Trace the metric's gradient back through every recorded step of ``run``. ``memory_gb``: the budget for
    what the replay keeps for the reverse sweep at once (default: half of the memory available at the start);
    the result does not depend on it. ``reverse``: how each step is differentiated (``reverse.py``)."""
    if reverse not in REVERSE_PASSES:
        raise ConfigError(f"unknown reverse pass {reverse!r} (available: {', '.join(REVERSE_PASSES)})")
    started = time.perf_counter()
    dyn, device, steps_per_epoch = run.dynamics, run.device, run.steps_per_epoch
    final_epoch = run.final_step // steps_per_epoch
    influence = torch.zeros(run.n_train, dtype=torch.float64, device=device)
    horizons: dict[int, torch.Tensor] = {}
    ckpts = [s for s in run.checkpoint_steps if s >= run.window_start]
    segments = list(zip(ckpts[:-1], ckpts[1:]))
    longest = max(b - a for a, b in segments)
    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=device)
    passes = {"vjp": VJPPass(dyn, run.batch, ones), "hvp": HVPPass(dyn, run.batch, ones)}
    current: ReversePass = passes["hvp" if reverse == "hvp" else "vjp"]  # auto: the vjp way (until its trial)
    trial: dict[str, float] | None = None
    timed = reverse == "auto" and device.type in TRIAL_DEVICES
    probe = segments[-1][0]  # the first step the sweep replays: the probe's replay of it is kept for the sweep

    def plan(way: ReversePass) -> tuple[int, int, tuple | None]:
        """(steps kept at once, bytes per step, the probe's (state after, token)) for ``way``."""
        per_step, first = graph_bytes(lambda: way.forward(run.load_state(probe), probe), device)
        return steps_within(budget_bytes(memory_gb, device), per_step, longest), per_step, first

    with torch_threads(run.threads):
        metric_value, u = metric.value_and_gradient(run.final_state())
        stretch, per_step, probed = plan(current)
        if stretch < segments[-1][1] - probe:  # its stretch comes last in its segment: not held that long
            probed = None
        total = run.final_step - run.window_start
        # reverse steps come in bursts, each stretch's forward replay between them: rates are means since the start
        bar = tqdm(total=total, desc="itd", unit="step", disable=not progress, leave=False, smoothing=0)
        job = current_job()  # inside a study: the worker's step report
        for seg_start, seg_end in reversed(segments):
            replaying = current  # a segment is replayed one way throughout
            starts = stretch_starts(run, seg_start, seg_end, stretch)
            for begin in sorted(starts, reverse=True):
                state, tokens = starts.pop(begin), []
                for step in range(begin, min(begin + stretch, seg_end)):
                    if step == probe and probed is not None:
                        (state, token), probed = probed, None
                    else:
                        state, token = replaying.forward(state, step)
                    tokens.append(token)
                for step in range(begin + len(tokens) - 1, begin - 1, -1):
                    if timed and trial is None:
                        current, (u, g_w), trial = choose(passes["vjp"], passes["hvp"], tokens.pop(), u,
                                                          stretch < longest)
                    else:
                        u, g_w = replaying.backward(tokens.pop(), u)
                    influence.index_add_(0, run.indices(step).to(device), -g_w.to(torch.float64))
                    if step % steps_per_epoch == 0:
                        horizons[final_epoch - step // steps_per_epoch] = influence.clone()
                    bar.update()
                    job.step(run.final_step - step, total, in_bursts=True)
            if current is not replaying:  # auto chose hvp: size the next segments' stretches by its states
                stretch, per_step, _ = plan(current)
        bar.close()
    used = {"reverse": current.name, **({"reverse_trial_seconds": trial} if trial else {}),
            **({"reverse_rule": f"{device.type}: vjp"} if reverse == "auto" and not timed else {}),
            **(passes["hvp"].summary() if reverse != "vjp" else {})}
    return ITDResult(influence.cpu(), metric_value, {k: v.cpu() for k, v in horizons.items()},
                     time.perf_counter() - started, run.final_step - run.window_start, stretch, per_step, used)


def stretch_starts(run: Run, seg_start: int, seg_end: int, stretch: int) -> dict[int, State]:
    """The states that start each stretch of the segment: its checkpoint, and where the segment is longer than
    ``stretch``, the states a replay without graphs reaches every ``stretch`` steps."""
    starts = {seg_start: run.load_state(seg_start)}
    if seg_end - seg_start > stretch:
        state, ones = starts[seg_start], torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
        with torch.no_grad():
            for step in range(seg_start, seg_end - 1):
                state = run.dynamics.step(state, run.batch(step), ones)[0]
                if (step + 1 - seg_start) % stretch == 0:
                    starts[step + 1] = state
    return starts


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True,
          options: ITDOptions | None = None) -> Scores:
    """ITD influence on ``metric`` (validation split), with the estimate for every horizon.

    ``options.relu_smoothing`` = T: differentiate ReLU kinks as if smoothed over a width T (``smoothed_relu``;
    the trajectory is unchanged). On the paper's 2D ReLU GAN, T ~ 0.2 x the typical |pre-activation| raised
    Kendall tau against retraining by 0.07 with 5 or 10 epochs traced, and not with 1. ``options.memory_gb``,
    ``options.reverse``: see ``itd_influence``; the way used is recorded (``reverse``, with auto's trial timings
    and the steps the hvp way had to differentiate by a VJP)."""
    options = options or ITDOptions()
    relu_smoothing, memory_gb = options.relu_smoothing, options.memory_gb
    with smoothed_relu(run.models, relu_smoothing) if relu_smoothing else nullcontext(None) as swapped:
        if swapped == 0:
            raise ConfigError("relu_smoothing: the run's generator and discriminator have no ReLU or LeakyReLU")
        res = itd_influence(run, make_metric(metric, run, "valid"), memory_gb=memory_gb, progress=progress,
                            reverse=options.reverse)
    info = {"metric_value": res.metric_value, "seconds": res.seconds, "steps": res.steps,
            "window_start_epoch": run.window_start // run.steps_per_epoch,
            "steps_per_stretch": res.stretch, "graph_gb_per_step": res.graph_bytes_per_step / GB,
            "reverse_requested": options.reverse, **res.reverse}
    if relu_smoothing:
        info["relu_smoothing"] = relu_smoothing
    return Scores.from_influence(metric, "itd", res.influence.numpy(),
                                 horizons={k: v.numpy() for k, v in res.horizons.items()}, info=info)

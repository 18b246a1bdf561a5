"""Many counterfactual retrains of the recorded window, each started where it first differs.

A retrain that down-weights some instances follows the recorded trajectory exactly until the first
step whose minibatch holds one of them. ``retrain_groups`` therefore replays the unperturbed trajectory
once and forks each retrain off it at its own first-use step, so a retrain costs only the steps after
that point. Retrains run in groups, in the order of their fork steps and as many as fit in memory, and
those of a group advance together:

- ``vmap_steps=False``: one ``Dynamics.step`` per active retrain. Bitwise equal to replaying each
  retrain from the window start (the same operations on the same values, on CPU).
- ``vmap_steps=True``: one ``torch.func.vmap``-ed step over the group's active retrains; equal to the
  sequential path to rounding (batched kernels sum in another order), and much faster on small
  networks, whose steps are dominated by per-call overhead.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.func import vmap
from tqdm.auto import tqdm

from ..errors import TrainingDivergedError
from ..memory import budget_bytes
from ..progress import StepCallback
from ..run import Run, torch_threads
from ..state_files import flatten_state
from .dynamics import State
from .recorder import check_finite


def first_use_steps(run: Run, changed: torch.Tensor, start: int) -> torch.Tensor:
    """For each row of ``changed`` (K, n_train) bool: the first step in [start, end) whose
    minibatch holds a changed instance, or the final step if none does."""
    end = run.final_step
    first = torch.full((changed.shape[0],), end, dtype=torch.long)
    for step in range(end - 1, start - 1, -1):  # backwards: the earliest use wins
        first[changed[:, run.indices(step)].any(dim=1)] = step
    return first


def checkpoint_before(run: Run, step: int, start: int) -> int:
    """The last checkpoint in [start, step] (``start`` is one: a window or epoch start, or 0)."""
    return max(c for c in run.checkpoint_steps if start <= c <= step) if step > start else start


def late_start(run: Run, weights: torch.Tensor, start: int) -> int:
    """The last checkpoint at or before the first step where ``weights`` differ from 1."""
    return checkpoint_before(run, int(first_use_steps(run, (weights != 1).unsqueeze(0), start)[0]), start)


def vmap_pays(run: Run) -> bool:
    """Whether vmapped steps are faster: on small fully connected nets per-call overhead dominates (3.6x at
    K = 64 on the 2D GAN); on CPU convolutions they are slower (1.3x slower on the digits DCGAN at K = 8)."""
    return run.cfg.model.arch == "mlp"


def retrain_bytes(run: Run, state: State, vmap_steps: bool) -> int:
    """Memory of one retrain of ``run`` (from ``state``) in flight, an estimate that errs high. A forked
    retrain holds its state; a vmapped one also its share of the batched step's activations: a built-in
    MLP's layer outputs, ReLU masks and their gradients (4 tensors per layer) for D on the reals and
    twice on the fakes and for G, which dominate on small nets."""
    held = sum(v.numel() * v.element_size() for v in flatten_state(state).values())
    if not vmap_steps:
        return held
    width = lambda params: sum(p.shape[0] for p in params.values() if p.ndim == 2)  # noqa: E731
    activations = 4 * run.cfg.train.batch_size * (3 * width(state["d"]) + width(state["g"]))
    return 4 * held + activations * torch.finfo(run.dtype).bits // 8


def group_size(run: Run, state: State, vmap_steps: bool, budget: int | None = None) -> int:
    """How many retrains run together: as many as fit in ``budget`` bytes (default: half
    the memory available now), at most ``MAX_GROUP``."""
    budget = budget_bytes(None, run.device) if budget is None else budget
    return MAX_GROUP if budget is None else max(1, min(MAX_GROUP, budget // retrain_bytes(run, state, vmap_steps)))


MAX_GROUP = 1024  # a bound on one vmapped step's size, whatever the memory


def retrain_groups(run: Run, weights: torch.Tensor, start: int, *, vmap_steps: bool | None = None,
                   group: int | None = None, progress: bool = False, on_step: StepCallback | None = None
                   ) -> Iterator[tuple[list[int], list[State]]]:
    """Final states of K retrains from ``start`` with instance weights ``weights`` (K, n_train),
    yielded a group at a time as (row indices, states).

    Retrains are grouped in the order of their fork steps (``group`` per group; None: as many as
    memory allows). The unperturbed trajectory is replayed once for all groups: each group forks off
    it and runs to the window's end, the next resumes it where the previous one's last fork left it,
    so every group runs at nearly its full size and no recorded step is replayed twice.
    ``vmap_steps``: advance each group by one vmapped step (None: where that pays). ``on_step(done, total)``: the
    retrain-steps done of all the forking retrains, at the start and after each step."""
    vmap_steps = vmap_pays(run) if vmap_steps is None else vmap_steps
    end = run.final_step
    fork_step = first_use_steps(run, weights != 1, start).tolist()
    untouched = [k for k, fork in enumerate(fork_step) if fork == end]
    if untouched:  # no changed instance was used: the recorded final state
        yield untouched, [run.final_state()] * len(untouched)
    forking = sorted((k for k, fork in enumerate(fork_step) if fork < end), key=fork_step.__getitem__)
    if not forking:
        return
    weights = weights.to(run.device)
    with torch_threads(run.threads), torch.no_grad():
        at = checkpoint_before(run, fork_step[forking[0]], start)  # the trajectory's position
        state = run.load_state(at)
        size = group or group_size(run, state, vmap_steps)
        total = sum(end - fork_step[k] for k in forking)
        bar = tqdm(total=total, desc="retrain", unit="retrain-step", disable=not progress, leave=False)
        done = 0

        def advance(steps: int) -> None:
            nonlocal done
            done += steps
            bar.update(steps)
            if on_step is not None:
                on_step(done, total)

        advance(0)
        for group_start in range(0, len(forking), size):
            members = forking[group_start:group_start + size]
            active, states, state = _run_group(run, weights, {k: fork_step[k] for k in members}, at, state,
                                               vmap_steps, advance)
            at = fork_step[members[-1]]  # where the next group resumes the trajectory
            yield active, states
        bar.close()


def _run_group(run: Run, weights: torch.Tensor, fork_step: dict[int, int], at: int, state: State,
               vmap_steps: bool, advance: Callable[[int], None]) -> tuple[list[int], list[State], State]:
    """Run one group's retrains (row -> fork step, in fork order) to the window's end, each forked off
    the trajectory ``state`` (at step ``at``) at its step. Returns the rows in fork order, their final
    states, and the trajectory's state at the group's last fork (where the next group resumes it)."""
    dyn = run.dynamics
    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
    stepper = vmap(lambda states, row_weights, batch: dyn.step(states, batch, row_weights)[0], in_dims=(0, 0, None))
    last_fork = max(fork_step.values())
    forks_at: dict[int, list[int]] = {}
    for k, fork in fork_step.items():
        forks_at.setdefault(fork, []).append(k)
    active: list[int] = []
    forked: dict[int, State] = {}
    batched: State | None = None
    for step in range(at, run.final_step):
        forks = forks_at.get(step, [])
        if forks:
            active += forks
            if vmap_steps:
                fresh = _tile(state, len(forks))
                batched = fresh if batched is None else _cat(batched, fresh)
            else:
                forked.update({k: state for k in forks})
        batch = run.batch(step)
        if active:
            idx = run.indices(step)
            if vmap_steps:
                batched = stepper(batched, weights[:, idx][active], batch)
            else:
                for k in active:
                    forked[k], stats = dyn.step(forked[k], batch, weights[k, idx])
                    check_finite(forked[k], stats, step, run.steps_per_epoch)
            advance(len(active))
        if step < last_fork:  # the trajectory is needed up to the group's last fork
            state, stats = dyn.step(state, batch, ones)
            check_finite(state, stats, step, run.steps_per_epoch)
    if not vmap_steps:
        return active, [forked[k] for k in active], state
    states = [_index(batched, position) for position in range(len(active))]
    for k, final in zip(active, states):
        _check_finite_state(final, k)
    return active, states, state


def retrain_many(run: Run, weights: torch.Tensor, start: int, *, vmap_steps: bool | None = None,
                 group: int | None = None, progress: bool = False, on_step: StepCallback | None = None
                 ) -> list[State]:
    """``retrain_groups``' final states, in the rows' order."""
    results: list[State | None] = [None] * weights.shape[0]
    for rows, states in retrain_groups(run, weights, start, vmap_steps=vmap_steps, group=group, progress=progress,
                                       on_step=on_step):
        for k, final in zip(rows, states):
            results[k] = final
    return results  # type: ignore[return-value]


def _tile(state: State, n: int) -> State:
    return _tree_map(lambda t: t.unsqueeze(0).expand(n, *t.shape).clone(), state)


def _cat(a: State, b: State) -> State:
    return {k: _cat(a[k], b[k]) if isinstance(a[k], dict) else torch.cat([a[k], b[k]]) for k in a}


def _index(state: State, i: int) -> State:
    return _tree_map(lambda t: t[i].clone(), state)


def _tree_map(fn, tree):  # noqa: ANN001, ANN202
    return {k: _tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _check_finite_state(state: State, k: int) -> None:
    for player in ("d", "g"):
        for name, v in state[player].items():
            if not torch.isfinite(v).all():
                raise TrainingDivergedError(f"retrain {k} diverged: non-finite values in {player}/{name}; "
                                            "lower the learning rates or use a bounded loss")

"""Many counterfactual retrains of the recorded window, each started where it first differs.

A retrain that down-weights some instances follows the recorded trajectory exactly until
the first step whose minibatch holds one of them. ``retrain_many`` therefore replays the
unperturbed trajectory once and forks each retrain off it at its own first-use step, so a
retrain costs only the steps after that point, and the forked retrains advance together:

- ``vmap=False``: one ``Dynamics.step`` per active retrain. Bitwise equal to replaying each
  retrain from the window start (the same operations on the same values, on CPU).
- ``vmap=True``: one ``torch.func.vmap``-ed step over all active retrains; equal to the
  sequential path to rounding (batched kernels sum in another order), and much faster on
  small networks, whose steps are dominated by per-call overhead.
"""

from __future__ import annotations

import torch
from torch.func import vmap
from tqdm.auto import tqdm

from ..errors import TrainingDivergedError
from ..run import Run, torch_threads
from .dynamics import State
from .recorder import check_finite


def first_use_steps(run: Run, changed: torch.Tensor, start: int) -> torch.Tensor:
    """For each row of ``changed`` (K, n_train) bool: the first step in [start, end) whose
    minibatch holds a changed instance, or the final step if none does."""
    end = run.final_step
    first = torch.full((changed.shape[0],), end, dtype=torch.long)
    for step in range(end - 1, start - 1, -1):  # backwards: the earliest use wins
        hit = changed[:, run.indices(step)].any(dim=1)
        first[hit] = step
    return first


def checkpoint_before(run: Run, step: int, start: int) -> int:
    """The last checkpoint in [start, step] (``start`` is one: a window or epoch start, or 0)."""
    return max(c for c in run.checkpoint_steps if start <= c <= step) if step > start else start


def late_start(run: Run, weights: torch.Tensor, start: int) -> int:
    """The last checkpoint at or before the first step where ``weights`` differ from 1."""
    return checkpoint_before(run, int(first_use_steps(run, (weights != 1).unsqueeze(0), start)[0]), start)


def vmap_pays(run: Run) -> bool:
    """Whether vmapped steps are faster: on small fully connected nets per-call overhead
    dominates (3.6x at K = 64 on the 2D GAN); on CPU convolutions they are slower (1.3x
    slower on the digits DCGAN at K = 8)."""
    return run.cfg.model.arch == "mlp"


def retrain_many(run: Run, weights: torch.Tensor, start: int, *, vmap_steps: bool | None = None,
                 progress: bool = False) -> list[State]:
    """Final states of K retrains from ``start`` with instance weights ``weights`` (K, n_train).

    ``vmap_steps``: advance the forked retrains by one vmapped step (None: where that pays).
    """
    if vmap_steps is None:
        vmap_steps = vmap_pays(run)
    end = run.final_step
    first = first_use_steps(run, weights != 1, start)
    dyn = run.dynamics
    results: list[State | None] = [None] * weights.shape[0]
    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
    weights = weights.to(run.device)
    begin = checkpoint_before(run, int(first.min()), start)
    with torch_threads(run.threads), torch.no_grad():
        state = run.load_state(begin)
        active: list[int] = []
        batched: State | None = None
        stepper = vmap(lambda s, w, b: dyn.step(s, b, w)[0], in_dims=(0, 0, None))
        last_fork = int(first[first < end].max()) if bool((first < end).any()) else begin
        for step in tqdm(range(begin, end), desc="retrain", unit="step", disable=not progress, leave=False):
            forks = torch.nonzero(first == step).flatten().tolist()
            if forks:
                active += forks
                if vmap_steps:
                    fresh = _tile(state, len(forks))
                    batched = fresh if batched is None else _cat(batched, fresh)
                else:
                    for k in forks:
                        results[k] = state
            batch = run.batch(step)
            idx = run.indices(step)
            if active:
                if vmap_steps:
                    batched = stepper(batched, weights[active][:, idx], batch)
                else:
                    for k in active:
                        results[k], stats = dyn.step(results[k], batch, weights[k, idx])
                        check_finite(results[k], stats, step, run.steps_per_epoch)
            if step < last_fork:  # the unperturbed trajectory is needed until the last fork
                state, stats = dyn.step(state, batch, ones)
                check_finite(state, stats, step, run.steps_per_epoch)
        if vmap_steps and batched is not None:
            for pos, k in enumerate(active):
                results[k] = _index(batched, pos)
        for k in range(weights.shape[0]):
            if results[k] is None:  # no changed instance was used: the recorded final state
                results[k] = run.final_state()
            elif vmap_steps:
                _check_finite_state(results[k], k)
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

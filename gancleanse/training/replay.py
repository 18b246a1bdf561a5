"""Replay recorded steps from a checkpoint, optionally with instance weights changed.

With all weights 1 this reproduces the recorded trajectory bitwise (CPU, same threads); with some
weights 0 it is the counterfactual training "as if those instances were absent from their
minibatches", over exactly the steps that ITD differentiates."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..progress import StepCallback
from ..run import Run, torch_threads
from .dynamics import State
from .recorder import check_finite


def replay(run: Run, start: int, end: int | None = None, weights: torch.Tensor | None = None,
           state: State | None = None, progress: bool = False, on_step: StepCallback | None = None) -> State:
    """State at ``end`` (default: the final step) after replaying from the checkpoint at ``start``;
    ``on_step(done, total)`` at the start and after each step."""
    end = run.final_step if end is None else end
    weights = (torch.ones(run.n_train, dtype=run.dtype) if weights is None else weights).to(run.device)
    dyn = run.dynamics
    with torch_threads(run.threads), torch.no_grad():
        state = run.load_state(start) if state is None else state
        if on_step is not None:
            on_step(0, end - start)
        for step in tqdm(range(start, end), desc="replay", unit="step", disable=not progress, leave=False):
            state, stats = dyn.step(state, run.batch(step), weights[run.indices(step)])
            check_finite(state, stats, step, run.steps_per_epoch)
            if on_step is not None:
                on_step(step + 1 - start, end - start)
    return state

"""The two ways ITD differentiates a recorded step, and the choice between them for a run.

Both return what the VJP of ``Dynamics.step`` at (state_t, w = 1) gives for an adjoint u_{t+1}: the adjoint of
state_t and every per-instance term of the batch. They differ in cost, not in value (rounding apart):

- ``vjp``: ``torch.func.vjp`` of the whole step (reverse-over-reverse). The forward replay keeps each step's graph
  until the reverse sweep reaches it, so memory is a stretch of graphs.
- ``hvp``: the forward replay keeps only each step's state and the gradients it computed; the reverse step is the
  optimizers' elementwise VJPs plus one forward-over-reverse Hessian-vector product per player
  (``training/adjoint.py``). Before the first step of each kind (with and without lazy gradient penalties: their
  operations differ), both ways are applied to a random adjoint and compared (``HVPPass.check``); a kind whose
  Hessian-vector product cannot run in forward mode (an operation or a user's ``autograd.Function`` without a
  forward-mode rule) or disagrees with the VJP (an operation whose higher derivative differs between the modes)
  is left to the ``vjp`` way, its steps counted and the reason recorded. An error on a checked kind is raised.
- ``auto``: on CPU, the ``vjp`` way (``itd.TRIAL_DEVICES``). On CUDA the run starts the ``vjp`` way; on the first
  reverse step (the last step of the window) the ``hvp`` way is also timed, from the same state and adjoint (its
  forward step included), and the faster one does the segments that follow (``hvp`` only where it also passes
  its check; ``vjp`` is charged one more step without graph per step where its graphs do not fit a whole
  segment, as it then replays each segment twice). The trial's segment is finished the ``vjp`` way, as
  replayed, so where ``vjp`` stays, the influence is the ``vjp`` way's bit for bit; where ``hvp`` takes over, it
  agrees with either to rounding. The trial costs one ``hvp`` step (and forward mode's one-off start-up, a few
  tenths of a second per process, paid before it).

Measured with torch 2.13 on one CPU thread (``bench/itd_speed.py``), ITD over the window / training it: the 2D
MLP 2.0 (vjp) and 5.1 (hvp); the digits DCGAN at batch 100, 4.0 and 6.3. Forward mode triples each matrix
product and convolution of the gradient it differentiates, while the VJP shares the step's own forward and
backward. The ``hvp`` way's gain is memory: it holds states, not graphs (1.1 GB against 3.8 GB for ``vjp`` holding
a 10-step segment's graphs of that DCGAN; 0.6 GB for a replay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch.func import vjp
from torch.utils._pytree import tree_leaves, tree_map

from ..models.base import Params
from ..models.layer_norm import second_derivatives
from ..training.adjoint import step_adjoint, warm_forward_mode
from ..training.dynamics import Dynamics, State, StepBatch

StepResult = tuple[State, torch.Tensor]  # (adjoint of the state before the step, per-instance terms)


@dataclass
class StepPoint:
    """A replayed step as the Hessian-vector-product adjoint needs it (no graph)."""

    step: int
    state: State  # before the step
    batch: StepBatch
    gradients: dict[str, Params]  # what each player's optimizer consumed
    new_d: Params  # the discriminator after the step
    seconds: float  # the forward step's time


@dataclass
class Pullback:
    """A step replayed the ``vjp`` way: its VJP closure (holding the step's graph) and the state before it."""

    step: int
    state: State
    apply: Callable[[State], StepResult]
    seconds: float  # the forward step's time, graph recorded


Token = Union[Pullback, StepPoint]


class VJPPass:
    """The VJP of the whole step; ``forward``'s closure holds the step's graph."""

    name = "vjp"

    def __init__(self, dyn: Dynamics, batch_of: Callable[[int], StepBatch], ones: torch.Tensor) -> None:
        self.dyn, self.batch_of, self.ones = dyn, batch_of, ones

    def pullback(self, state: State, batch: StepBatch) -> tuple[State, Callable[[State], StepResult]]:
        """The next state and the step's VJP closure (the built-in LayerNorms' backward recorded with their
        closed-form second derivative)."""
        with second_derivatives():
            return vjp(lambda s, w: self.dyn.step(s, batch, w), state, self.ones, has_aux=True)[:2]

    def forward(self, state: State, step: int) -> tuple[State, Token]:
        started = time.perf_counter()
        new, apply = self.pullback(state, self.batch_of(step))
        return new, Pullback(step, state, apply, time.perf_counter() - started)

    def backward(self, token: Token, u: State) -> StepResult:
        """Apply the closure; a ``StepPoint`` (replayed the ``hvp`` way) gets its VJP built here, for this step only."""
        if isinstance(token, StepPoint):
            return self.pullback(token.state, token.batch)[1](u)
        return token.apply(u)

    def summary(self) -> dict[str, Any]:
        return {}


class HVPPass:
    """Replay without graphs; the reverse step by Hessian-vector products, checked against and backed by the VJP."""

    name = "hvp"

    def __init__(self, dyn: Dynamics, batch_of: Callable[[int], StepBatch], ones: torch.Tensor) -> None:
        self.dyn, self.batch_of, self.ones = dyn, batch_of, ones
        self.fallback = VJPPass(dyn, batch_of, ones)
        self.tolerance = float(torch.finfo(ones.dtype).eps) ** 0.5
        self.verified: set[bool] = set()  # kinds of step (gradient penalties applied or not) that passed ``check``
        self.unsupported: dict[bool, str] = {}  # kind -> why the VJP does it
        self.fallback_steps = 0

    def forward(self, state: State, step: int) -> tuple[State, StepPoint]:
        batch = self.batch_of(step)
        started = time.perf_counter()
        with torch.no_grad():
            new, _, gradients = self.dyn.step_with_gradients(state, batch, self.ones)
        return new, StepPoint(step, state, batch, gradients, new["d"], time.perf_counter() - started)

    def backward(self, token: Token, u: State) -> StepResult:
        """The step's adjoint; before the first step of each kind, the two ways are compared (``check``)."""
        if not isinstance(token, StepPoint):  # not replayed this way
            raise TypeError("the hvp reverse pass needs the steps replayed by its own forward")
        kind = self.penalised(token.batch)
        if kind in self.verified or (kind not in self.unsupported and self.check(token)):
            return self.adjoint(token, u)
        self.fallback_steps += 1
        return self.fallback.backward(token, u)

    def adjoint(self, point: StepPoint, u: State) -> StepResult:
        with second_derivatives():
            return step_adjoint(self.dyn, point.state, point.batch, self.ones, point.gradients, point.new_d, u)

    def attempt(self, point: StepPoint, u: State) -> StepResult | None:
        """``adjoint``, or None (the reason recorded) where forward mode cannot run an operation of the step."""
        try:
            return self.adjoint(point, u)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as error:
            self.unsupported[self.penalised(point.batch)] = \
                (str(error).strip().splitlines() or [type(error).__name__])[0]
            return None

    def check(self, point: StepPoint) -> bool:
        """Whether this kind of step can be done the ``hvp`` way: both ways applied to a random adjoint (every block
        nonzero, unlike a metric's gradient, which is often zero on D) agree to the square root of the precision,
        block by block. An operation may lack a forward-mode rule, or have a higher derivative that differs between
        forward and reverse mode (``F.layer_norm``'s third, met under gradient penalties, did: the built-in models
        use ``models.layer_norm`` there, right in both); such a kind of step is left to the VJP, which the
        exactness tests hold to, and the reason recorded."""
        kind = self.penalised(point.batch)
        generator = torch.Generator().manual_seed(0)
        probe = tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device), point.state)
        by_hvp = self.attempt(point, probe)
        if by_hvp is None:
            return False
        gap = relative_gap(by_hvp, self.fallback.backward(point, probe))
        if gap > self.tolerance:
            self.unsupported[kind] = (f"forward and reverse mode differ by {gap:.1e} (relative) on a step "
                                      f"{'with' if kind else 'without'} gradient penalties")
            return False
        self.verified.add(kind)
        return True

    def penalised(self, batch: StepBatch) -> bool:
        """Whether the step applies the (lazy) gradient penalties: the two kinds of step differ in operations."""
        dyn = self.dyn
        return bool(dyn.r1_gamma or dyn.r2_gamma) and batch.count % dyn.r1_every == 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vjp_fallback_steps": self.fallback_steps}
        if self.unsupported:
            out["vjp_fallback_reason"] = "; ".join(sorted(set(self.unsupported.values())))
        return out


def relative_gap(got: StepResult, expected: StepResult) -> float:
    """The largest difference of two step results relative to the largest entry of its block (each player, each
    optimizer state, the average, the per-instance terms)."""
    (got_u, got_w), (want_u, want_w) = got, expected
    pairs = [(got_w, want_w)] + [(tree_leaves(got_u[k]), tree_leaves(want_u[k])) for k in want_u]
    gap = 0.0
    for a, b in pairs:
        a, b = (a, b) if isinstance(a, torch.Tensor) else (_flat(a), _flat(b))
        if b.numel():
            gap = max(gap, float((a - b).abs().max()) / max(float(b.abs().max()), torch.finfo(b.dtype).tiny))
    return gap


def _flat(leaves: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([leaf.reshape(-1) for leaf in leaves]) if leaves else torch.zeros(0)


ReversePass = Union[VJPPass, HVPPass]


def choose(vjp_pass: VJPPass, hvp_pass: HVPPass, pullback: Pullback, u: State, replays_twice: bool
           ) -> tuple[ReversePass, StepResult, dict[str, float]]:
    """Time both ways on the step of ``pullback`` (replayed the ``vjp`` way) from the adjoint ``u``, each with its
    forward step: the faster pass (``hvp`` only where it also passes its check), the ``vjp`` way's result, which
    finishes the segment, and the seconds of each. ``replays_twice``: the ``vjp`` way's graphs do not fit a whole
    segment, so each step also costs it the replay that finds the stretches' starts (one more step without graph)."""
    warm_forward_mode()
    started = time.perf_counter()
    by_vjp = pullback.apply(u)
    vjp_seconds = pullback.seconds + time.perf_counter() - started
    point = hvp_pass.forward(pullback.state, pullback.step)[1]
    started = time.perf_counter()
    by_hvp = hvp_pass.attempt(point, u)
    seconds = {"vjp": vjp_seconds + (point.seconds if replays_twice else 0.0),
               "hvp": point.seconds + time.perf_counter() - started}
    if by_hvp is not None and seconds["hvp"] < seconds["vjp"] and hvp_pass.check(point):
        return hvp_pass, by_vjp, seconds
    return vjp_pass, by_vjp, seconds

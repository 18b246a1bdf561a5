"""AID: influence of every training instance by implicit differentiation at the trained point.

Treat the trained parameters theta = (theta_D, theta_G) as a stationary point of the game

    F(theta, w) = [ grad_D L_D(theta, w) ; grad_G L_G(theta) ] = 0,
    L_D = (1/N) sum_j w_j l_real(D(x_j)) + mean_z l_fake(D(G(z))) + R_D,

so that d(theta)/d(w_j) = -J^{-1} dF/dw_j with the non-symmetric game Jacobian J = dF/dtheta.
Removing j (w_j: 1 -> 0) changes the metric V by about

    influence_j = v^T dF/dw_j = (1/N) v_D^T grad_D l_real(D(x_j)),   where  J^T v = grad V.

One adjoint solve serves every instance; the per-instance terms are then one forward-mode pass (``jvp`` of
the per-sample real losses in direction v_D) over the training set. J^T v is a VJP of F, so J is never
formed. The solvers work on A y = g, where A is J^T itself or its damped form (below), on the fixed
operator: F on ``operator_size`` training instances (default all, up to 2048) and as many fixed latents,
both drawn from ``seed``.

- ``gmres``: GMRES (SciPy, never restarted: ``iterations`` Krylov vectors);
- ``cg``: conjugate gradients on the normal equations A^T A y = A^T g (J u is a JVP of F);
- ``neumann``: the Richardson / Neumann series y <- y + s (g - A y), on the fixed operator, or with
  ``batch_size`` on fresh minibatches and latents per iteration (the stochastic series).

Damping: ``damping`` = lambda solves (J + lambda I)^T v = g. A trained GAN is rarely at a stationary point
and its J is often indefinite, so the undamped answer (lambda = 0, the equilibrium's shift) can rank
instances poorly. (J + lambda I)^{-1} = int_0^inf e^{-lambda t} e^{-J t} dt weighs the linearized game's
response over a time 1/lambda. By default AID damps on the time scale of the recorded window in the
training's own step sizes (``window_dynamics``: (J^T P + I/T) y = g, v = P y, with P the per-coordinate
steps that the optimizer states (``step_sizes``) and T the window's length; for SGD, lambda = 1 / (lr T)).
On the paper's 2D GAN this lifts AID's Kendall tau against retraining of the last epoch from -0.15
(undamped) to 0.62 (ITD: 0.63).

What is held constant, and why: at a stationary point the update rule does not matter (sgd, momentum and
Adam share the fixed points of F, and alternating and simultaneous updates both stop where F = 0), so AID
differentiates F, not the optimizer; with a generator average the metric sees the average, which equals
theta_G at a fixed point, so its gradient is added to theta_G's block. Jacobian products run in the run's
dtype (float32 halves their cost for image GANs); the solvers' vectors are float64.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.func import grad, jvp, vjp
from tqdm.auto import tqdm

from ..errors import ConfigError, GancleanseWarning
from ..metrics import Metric, make_metric
from ..models.layer_norm import second_derivatives
from ..options import AID_SOLVERS, AIDOptions
from ..run import Run, torch_threads
from ..scores import Scores
from ..training.dynamics import Dynamics, State
from ..training.losses import d_real_term
from ..training.schedule import solver_draw

DEFAULT_OPERATOR_SIZE = 2048
CHUNK = 256  # instances per pass inside one Jacobian product (larger chunks of double backward scale badly)
Tree = dict[str, dict[str, torch.Tensor]]  # {"d": params_D, "g": params_G}


@dataclass
class AIDResult:
    """Influence per training instance (predicted V(without j) - V(with j)), float64, and solver facts."""

    influence: torch.Tensor
    metric_value: float
    solver: str
    residual: float  # ||(J + lambda I)^T v - grad V|| / ||grad V|| on the fixed operator
    iterations: int
    converged: bool
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


class AIDConvergenceWarning(GancleanseWarning):
    """The adjoint solve stopped above its tolerance: the estimate may be inaccurate."""


# ------------------------------------------------------------------------ flat vectors
def flatten(tree: Tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for p in ("d", "g") for t in tree[p].values()])


def unflatten(vec: torch.Tensor, like: Tree) -> Tree:
    parts = iter(vec.split([t.numel() for p in ("d", "g") for t in like[p].values()]))
    return {p: {k: next(parts).reshape(t.shape) for k, t in like[p].items()} for p in ("d", "g")}


# ------------------------------------------------------------------------ the game
def game_gradient(dyn: Dynamics, params: Tree, x: torch.Tensor, z: torch.Tensor,
                  y: torch.Tensor | None = None, c: torch.Tensor | None = None) -> Tree:
    """F(theta) on reals ``x`` and latents ``z`` (same count), weights 1; ``y`` / ``c``: their labels (conditional)."""
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return {"d": grad(dyn.loss_d)(params["d"], params["g"], x, z, ones, None, y, c),
            "g": grad(dyn.loss_g)(params["g"], params["d"], z, c)}


@dataclass
class GameOperator:
    """Products with A = J^T P + lambda I (J = dF/dtheta at ``params``) and its transpose.

    P is a diagonal scaling (``scale``; identity when None): with the training's step sizes and lambda = 1/T,
    A y = g is the damped system of the linearized training dynamics, and v = P y. F is the size-weighted
    mean of F over chunks of at most CHUNK instances, so the products are linear combinations of per-chunk
    VJPs/JVPs and memory stays bounded.
    """

    dyn: Dynamics
    params: Tree
    x: torch.Tensor
    z: torch.Tensor
    damping: float = 0.0
    scale: torch.Tensor | None = None
    y: torch.Tensor | None = None  # conditional GANs: labels of x, and of the fakes from z
    c: torch.Tensor | None = None

    def _chunks(self):
        """(F on one chunk, as a function of theta; the chunk's share of the instances) per chunk."""
        n = self.x.shape[0]
        for lo in range(0, n, CHUNK):
            part = slice(lo, lo + CHUNK)
            chunk = (self.x[part], self.z[part], *(None if t is None else t[part] for t in (self.y, self.c)))
            yield (lambda p, chunk=chunk: game_gradient(self.dyn, p, *chunk)), min(CHUNK, n - lo) / n

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """A y = J^T (P y) + lambda y, for a float64 vector y."""
        v = y if self.scale is None else self.scale * y
        v_tree = unflatten(v.to(self.x.dtype), self.params)
        out = self.damping * y
        for game, share in self._chunks():
            out = out + share * flatten(vjp(game, self.params)[1](v_tree)[0]).to(torch.float64)
        return out

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        """A^T u = P (J u) + lambda u, for a float64 vector u."""
        u_tree = unflatten(u.to(self.x.dtype), self.params)
        ju = torch.zeros_like(u)
        for game, share in self._chunks():
            ju = ju + share * flatten(jvp(game, (self.params,), (u_tree,))[1]).to(torch.float64)
        return (ju if self.scale is None else self.scale * ju) + self.damping * u


def metric_target(g: State) -> Tree:
    """grad V (a state tree) as the (d, g) blocks of the game; the generator average's block joins g's."""
    ema = g.get("ema_g")
    return {"d": dict(g["d"]), "g": dict(g["g"]) if ema is None else {k: v + ema[k] for k, v in g["g"].items()}}


# ------------------------------------------------------------------------ solvers
@dataclass
class AdjointProblem:
    """A y = g on the fixed operator, and what a solver may need besides."""

    op: GameOperator
    target: torch.Tensor  # g = grad V, float64
    iterations: int
    options: AIDOptions
    seed: int
    draw: Callable[[int, int], GameOperator]  # (draw counter, instances) -> operator on a fresh draw
    n_train: int
    bar: tqdm  # progress over the iterations
    ticks: int = 0  # iterations so far

    def tick(self) -> None:
        """One call per iteration: counts it and advances the progress bar."""
        self.ticks += 1
        self.bar.update()


@dataclass
class Solution:
    """y; the iterations used when the solver counts them itself (else the ticks); facts to record."""

    y: torch.Tensor
    iterations: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)


def _on_host(fn: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor):
    """SciPy's Krylov solvers keep their vectors on the host; the products run on ``like``'s device."""
    from scipy.sparse.linalg import LinearOperator

    def apply(v: np.ndarray) -> np.ndarray:
        return fn(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(like.device)).cpu().numpy()

    return LinearOperator((like.numel(), like.numel()), matvec=apply, dtype=np.float64)


def solve_gmres(problem: AdjointProblem) -> Solution:
    """GMRES without restarts: at most ``iterations`` Krylov vectors are kept."""
    from scipy.sparse.linalg import gmres

    g = problem.target
    y, _ = gmres(_on_host(problem.op.rmatvec, g), g.cpu().numpy(), rtol=problem.options.tol, atol=0.0,
                 restart=problem.iterations, maxiter=1, callback=lambda _: problem.tick(), callback_type="pr_norm")
    return Solution(torch.from_numpy(y).to(g.device))


def solve_cg(problem: AdjointProblem) -> Solution:
    """CG on A^T A y = A^T g: symmetric positive definite when A is invertible."""
    from scipy.sparse.linalg import cg

    op, g = problem.op, problem.target
    y, _ = cg(_on_host(lambda u: op.matvec(op.rmatvec(u)), g), op.matvec(g).cpu().numpy(), rtol=problem.options.tol,
              atol=0.0, maxiter=problem.iterations, callback=lambda _: problem.tick())
    return Solution(torch.from_numpy(y).to(g.device))


def spectral_norm(op: GameOperator, n: int, iterations: int = 20, seed: int = 0) -> float:
    """Largest singular value of A, by power iteration on A^T A."""
    u = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(op.x.device)
    u /= u.norm()
    sigma = 0.0
    for _ in range(iterations):
        w = op.matvec(op.rmatvec(u))
        sigma = math.sqrt(float(w.norm()))
        if sigma == 0.0:
            break
        u = w / w.norm()
    return sigma


def solve_neumann(problem: AdjointProblem) -> Solution:
    """y = s sum_k (I - s A)^k g, as Richardson iteration y <- y + s (g - A y); s = 1 / ||A|| unless given.

    On the fixed operator it stops once the residual is below ``tol``. With ``batch_size`` (a fresh minibatch
    operator per iteration) the iterate keeps fluctuating around the solution, so it runs every iteration and
    returns the average of the second half of the iterates (tail averaging).
    """
    op, g, opts, iterations = problem.op, problem.target, problem.options, problem.iterations
    step = opts.step if opts.step is not None else 1.0 / max(spectral_norm(op, g.numel(), seed=problem.seed), 1e-300)
    facts = {"step": step, "batch_size": opts.batch_size}
    batch = None if opts.batch_size is None else min(opts.batch_size, problem.n_train)
    v = torch.zeros_like(g)
    tail, counted = torch.zeros_like(g), 0
    g_norm = float(g.norm())
    for k in range(iterations):
        r = g - (op if batch is None else problem.draw(k + 1, batch)).rmatvec(v)
        problem.tick()
        if batch is None and float(r.norm()) <= opts.tol * g_norm:
            return Solution(v, k, facts)
        v = v + step * r
        if batch is not None and k >= iterations // 2:
            tail, counted = tail + v, counted + 1
    return Solution(v if batch is None else tail / counted, iterations, facts)


# name -> (the iteration budget when none is given, the solver)
SOLVERS: dict[str, tuple[int, Callable[[AdjointProblem], Solution]]] = {
    "gmres": (100, solve_gmres), "cg": (200, solve_cg), "neumann": (1000, solve_neumann)}
if tuple(SOLVERS) != AID_SOLVERS:  # AIDOptions validates solver names against its own list
    raise RuntimeError(f"AID solvers {tuple(SOLVERS)} differ from gancleanse.options.AID_SOLVERS {AID_SOLVERS}")


# ------------------------------------------------------------------------ entry points
def aid_influence(run: Run, metric: Metric, *, solver: str = "gmres", iterations: int | None = None,
                  tol: float = 1e-6, damping: float | None = None, step: float | None = None,
                  batch_size: int | None = None, operator_size: int | None = None, seed: int = 0,
                  state: State | None = None, progress: bool = True) -> AIDResult:
    """Influence of every training instance on ``metric`` at the run's final state (or ``state``).

    The keywords are ``AIDOptions``'s fields (documented and validated there): ``iterations`` (Krylov
    vectors, CG steps or series terms), ``tol`` (relative residual), ``damping`` (lambda; None: the recorded
    window's time scale, 0: the undamped equilibrium), ``step``, ``batch_size`` and ``operator_size``.
    """
    options = AIDOptions(solver=solver, iterations=iterations, step=step, damping=damping, tol=tol,
                         batch_size=batch_size, operator_size=operator_size)
    return aid_solve(run, metric, options, seed=seed, state=state, progress=progress)


def aid_solve(run: Run, metric: Metric, options: AIDOptions, *, seed: int = 0, state: State | None = None,
              progress: bool = True) -> AIDResult:
    """``aid_influence`` with its options as one validated ``AIDOptions``."""
    solver = options.solver
    default_iterations, solve = SOLVERS[solver]
    iterations = options.iterations if options.iterations is not None else default_iterations
    started = time.perf_counter()
    size = min(options.operator_size or DEFAULT_OPERATOR_SIZE, run.n_train)

    with torch_threads(run.threads), second_derivatives():  # Jacobian products of the game's gradient
        state = run.final_state() if state is None else state
        params = {p: {k: t.detach() for k, t in state[p].items()} for p in ("d", "g")}
        if options.damping is None:  # P and lambda of the window's time scale
            scale, damping = window_dynamics(run, state)
            facts: dict[str, Any] = {"damping": "window", "window_steps": run.final_step - run.window_start}
        else:
            scale, damping, facts = None, options.damping, {"damping": options.damping}
        facts.update(tol=options.tol, operator_size=size, seed=seed)
        draw = operator_draws(run, params, damping, scale, seed)
        metric_value, gradient = metric.value_and_gradient(state)
        target = flatten(metric_target(gradient)).to(torch.float64)
        op = draw(0, size)
        bar = tqdm(total=iterations, desc=f"aid {solver}", unit="it", disable=not progress, leave=False)
        problem = AdjointProblem(op, target, iterations, options, seed, draw, run.n_train, bar)
        solution = solve(problem)
        bar.close()
        facts.update(solution.facts)
        residual = float((op.rmatvec(solution.y) - target).norm() / target.norm()) if target.norm() > 0 else 0.0
        v = solution.y if scale is None else scale * solution.y
        influence = instance_terms(run.dynamics, params, unflatten(v, params)["d"], run.x_train, run.y_train)

    used = problem.ticks if solution.iterations is None else solution.iterations
    converged = residual <= options.tol
    if not converged:
        warnings.warn(f"AID ({solver}) stopped at relative residual {residual:.2e} > tol {options.tol:.0e} "
                      f"after {used} iterations: raise aid.iterations ({AIDOptions.flag('iterations')}) or try "
                      "another aid.solver", AIDConvergenceWarning, stacklevel=3)
    return AIDResult(influence, metric_value, solver, residual, used, converged, time.perf_counter() - started, facts)


def operator_draws(run: Run, params: Tree, damping: float, scale: torch.Tensor | None,
                   seed: int) -> Callable[[int, int], GameOperator]:
    """(counter, n) -> the operator on n training instances and latents of draw ``counter``
    (draw 0 is the fixed operator; the stochastic Neumann series takes the next ones)."""

    def draw(counter: int, n: int) -> GameOperator:
        idx, z, c = solver_draw(seed, counter, run.n_train, n, run.cfg.model.z_dim, run.label_frequencies)
        idx = idx.to(run.device)
        return GameOperator(run.dynamics, params, run.x_train[idx], z.to(run.device, run.dtype), damping, scale,
                            None if run.y_train is None else run.y_train[idx],
                            None if c is None else c.to(run.device))

    return draw


def instance_terms(dyn: Dynamics, params: Tree, v_d: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """(1/N) v_D^T grad_D l_real(D(x_j)) for every j: one JVP of the per-sample real losses
    (``y``: the instances' labels for a conditional GAN)."""
    n = x.shape[0]
    tangent_d = {k: t.to(x.dtype) for k, t in v_d.items()}
    out = []
    for lo in range(0, n, CHUNK):
        x_chunk, y_chunk = x[lo:lo + CHUNK], None if y is None else y[lo:lo + CHUNK]
        _, tangent = jvp(lambda pd: d_real_term(dyn.loss, dyn.models.discriminate(pd, x_chunk, y_chunk)),
                         (params["d"],), (tangent_d,))
        out.append(tangent.detach() / n)
    return torch.cat(out).to(torch.float64)


def window_dynamics(run: Run, state: State) -> tuple[torch.Tensor, float]:
    """P (the training's per-coordinate step sizes, flat) and 1/T (T = steps of the recorded window).

    The linearized training map is theta <- theta - P F(theta); its response to a weight change, integrated
    with decay over about T steps, is (P J + I/T)^{-1} P dF/dw. So AID solves (J^T P + I/T) y = grad V and
    takes v = P y: for SGD that is (J + I/(lr T))^T v = grad V. Each player's optimizer states its P
    (``step_sizes``: the learning rate for sgd, lr / (1 - momentum), or Adam's lr / (sqrt(v_hat) + eps) in
    the final state).
    """
    blocks = []
    for player, optimizer in (("d", run.dynamics.opt_d), ("g", run.dynamics.opt_g)):
        if not hasattr(optimizer, "step_sizes"):
            raise ConfigError(f"the {player.upper()} optimizer {type(optimizer).__name__} does not state its step "
                              f"sizes (step_sizes), which the default damping needs: give aid.damping "
                              f"({AIDOptions.flag('damping')})")
        sizes = optimizer.step_sizes(state.get(f"opt_{player}", {}), state[player], run.final_step)
        blocks.extend(sizes[name].reshape(-1) for name in state[player])
    return torch.cat(blocks), 1.0 / (run.final_step - run.window_start)


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, options: AIDOptions | None = None,
          **legacy: Any) -> Scores:
    """AID influence on ``metric`` (validation split) with ``options``; ``legacy``: the options as
    separate keywords (``solver=``, ...), as callers passed them before ``AIDOptions``."""
    if legacy and options is not None:
        raise ConfigError(f"aid: give options or the separate keywords {', '.join(sorted(legacy))}, not both")
    options = AIDOptions.from_mapping(legacy if legacy else options)
    res = aid_solve(run, make_metric(metric, run, "valid"), options, seed=seed, progress=progress)
    info = {"metric_value": res.metric_value, "seconds": res.seconds, "solver": res.solver,
            "residual": res.residual, "iterations": res.iterations, "converged": res.converged, **res.options}
    return Scores.from_influence(metric, "aid", res.influence.cpu().numpy(), info=info)

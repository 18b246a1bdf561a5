"""AID: influence of every training instance by implicit differentiation at the trained point.

Treat the trained parameters theta = (theta_D, theta_G) as a stationary point of the game

    F(theta, w) = [ grad_D L_D(theta, w) ; grad_G L_G(theta) ] = 0,
    L_D = (1/N) sum_j w_j l_real(D(x_j)) + mean_z l_fake(D(G(z))) + R_D,

so that d(theta)/d(w_j) = -J^{-1} dF/dw_j with the non-symmetric game Jacobian J = dF/dtheta.
Removing j (w_j: 1 -> 0) changes the metric V by about

    influence_j = v^T dF/dw_j = (1/N) v_D^T grad_D l_real(D(x_j)),   where  J^T v = grad V.

One adjoint solve serves every instance; the per-instance terms are then one forward-mode
pass (``jvp`` of the per-sample real losses in direction v_D) over the training set.
J^T v is a VJP of F, so J is never formed. The solvers work on A y = g, where A is J^T
itself or its damped form (below):

- ``gmres``: GMRES (SciPy, never restarted: ``iterations`` Krylov vectors);
- ``cg``: conjugate gradients on the normal equations A^T A y = A^T g (J u is a JVP of F);
- ``neumann``: the Richardson / Neumann series y <- y + s (g - A y), on the fixed operator,
  or with ``batch_size`` on fresh minibatches and latents per iteration (the stochastic
  series).

The fixed operator evaluates F on ``operator_size`` training instances (all of them by
default, up to 2048) and as many fixed latents, both drawn from ``seed``.

Damping: ``damping`` = lambda solves (J + lambda I)^T v = g. A trained GAN is rarely at a
stationary point and its J is often indefinite, so the undamped answer (lambda = 0, the
equilibrium's shift) can rank instances poorly. (J + lambda I)^{-1} = int_0^inf e^{-lambda t}
e^{-J t} dt weighs the linearized game's response over a time 1/lambda. By default AID damps
on the time scale of the recorded window in the training's own step sizes
(``window_dynamics``: (J^T P + I/T) y = g, v = P y, with P the per-coordinate steps and T the
window's length; for SGD, lambda = 1 / (lr T)). On the paper's 2D GAN this lifts AID's
Kendall tau against retraining of the last epoch from -0.15 (undamped) to 0.62 (ITD: 0.63).

What is held constant, and why: at a stationary point the update rule does not matter
(sgd, momentum and Adam share the fixed points of F, and alternating and simultaneous
updates both stop where F = 0), so AID differentiates F, not the optimizer; with a
generator average the metric sees the average, which equals theta_G at a fixed point, so
its gradient is added to theta_G's block. Jacobian products run in the run's dtype (float32
halves their cost for image GANs); the solvers' vectors are float64.
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
from ..run import Run, torch_threads
from ..scores import Scores
from ..training.dynamics import Dynamics, State
from ..training.losses import d_real_term
from ..training.schedule import solver_draw

SOLVERS = ("gmres", "cg", "neumann")
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
    out: Tree = {}
    pos = 0
    for p in ("d", "g"):
        out[p] = {}
        for k, t in like[p].items():
            out[p][k] = vec[pos:pos + t.numel()].reshape(t.shape)
            pos += t.numel()
    return out


# ------------------------------------------------------------------------ the game
def game_gradient(dyn: Dynamics, params: Tree, x: torch.Tensor, z: torch.Tensor,
                  y: torch.Tensor | None = None, c: torch.Tensor | None = None) -> Tree:
    """F(theta) on real ``x`` and latents ``z`` (same count): both players' loss gradients, weights 1.
    ``y`` / ``c``: labels of the reals / fakes of a conditional GAN."""
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return {"d": grad(dyn.loss_d)(params["d"], params["g"], x, z, ones, None, y, c),
            "g": grad(dyn.loss_g)(params["g"], params["d"], z, c)}


@dataclass
class GameOperator:
    """Products with A = J^T P + lambda I (J = dF/dtheta at ``params``) and its transpose.

    P is a diagonal scaling (``scale``; identity when None): with the training's step sizes
    and lambda = 1/T, A y = g is the damped system of the linearized training dynamics, and
    v = P y. F is the size-weighted mean of F over chunks of at most CHUNK instances, so the
    products are linear combinations of per-chunk VJPs/JVPs and memory stays bounded.
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
        n = self.x.shape[0]
        for lo in range(0, n, CHUNK):
            part = slice(lo, lo + CHUNK)
            labels = tuple(None if t is None else t[part] for t in (self.y, self.c))
            yield (self.x[part], self.z[part], *labels), min(CHUNK, n - lo) / n

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """A y = J^T (P y) + lambda y, for a float64 vector y."""
        v = y if self.scale is None else self.scale * y
        tv = unflatten(v.to(self.x.dtype), self.params)
        out = self.damping * y
        for chunk, share in self._chunks():
            _, pullback = vjp(lambda p, chunk=chunk: game_gradient(self.dyn, p, *chunk), self.params)
            out = out + share * flatten(pullback(tv)[0]).to(torch.float64)
        return out

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        """A^T u = P (J u) + lambda u, for a float64 vector u."""
        tu = unflatten(u.to(self.x.dtype), self.params)
        ju = torch.zeros_like(u)
        for chunk, share in self._chunks():
            _, tangent = jvp(lambda p, chunk=chunk: game_gradient(self.dyn, p, *chunk), (self.params,), (tu,))
            ju = ju + share * flatten(tangent).to(torch.float64)
        return (ju if self.scale is None else self.scale * ju) + self.damping * u


def _detached(tree: dict) -> dict:
    return {k: _detached(v) if isinstance(v, dict) else v.detach() for k, v in tree.items()}


def metric_target(metric: Metric, state: State) -> Tree:
    """grad V at ``state`` for the (d, g) blocks; the generator average's block joins g's."""
    g = grad(metric.fn)(state)
    out = {"d": dict(g["d"]), "g": dict(g["g"])}
    if "ema_g" in g:
        out["g"] = {k: v + g["ema_g"][k] for k, v in out["g"].items()}
    return out


# ------------------------------------------------------------------------ solvers
def _scipy_operator(n: int, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
    """SciPy's Krylov solvers keep their vectors on the host; the products run on ``device``."""
    from scipy.sparse.linalg import LinearOperator

    def apply(v: np.ndarray) -> np.ndarray:
        return fn(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1)).to(device)).cpu().numpy()

    return LinearOperator((n, n), matvec=apply, dtype=np.float64)


def solve_gmres(op: GameOperator, g: torch.Tensor, iterations: int, tol: float,
                tick: Callable[[], None]) -> torch.Tensor:
    """GMRES without restarts: at most ``iterations`` Krylov vectors are kept."""
    from scipy.sparse.linalg import gmres

    v, _ = gmres(_scipy_operator(g.numel(), op.rmatvec, g.device), g.cpu().numpy(), rtol=tol, atol=0.0,
                 restart=iterations, maxiter=1, callback=lambda _: tick(), callback_type="pr_norm")
    return torch.from_numpy(v).to(g.device)


def solve_cg(op: GameOperator, g: torch.Tensor, iterations: int, tol: float,
             tick: Callable[[], None]) -> torch.Tensor:
    """CG on A^T A y = A^T g: symmetric positive definite when A is invertible."""
    from scipy.sparse.linalg import cg

    A = _scipy_operator(g.numel(), lambda u: op.matvec(op.rmatvec(u)), g.device)
    v, _ = cg(A, op.matvec(g).cpu().numpy(), rtol=tol, atol=0.0, maxiter=iterations, callback=lambda _: tick())
    return torch.from_numpy(v).to(g.device)


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


def solve_neumann(op: GameOperator, g: torch.Tensor, iterations: int, tol: float, step: float,
                  fresh: Callable[[int], GameOperator] | None,
                  tick: Callable[[], None]) -> tuple[torch.Tensor, int]:
    """y = s sum_k (I - s A)^k g, as Richardson iteration y <- y + s (g - A y).

    On the fixed operator it stops once the residual is below ``tol``. With ``fresh``
    minibatch operators the iterate keeps fluctuating around the solution, so it runs every
    iteration and returns the average of the second half of the iterates (tail averaging).
    """
    v = torch.zeros_like(g)
    tail, counted = torch.zeros_like(g), 0
    g_norm = float(g.norm())
    for k in range(iterations):
        A = op if fresh is None else fresh(k)
        r = g - A.rmatvec(v)
        tick()
        if fresh is None and float(r.norm()) <= tol * g_norm:
            return v, k
        v = v + step * r
        if fresh is not None and k >= iterations // 2:
            tail, counted = tail + v, counted + 1
    return (v if fresh is None else tail / counted), iterations


# ------------------------------------------------------------------------ entry point
def aid_influence(run: Run, metric: Metric, *, solver: str = "gmres", iterations: int | None = None,
                  tol: float = 1e-6, damping: float | None = None, step: float | None = None,
                  batch_size: int | None = None, operator_size: int | None = None, seed: int = 0,
                  state: State | None = None, progress: bool = True) -> AIDResult:
    """Influence of every training instance on ``metric`` at the run's final state (or ``state``).

    ``iterations``: Krylov vectors (gmres), CG steps (cg) or series terms (neumann); default
    100, 200 and 1000. ``tol``: relative residual to reach. ``damping``: lambda of
    (J + lambda I)^T v = grad V; None (default) damps on the recorded window's time scale
    (``window_dynamics``); 0 is the undamped equilibrium. ``step``: the Neumann step s
    (default 1 / ||A||, by power iteration). ``batch_size``: Neumann on fresh minibatches of
    that many instances and latents. ``operator_size``: instances of the fixed operator
    (default all, up to 2048).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown AID solver {solver!r} (available: {', '.join(SOLVERS)})")
    iterations = iterations if iterations is not None else {"gmres": 100, "cg": 200, "neumann": 1000}[solver]
    _check_options(iterations, tol, damping, step, batch_size, operator_size, solver)
    started = time.perf_counter()
    n_train, z_dim = run.n_train, run.cfg.model.z_dim
    size = min(operator_size or DEFAULT_OPERATOR_SIZE, n_train)
    x_all = run.x_train

    with torch_threads(run.threads):
        state = run.final_state() if state is None else state
        params = _detached({"d": state["d"], "g": state["g"]})
        if damping is None:
            scale, lam = window_dynamics(run, state)
            options: dict[str, Any] = {"damping": "window", "window_steps": run.final_step - run.window_start}
        else:
            scale, lam = None, damping
            options = {"damping": damping}
        options.update(tol=tol, operator_size=size, seed=seed)

        def operator_on(counter: int, n: int) -> GameOperator:
            idx, z, c = solver_draw(seed, counter, n_train, n, z_dim, run.label_frequencies)
            idx = idx.to(run.device)
            return GameOperator(run.dynamics, params, x_all[idx], z.to(run.device, run.dtype), lam, scale,
                                None if run.y_train is None else run.y_train[idx],
                                None if c is None else c.to(run.device))

        metric_value = metric.value(state)
        target = flatten(metric_target(metric, state)).to(torch.float64)
        op = operator_on(0, size)
        bar = tqdm(total=iterations, desc=f"aid {solver}", unit="it", disable=not progress, leave=False)
        used = 0

        def tick() -> None:
            nonlocal used
            used += 1
            bar.update()

        if solver == "gmres":
            y = solve_gmres(op, target, iterations, tol, tick)
        elif solver == "cg":
            y = solve_cg(op, target, iterations, tol, tick)
        else:
            step = step if step is not None else 1.0 / max(spectral_norm(op, target.numel(), seed=seed), 1e-300)
            fresh = None
            if batch_size is not None:
                b = min(batch_size, n_train)
                fresh = lambda k: operator_on(k + 1, b)  # noqa: E731 - one-line factory
            y, used = solve_neumann(op, target, iterations, tol, step, fresh, tick)
            options.update(step=step, batch_size=batch_size)
        bar.close()
        residual = float((op.rmatvec(y) - target).norm() / target.norm()) if target.norm() > 0 else 0.0
        v = y if scale is None else scale * y
        influence = instance_terms(run.dynamics, params, unflatten(v, params)["d"], x_all, run.y_train)

    converged = residual <= tol
    if not converged:
        warnings.warn(f"AID ({solver}) stopped at relative residual {residual:.2e} > tol {tol:.0e} after "
                      f"{used} iterations: raise --aid-iterations or try another --aid-solver",
                      AIDConvergenceWarning, stacklevel=2)
    return AIDResult(influence, metric_value, solver, residual, used, converged,
                     time.perf_counter() - started, options)


def instance_terms(dyn: Dynamics, params: Tree, v_d: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """(1/N) v_D^T grad_D l_real(D(x_j)) for every j: one JVP of the per-sample real losses
    (``y``: the instances' labels for a conditional GAN)."""
    n = x.shape[0]

    def real_losses(pd: dict[str, torch.Tensor], xc: torch.Tensor, yc: torch.Tensor | None) -> torch.Tensor:
        return d_real_term(dyn.loss, dyn.models.discriminate(pd, xc, yc))

    out = []
    for lo in range(0, n, CHUNK):
        xc, yc = x[lo:lo + CHUNK], None if y is None else y[lo:lo + CHUNK]
        _, tangent = jvp(lambda pd: real_losses(pd, xc, yc), (params["d"],),
                         ({k: t.to(x.dtype) for k, t in v_d.items()},))
        out.append(tangent.detach() / n)
    return torch.cat(out).to(torch.float64)


def window_dynamics(run: Run, state: State) -> tuple[torch.Tensor, float]:
    """P (the training's per-coordinate step sizes, flat) and 1/T (T = steps of the recorded window).

    The linearized training map is theta <- theta - P F(theta); its response to a weight
    change, integrated with decay over about T steps, is (P J + I/T)^{-1} P dF/dw. So AID
    solves (J^T P + I/T) y = grad V and takes v = P y: for SGD that is (J + I/(lr T))^T v =
    grad V. P is the learning rate (sgd), lr / (1 - momentum) (momentum), or Adam's
    lr / (sqrt(v_hat) + eps) per coordinate in the final state.
    """
    t = run.cfg.train
    blocks = []
    for player, lr in (("d", t.lr_d), ("g", t.lr_g)):
        for name, p in state[player].items():
            if t.optimizer == "sgd":
                step = torch.full_like(p, lr, dtype=torch.float64)
            elif t.optimizer == "momentum":
                step = torch.full_like(p, lr / max(1.0 - t.momentum, 1e-12), dtype=torch.float64)
            else:
                v_hat = state[f"opt_{player}"]["v"][name].to(torch.float64) / (1.0 - t.betas[1] ** run.final_step)
                step = lr / (v_hat.sqrt() + t.eps)
            blocks.append(step.reshape(-1))
    return torch.cat(blocks), 1.0 / (run.final_step - run.window_start)


def _check_options(iterations: int, tol: float, damping: float | None, step: float | None,
                   batch_size: int | None, operator_size: int | None, solver: str) -> None:
    if iterations < 1:
        raise ConfigError(f"--aid-iterations must be at least 1, got {iterations}")
    if not (math.isfinite(tol) and tol > 0):
        raise ConfigError(f"--aid-tol must be a positive finite number, got {tol}")
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"--aid-damping must be a finite number >= 0, got {damping}")
    if step is not None and not (math.isfinite(step) and step > 0):
        raise ConfigError(f"--aid-step must be a positive finite number, got {step}")
    for name, value in (("--aid-batch-size", batch_size), ("--aid-operator-size", operator_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if batch_size is not None and solver != "neumann":
        raise ConfigError("--aid-batch-size (fresh minibatches) applies to --aid-solver neumann only")


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, **solver_options: Any) -> Scores:
    """AID influence on ``metric`` (validation split); ``solver_options`` as ``aid_influence``."""
    res = aid_influence(run, make_metric(metric, run, "valid"), seed=seed, progress=progress, **solver_options)
    return Scores.from_influence(
        metric, "aid", res.influence.cpu().numpy(),
        info={"metric_value": res.metric_value, "seconds": res.seconds, "solver": res.solver,
              "residual": res.residual, "iterations": res.iterations, "converged": res.converged,
              **res.options})

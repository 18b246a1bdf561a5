"""The adjoint of one training step by Hessian-vector products (forward-over-reverse), without the step's graph.

Each player's update is a function of its gradient and of elementwise state,

    theta_p' , opt_p' = update_p(grad_p L_p(theta), opt_p, theta_p)     (and the generator average after G),

so the adjoint of the step splits into cheap elementwise work and one Hessian-vector product per player:

1. the VJP of ``update_p`` (SGD, momentum, Adam with its moments and bias correction, the average: elementwise
   maps, differentiated as written, so any rule of that form is exact) turns the adjoint of the next state into
   ``a_p``, the adjoint of the gradient the optimizer consumed, plus the direct adjoints of opt_p and theta_p;
2. ``a_p^T d(grad_p L_p)/d(theta, w)`` is, by the symmetry of the Hessian of the scalar L_p, the product
   ``H_{L_p} [a_p; 0; 0]`` over (theta_D, theta_G, w): computed as ``jvp`` of ``grad`` along ``a_p`` on the
   player's own parameters. Its other blocks are the D <-> G cross terms, and for L_D its w block is the
   directional derivative of every real instance's loss term (R1 included) along a_D: the per-instance terms.

Alternating updates compose the two sub-steps: G's gradient is taken at the updated D, so G's product lands on
the adjoint of D' before D's optimizer is passed back. Weight decay and lazy R1/R2 are part of L_p (``loss_d`` /
``loss_g`` with the step's count), so the same product covers them. No graph outlives a call: the reverse pass
needs only each step's state and the gradients its forward computed (``Dynamics.step_with_gradients``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch.func import grad, jvp, vjp

from ..models.base import Params
from .dynamics import Dynamics, State, StepBatch


@functools.cache
def warm_forward_mode() -> None:
    """Pay forward mode's one-off start-up (a few tenths of a second per process: torch loads its forward-mode
    decompositions through ``torch.jit.script``, which warns that it is deprecated) once, silently."""
    x = torch.ones(2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        jvp(grad(lambda v: torch.sin(v).sum()), (x,), (x,))


def _add(*trees: Params) -> Params:
    """The sum of parameter trees with the same keys."""
    return {k: sum((tree[k] for tree in trees[1:]), trees[0][k]) for k in trees[0]}


def _pull_back(fn: Callable, primals: tuple, cotangents: tuple) -> tuple:
    """The VJP of ``fn`` at ``primals`` applied to ``cotangents`` (an elementwise map: cheap, graph dropped)."""
    _, pull = vjp(fn, *primals)
    return pull(cotangents)


def hvp_loss_d(dyn: Dynamics, pd: Params, pg: Params, batch: StepBatch, weights: torch.Tensor,
               a_d: Params) -> tuple[Params, Params, torch.Tensor]:
    """``H_{L_D} [a_d; 0; 0]`` in its (theta_D, theta_G, w) blocks, L_D the step's discriminator loss. theta_G
    enters L_D only through the samples G(z), whose Jacobian does not depend on theta_D: the theta_G block is G's
    plain VJP of the fakes' block, so no forward-mode derivative runs through G."""
    fake, pull_g = vjp(lambda params_g: dyn.models.generate(params_g, batch.z_d, batch.c_d), pg)

    def gradients(params_d: Params) -> tuple[Params, torch.Tensor, torch.Tensor]:
        return grad(dyn.loss_d_on_fakes, argnums=(0, 2, 3))(params_d, batch.x, fake, weights, batch.count,
                                                            batch.y, batch.c_d)
    on_d, on_fake, on_w = jvp(gradients, (pd,), (a_d,))[1]
    return on_d, pull_g(on_fake)[0], on_w


def hvp_loss_g(dyn: Dynamics, pg: Params, pd: Params, z: torch.Tensor, labels: torch.Tensor | None,
               a_g: Params) -> tuple[Params, Params]:
    """``H_{L_G} [0; a_g]`` in its (theta_G, theta_D) blocks, L_G the generator loss on ``z`` against D = ``pd``."""
    def gradients(params_g: Params) -> tuple[Params, Params]:
        return grad(dyn.loss_g, argnums=(0, 1))(params_g, pd, z, labels)
    return jvp(gradients, (pg,), (a_g,))[1]


def step_adjoint(dyn: Dynamics, state: State, batch: StepBatch, weights: torch.Tensor,
                 gradients: dict[str, Params], new_d: Params, u: State) -> tuple[State, torch.Tensor]:
    """(u^T d(state')/d(state), u^T d(state')/d(weights)) for the step from ``state`` on ``batch``: what the VJP of
    ``dyn.step`` returns. ``gradients``: the step's own ({"d", "g"}, from ``step_with_gradients``); ``new_d``: the
    discriminator after the step (where an alternating step takes G's gradient)."""
    warm_forward_mode()
    pd, pg, count = state["d"], state["g"], batch.count

    def update_g(grad_g: Params, opt_g: dict, params_g: Params, average: Params) -> tuple:
        moved, opt = dyn.opt_g.update(grad_g, opt_g, params_g, count)
        return moved, opt, dyn.averaged(average, moved)  # {} without an average

    a_g, u_opt_g, u_pg, u_average = _pull_back(update_g, (gradients["g"], state["opt_g"], pg, state.get("ema_g", {})),
                                                (u["g"], u["opt_g"], u.get("ema_g", {})))
    if dyn.update == "simultaneous":  # G's gradient at (theta_D, theta_G), latents shared with D's step
        g_on_g, g_on_d = hvp_loss_g(dyn, pg, pd, batch.z_d, batch.c_d, a_g)
        u_new_d, onto_d = u["d"], [g_on_d]
    else:  # at (theta_D', theta_G): its D block is part of the adjoint of D' before D's update
        g_on_g, g_on_new_d = hvp_loss_g(dyn, pg, new_d, batch.z_g, batch.c_g, a_g)
        u_new_d, onto_d = _add(u["d"], g_on_new_d), []
    a_d, u_opt_d, u_pd = _pull_back(lambda g, opt, p: dyn.opt_d.update(g, opt, p, count),
                                    (gradients["d"], state["opt_d"], pd), (u_new_d, u["opt_d"]))
    d_on_d, d_on_g, g_w = hvp_loss_d(dyn, pd, pg, batch, weights, a_d)
    previous: State = {"d": _add(u_pd, d_on_d, *onto_d), "g": _add(u_pg, d_on_g, g_on_g),
                       "opt_d": u_opt_d, "opt_g": u_opt_g}
    if "ema_g" in state:
        previous["ema_g"] = u_average
    return previous, g_w

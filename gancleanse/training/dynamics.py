"""The one pure training step shared by training, replay, counterfactuals and ITD.

``Dynamics.step(state, batch, weights)`` maps the full training state (both players' parameters, both
optimizer states and the optional generator average) to the next one. Instance weights enter only the
discriminator's real term with the fixed denominator B:

    L_D = (1/B) [ sum_i w_i l_real(D(x_i)) + sum_z l_fake(D(G(z))) ] + (lambda_D / 2) ||W_D||^2

so ``w_j = 0`` is exactly "x_j dropped from its minibatch", and d(state')/dw is what ITD needs. The R1
penalty on real instances, (gamma/2B) sum_i w_i ||grad_x D(x_i)||^2, carries the same weights (removing
an instance removes its penalty too); R2 is the same penalty on the generated samples. With lazy
regularization (``r1_every`` = k) both apply every k-th step, scaled by k, as in StyleGAN2. A
conditional GAN's instance is the pair (x_i, y_i): its label goes with it into D's real term and its R1
term, so the same weight removes both; generated samples carry their own recorded labels. Because the
step is a function of tensors only, ``torch.func.vjp`` of it yields in one call both the adjoint of the
previous state and every per-instance term of the batch.

Names: ``pd`` / ``pg`` are the discriminator's / generator's parameters (theta_D, theta_G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, grad_and_value, vjp

from ..config import Config
from ..data.base import as_float
from ..models.base import GANModules, Params
from .losses import d_fake_term, d_real_term, g_term
from .optim import Optimizer, make_optimizer

State = dict[str, dict]  # {"d", "g", "opt_d", "opt_g"[, "ema_g"]} -> tensor trees


@dataclass(frozen=True)
class StepBatch:
    """What one step consumes: real samples, latents for each player, and the step count;
    for a conditional GAN also the real samples' labels and those of each player's fakes."""

    x: torch.Tensor
    z_d: torch.Tensor
    z_g: torch.Tensor
    count: int  # optimizer steps taken before this one (Adam's bias correction)
    y: torch.Tensor | None = None
    c_d: torch.Tensor | None = None
    c_g: torch.Tensor | None = None


def gather_batch(stored: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor, step: int,
                 latents: tuple[torch.Tensor, torch.Tensor],
                 gen_labels: tuple[torch.Tensor | None, torch.Tensor | None],
                 device: torch.device, dtype: torch.dtype) -> StepBatch:
    """Step ``step``'s batch: minibatch ``idx`` of the stored training split (and labels), gathered and made
    floats on ``device``, with the step's latents and generated labels; training and every replay share it."""
    rows = idx.to(device)
    (z_d, z_g), (c_d, c_g) = latents, gen_labels
    return StepBatch(as_float(stored[rows], dtype), z_d.to(device, dtype), z_g.to(device, dtype), step,
                     None if labels is None else labels[rows],
                     None if c_d is None else c_d.to(device), None if c_g is None else c_g.to(device))


def l2_penalty(params: Params) -> torch.Tensor:
    """(1/2) sum of squared weights; vectors (biases, norm gains) are not decayed."""
    return sum((0.5 * (p * p).sum() for p in params.values() if p.ndim >= 2), 0.0)


@dataclass(frozen=True)
class Dynamics:
    """Everything that defines a training step besides the data: losses, optimizers, scheme."""

    models: GANModules
    loss: str
    update: str  # "simultaneous" | "alternating"
    opt_d: Optimizer
    opt_g: Optimizer
    weight_decay_d: float = 0.0
    weight_decay_g: float = 0.0
    ema_beta: float = 0.0
    r1_gamma: float = 0.0
    r2_gamma: float = 0.0
    r1_every: int = 1

    @classmethod
    def from_config(cls, cfg: Config, models: GANModules) -> "Dynamics":
        """The dynamics ``[train]`` describes, for ``models``."""
        train = cfg.train
        return cls(models, train.loss, train.update, make_optimizer(train, train.lr_d),
                   make_optimizer(train, train.lr_g), train.weight_decay_d, train.weight_decay_g, train.ema_beta,
                   train.r1_gamma, train.r2_gamma, train.r1_every)

    # ----------------------------------------------------------------- losses
    def loss_d(self, pd: Params, pg: Params, x: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
               count: int | None = None, y: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        """Discriminator loss with per-instance real weights and the fixed denominator. ``count``: the
        step, for lazy penalties; None applies them at their average strength (the stationary game that
        AID solves). ``y`` / ``c``: labels of the reals / fakes (conditional GANs)."""
        return self.loss_d_on_fakes(pd, x, self.models.generate(pg, z, c), w, count, y, c)

    def loss_d_on_fakes(self, pd: Params, x: torch.Tensor, fake: torch.Tensor, w: torch.Tensor, count: int | None,
                        y: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
        """``loss_d`` with the generated samples given as values."""
        real = d_real_term(self.loss, self.models.discriminate(pd, x, y))
        value = ((w * real).sum() + d_fake_term(self.loss, self.models.discriminate(pd, fake, c)).sum()) / x.shape[0]
        if self.weight_decay_d:
            value = value + self.weight_decay_d * l2_penalty(pd)
        return value + self.gradient_penalties(pd, x, fake, w, count, y, c)

    def gradient_penalties(self, pd: Params, x: torch.Tensor, fake: torch.Tensor, w: torch.Tensor, count: int | None,
                           y: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor | float:
        """R1 on the real batch (weighted per instance) and R2 on the generated one, both over B."""
        total: torch.Tensor | float = 0.0
        lazy = 1.0 if count is None else (float(self.r1_every) if count % self.r1_every == 0 else 0.0)
        if self.r1_gamma and lazy:
            total = total + 0.5 * self.r1_gamma * lazy * (w * self.input_gradient_norms(pd, x, y)).sum() / x.shape[0]
        if self.r2_gamma and lazy:
            total = total + 0.5 * self.r2_gamma * lazy * self.input_gradient_norms(pd, fake, c).sum() / x.shape[0]
        return total

    def input_gradient_norms(self, pd: Params, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """||grad_x D(x_i)||^2 per sample: one gradient of the summed logits, since each logit
        depends on its own sample only (no batch statistics in D)."""
        input_grads = grad(lambda inputs: self.models.discriminate(pd, inputs, labels).sum())(x)
        return input_grads.pow(2).reshape(x.shape[0], -1).sum(1)

    def loss_g(self, pg: Params, pd: Params, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Generator loss on G(z) (labels ``c`` for a conditional GAN), plus its weight decay."""
        value = g_term(self.loss, self.models.discriminate(pd, self.models.generate(pg, z, c), c)).mean()
        if self.weight_decay_g:
            value = value + self.weight_decay_g * l2_penalty(pg)
        return value

    def simultaneous_gradients(self, pd: Params, pg: Params, batch: StepBatch, w: torch.Tensor
                               ) -> tuple[tuple[Params, torch.Tensor], tuple[Params, torch.Tensor]]:
        """(dL_D/dtheta_D, L_D), (dL_G/dtheta_G, L_G) at the same point, with G(z) computed once (the
        players share their latents here): bitwise the values of ``loss_d`` and ``loss_g`` apart (CPU,
        tested). G's backward needs only D's input gradient on the fakes, so it gets a backward of its own
        through D's fake branch: one more forward of D on the fakes, but no weight gradients and no real
        branch in that pass (a joint backward of both losses would compute both twice)."""
        fake, pull_g = vjp(lambda params_g: self.models.generate(params_g, batch.z_d, batch.c_d), pg)
        grad_d, value_d = grad_and_value(self.loss_d_on_fakes)(pd, batch.x, fake, w, batch.count, batch.y, batch.c_d)
        grad_fake, value_g = grad_and_value(
            lambda fakes: g_term(self.loss, self.models.discriminate(pd, fakes, batch.c_d)).mean())(fake)
        (grad_g,) = pull_g(grad_fake)
        if self.weight_decay_g:
            decay_grad, decay_value = grad_and_value(l2_penalty)(pg)
            grad_g = {k: grad_g[k] + self.weight_decay_g * decay_grad[k] for k in grad_g}
            value_g = value_g + self.weight_decay_g * decay_value
        return (grad_d, value_d), (grad_g, value_g)

    # ------------------------------------------------------------------ state
    def init_state(self, params_d: Params, params_g: Params) -> State:
        """The state before step 0: fresh optimizer states, and the average starting at G."""
        state: State = {"d": params_d, "g": params_g,
                        "opt_d": self.opt_d.init(params_d), "opt_g": self.opt_g.init(params_g)}
        if self.ema_beta > 0:
            state["ema_g"] = {k: v.clone() for k, v in params_g.items()}
        return state

    def eval_generator(self, state: State) -> Params:
        """The generator that metrics see: the running average when enabled."""
        return state["ema_g"] if "ema_g" in state else state["g"]

    # ------------------------------------------------------------------- step
    def step(self, state: State, batch: StepBatch, weights: torch.Tensor
             ) -> tuple[State, dict[str, torch.Tensor]]:
        """One training step; returns the next state and the two losses (before the step)."""
        new, losses, _ = self.step_with_gradients(state, batch, weights)
        return new, losses

    def step_with_gradients(self, state: State, batch: StepBatch, weights: torch.Tensor
                            ) -> tuple[State, dict[str, torch.Tensor], dict[str, Params]]:
        """``step``, also returning the gradients each player's optimizer consumed ({"d", "g"}): the point
        at which the Hessian-vector-product adjoint (``training/adjoint.py``) linearizes the optimizers."""
        pd, pg = state["d"], state["g"]
        if self.update == "simultaneous":  # both gradients at theta_t, from one forward
            (grad_d, loss_d), (grad_g, loss_g) = self.simultaneous_gradients(pd, pg, batch, weights)
            new_d, new_opt_d = self.opt_d.update(grad_d, state["opt_d"], pd, batch.count)
        else:  # G's gradient against the updated D
            grad_d, loss_d = grad_and_value(self.loss_d)(pd, pg, batch.x, batch.z_d, weights, batch.count,
                                                         batch.y, batch.c_d)
            new_d, new_opt_d = self.opt_d.update(grad_d, state["opt_d"], pd, batch.count)
            grad_g, loss_g = grad_and_value(self.loss_g)(pg, new_d, batch.z_g, batch.c_g)
        new_g, new_opt_g = self.opt_g.update(grad_g, state["opt_g"], pg, batch.count)
        new: State = {"d": new_d, "g": new_g, "opt_d": new_opt_d, "opt_g": new_opt_g}
        if "ema_g" in state:
            new["ema_g"] = self.averaged(state["ema_g"], new_g)
        return new, {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}, {"d": grad_d, "g": grad_g}

    def averaged(self, average: Params, new_g: Params) -> Params:
        """The generator average after a step that moved G to ``new_g``."""
        beta = self.ema_beta
        return {k: beta * value + (1.0 - beta) * new_g[k] for k, value in average.items()}

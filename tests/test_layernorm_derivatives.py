"""LayerNorm's derivatives of every order, where gradient penalties make ITD and AID differentiate D three times.

``F.layer_norm``'s third derivative is wrong (torch 2.13: its statistics are constants to the double backward's
own derivative), so a discriminator trained with R1/R2 normalizes through ``models.layer_norm`` wherever its input
and its parameters both carry gradients. References: gradgradcheck (finite differences of the derivatives),
central differences of real retrains for ITD, central differences of the game's gradient for AID's Jacobian
products, and ``F.layer_norm`` itself for values and the first two derivatives, which must stay bit for bit the
same (runs recorded before replay bitwise).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradgradcheck
from torch.func import functional_call, grad, jvp, vjp, vmap

import gancleanse as gc
import gancleanse.models.dcgan as dcgan
from gancleanse.config import Config
from gancleanse.influence.aid import GameOperator, flatten, game_gradient, unflatten
from gancleanse.influence.itd import itd_influence
from gancleanse.metrics import make_metric
from gancleanse.models import build_models
from gancleanse.models.dcgan import ChannelLayerNorm
from gancleanse.models.layer_norm import LayerNorm, layer_norm, layer_norm_twice
from gancleanse.state_files import flatten_state
from gancleanse.training.replay import replay
from gancleanse.training.retrain import retrain_many

Params = dict[str, torch.Tensor]
DCGAN = {"arch": "dcgan", "z_dim": 3, "g_hidden": 4, "d_hidden": 4, "activation": "softplus", "norm": "layer",
         "bias": True, "dtype": "float64"}
MLP = {"arch": "mlp", "z_dim": 3, "g_hidden": 6, "d_hidden": 6, "activation": "softplus", "norm": "layer",
       "bias": True, "dtype": "float64"}
ADAM = {"optimizer": "adam", "lr_d": 0.01, "lr_g": 0.01}
PENALTIES = {
    "r1": {"r1_gamma": 0.5, **ADAM},
    "r2": {"r2_gamma": 0.5, "update": "alternating"},
    "lazy-r1": {"r1_gamma": 1.0, "r1_every": 2, "update": "alternating", **ADAM},
}


def config(model: dict[str, Any], **train: Any) -> Config:
    """A tiny run: 8x8 digits for the DCGAN, the 2D mixture for the MLP; one recorded epoch of three steps."""
    data = {"name": "digits"} if model["arch"] == "dcgan" else {}
    return Config.from_dict({
        "data": {**data, "n_train": 60, "n_valid": 40, "n_test": 40, "seed": 4},
        "model": model,
        "train": {"epochs": 2, "batch_size": 20, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 1, "seed": 3,
                  "checkpoint_every": 2, **train},
        "metric": {"n_samples": 40},
    })


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (signed zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def check_third_and_fourth_derivatives(function: Callable[[torch.Tensor, Params], torch.Tensor], x: torch.Tensor,
                                       params: Params, fourth: bool = True) -> None:
    """gradgradcheck, reverse mode and forward over reverse, of the input gradient of ``function(x, params)`` (its
    third derivative) and of the gradient of a penalty on that input gradient (its fourth), with respect to the
    input and the parameters; in fast mode (along random directions, seeded here)."""
    def input_gradient(inputs: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        out = function(inputs, dict(zip(params, values)))
        return torch.autograd.grad((out.sin() * out).sum(), inputs, create_graph=True)[0]

    def penalty_gradient(inputs: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(input_gradient(inputs, *values).pow(2).sum(), (inputs, *values), create_graph=True)

    inputs = (x.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params.values()))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for derivative in (input_gradient, penalty_gradient) if fourth else (input_gradient,):
            assert gradgradcheck(derivative, inputs, check_fwd_over_rev=True, fast_mode=True)


def random_params(module: nn.Module, gen: torch.Generator) -> Params:
    """Parameters of ``module`` drawn around 1 in float64 (gains far from their init, so nothing cancels)."""
    return {name: torch.randn(value.shape, generator=gen, dtype=torch.float64) + 1
            for name, value in module.named_parameters()}


# ------------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("with_bias", [True, False])
def test_third_and_fourth_derivatives_of_the_exact_layer_norms(with_bias):
    """ChannelLayerNorm's exact path and ``layer_norm`` on a plain last dimension, with and without bias; fails with
    ``F.layer_norm`` (its third derivative misses the statistics' dependence on the input)."""
    gen = torch.Generator().manual_seed(0)
    channel, plain = ChannelLayerNorm(4, bias=with_bias).double(), nn.LayerNorm(6, bias=with_bias).double()
    check_third_and_fourth_derivatives(lambda x, p: functional_call(channel, p, (x,), {"exact": True}),
                                       torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64),
                                       random_params(channel, gen))

    def plain_exact(x: torch.Tensor, p: Params) -> torch.Tensor:
        return layer_norm(x, [6], p["weight"], p.get("bias"), plain.eps)

    check_third_and_fourth_derivatives(plain_exact, torch.randn(3, 6, generator=gen, dtype=torch.float64),
                                       random_params(plain, gen))


@pytest.mark.parametrize("model", [DCGAN, MLP], ids=["dcgan", "mlp"])
def test_third_derivatives_of_a_penalised_discriminator(model):
    """The discriminator that build_models gives a run with R1, differentiated three times with respect to its input
    and its LayerNorms' parameters (the others held): what ITD and AID take of it."""
    shape = (1, 8, 8) if model is DCGAN else (2,)
    discriminator = build_models(config(model, r1_gamma=1.0), shape).discriminator.double()
    gen = torch.Generator().manual_seed(3)
    fixed = {name: value.detach().double() for name, value in discriminator.named_parameters()}
    norms = [name for name, sub in discriminator.named_modules() if isinstance(sub, (ChannelLayerNorm, nn.LayerNorm))]
    drawn = random_params(discriminator, gen)
    varied = {name: drawn[name] for name in fixed if name.rpartition(".")[0] in norms}
    assert len(varied) == 2 * len(norms) > 0

    def logits(x: torch.Tensor, p: Params) -> torch.Tensor:
        return functional_call(discriminator, {**fixed, **p}, (x,))

    check_third_and_fourth_derivatives(logits, torch.randn(2, *shape, generator=gen, dtype=torch.float64), varied,
                                       fourth=False)


def test_values_and_two_derivatives_are_f_layer_norms_bitwise():
    """Output, first and second derivatives (reverse mode, torch.func and vmap) are ``F.layer_norm``'s bit for bit,
    in both precisions, with and without bias: what keeps training and replays of earlier runs bitwise."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        x, cot, probe = (torch.randn(5, 4, 3, 3, generator=gen).to(dtype) for _ in range(3))
        weight, bias = (torch.randn(4, 3, 3, generator=gen).to(dtype) for _ in range(2))
        for b in (bias, None):
            def norms(fn):
                def penalty(w: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
                    input_grad = grad(lambda v: (fn(v, [4, 3, 3], w, b, 1e-5) * cot).sum())(inputs)
                    return (input_grad * probe).sum()
                first = grad(lambda v, w: (fn(v, [4, 3, 3], w, b, 1e-5) * cot).sum(), argnums=(0, 1))(x, weight)
                second = grad(penalty, argnums=(0, 1))(weight, x)
                batched = vmap(grad(penalty), in_dims=(None, 0))(weight, x[:, None])
                return [fn(x, [4, 3, 3], weight, b, 1e-5), *first, *second, batched]
            for got, want in zip(norms(layer_norm), norms(F.layer_norm)):
                assert bitwise_equal(got, want)



def layer_norm_derivatives(fn: Callable, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           probe: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Value, gradient and the gradient's VJP and JVP along ``probe`` (reverse over reverse and forward over reverse),
    and the vmapped gradient, of a scalar that holds ``fn``'s layer normalization of x, with respect to x and the
    affine parameters present: the derivatives ITD's two ways and batched retrains take of a network."""
    affine = tuple(t for t in (weight, bias) if t is not None)
    cot = torch.linspace(-1, 2, x.numel(), dtype=x.dtype).reshape(x.shape)

    def scalar(inputs: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        w, b = (params + (None, None))[:2] if weight is not None else (None, params[0] if params else None)
        return (torch.sigmoid(fn(inputs, list(x.shape[1:]), w, b, 1e-5)) * cot).sum()

    gradient = grad(scalar, argnums=tuple(range(1 + len(affine))))
    return [scalar(x, *affine), *gradient(x, *affine), *vjp(gradient, x, *affine)[1](probe),
            *jvp(gradient, (x, *affine), probe)[1], *vmap(gradient, in_dims=(0, *(None,) * len(affine)))(
                x.unsqueeze(1), *affine)]


@pytest.mark.parametrize("affine", ["weight and bias", "weight", "none"])
def test_layer_norm_twice_is_f_layer_norm_to_the_second_derivative(affine):
    """``layer_norm_twice`` (every built-in LayerNorm outside the exact path): value and first derivative bit for bit
    ``F.layer_norm``'s in float32 and float64 (training and replays unchanged); its closed-form second derivative,
    in reverse and forward mode and under vmap, equal to ``F.layer_norm``'s to 1e-12 in float64. Fails on a wrong
    term of the closed form (the statistics' derivative, the weight's, the bias's)."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 3, 5, 2, generator=gen).to(dtype)
        weight = torch.randn(3, 5, 2, generator=gen).to(dtype) + 1 if affine != "none" else None
        bias = torch.randn(3, 5, 2, generator=gen).to(dtype) if affine == "weight and bias" else None
        present = [t for t in (x, weight, bias) if t is not None]
        probe = tuple(torch.randn(t.shape, generator=gen).to(dtype) for t in present)
        got = layer_norm_derivatives(layer_norm_twice, x, weight, bias, probe)
        want = layer_norm_derivatives(F.layer_norm, x, weight, bias, probe)
        first = 1 + len(present)  # the value and the gradient
        assert all(bitwise_equal(g, w) for g, w in zip(got[:first], want[:first]))
        assert all(bitwise_equal(g, w) for g, w in zip(got[-len(present):], want[-len(present):]))  # vmapped
        if dtype == torch.float64:
            for g, w in zip(got[first:-len(present)], want[first:-len(present)]):
                assert (g - w).abs().max() <= 1e-12 * w.abs().max()


def test_built_in_layer_norms_go_through_layer_norm_twice_in_itd_and_aid_alone(tmp_path, monkeypatch):
    """Every LayerNorm of the built-in networks outside the exact path (the MLP's and the DCGAN's, G and D) calls
    ``layer_norm_twice`` while ITD (both ways) and AID differentiate a step, and ``F.layer_norm`` in training (the
    custom function's dispatch would slow every training step)."""
    import gancleanse.models.layer_norm as module
    calls: list[int] = []
    monkeypatch.setattr(module, "layer_norm_twice", lambda *a: calls.append(1) or layer_norm_twice(*a))
    for model, shape in ((DCGAN, (1, 8, 8)), (MLP, (2,))):
        models = build_models(config(model), shape)
        networks = (models.generator.double(), models.discriminator.double())
        norms = [m for net in networks for m in net.modules() if isinstance(m, (ChannelLayerNorm, nn.LayerNorm))]
        assert all(isinstance(m, (ChannelLayerNorm, LayerNorm)) for m in norms) and norms
        for twice in (False, True):
            calls.clear()
            with module.second_derivatives() if twice else nullcontext():
                networks[1](networks[0](torch.randn(3, 3, dtype=torch.float64)))
            assert len(calls) == (len(norms) if twice else 0)
    run = gc.train(config(DCGAN), tmp_path / "run", progress=False)
    assert calls == [] or calls.clear() is None
    for reverse in ("vjp", "hvp"):
        itd_influence(run, make_metric("fid", run), progress=False, reverse=reverse)
        assert len(calls) > 0
        calls.clear()
    gc.influence(run, metric="fid", method="aid", progress=False)
    assert len(calls) > 0

# ------------------------------------------------------------------------------- runs and ITD
@pytest.mark.parametrize("penalty", ["none", "r1", "r2"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_and_retrains_are_those_of_f_layer_norm(tmp_path, penalty, dtype):
    """A run trained now replays bit for bit with every LayerNorm through ``F.layer_norm`` (how earlier runs
    trained), from step 0, plainly and in vmapped retrains; only a penalised D ever normalizes differently."""
    train = {"record_from_epoch": 0, **PENALTIES.get(penalty, {})}
    run = gc.train(config({**DCGAN, "dtype": dtype}, **train), tmp_path / "run", progress=False)
    assert run.models.discriminator.third_derivatives == (penalty != "none")
    weights = torch.ones(2, run.n_train, dtype=run.dtype)
    weights[0, [3, 17]] = 0.0
    batched_now = retrain_many(run, weights, 0, vmap_steps=True)
    run.models.discriminator.third_derivatives = False  # F.layer_norm everywhere, as before
    recorded, before = flatten_state(run.final_state()), flatten_state(replay(run, 0))
    batched_before = retrain_many(run, weights, 0, vmap_steps=True)
    assert recorded.keys() == before.keys() and all(bitwise_equal(before[k], recorded[k]) for k in recorded)
    for now, earlier in zip(batched_now, batched_before):
        now, earlier = flatten_state(now), flatten_state(earlier)
        assert all(bitwise_equal(now[k], earlier[k]) for k in earlier)


def test_training_takes_the_exact_path_only_in_the_penalty(tmp_path, monkeypatch):
    """Where the input and the parameters both carry gradients: in a training step, the penalty's evaluation of D
    (each of its 4 LayerNorms once), never the losses' evaluations nor G's; a lazy step without the penalty, none.
    That bounds the cost of exactness in training."""
    run = gc.train(config(DCGAN, **PENALTIES["lazy-r1"]), tmp_path / "run", progress=False)
    calls = []
    monkeypatch.setattr(dcgan, "layer_norm", lambda *args: calls.append(1) or layer_norm(*args))
    state, ones = run.load_state(run.window_start), torch.ones(run.cfg.train.batch_size, dtype=run.dtype)
    for step in range(run.window_start, run.final_step):
        calls.clear()
        state = run.dynamics.step(state, run.batch(step), ones)[0]
        assert len(calls) == (4 if step % 2 == 0 else 0), step


def central_differences(run: gc.Run, metric, eps: float = 1e-4) -> torch.Tensor:
    """-dV/dw_j for every instance by central differences of real retrains of the window, all of them as one vmapped
    batch of counterfactual retrains (eps 1e-4: truncation, O(eps^2), and rounding, O(1e-16 / eps), both about 1e-8
    of the largest influence on these runs)."""
    n = run.n_train
    weights = torch.ones(2 * n, n, dtype=run.dtype)
    weights[torch.arange(n), torch.arange(n)] += eps
    weights[n + torch.arange(n), torch.arange(n)] -= eps
    retrains = retrain_many(run, weights, run.window_start, vmap_steps=True)
    values = torch.tensor([metric.value(state) for state in retrains], dtype=torch.float64)
    return -(values[:n] - values[n:]) / (2 * eps)


@pytest.mark.parametrize("reverse", ["vjp", "hvp"])
@pytest.mark.parametrize("case", ["dcgan-r1", "dcgan-r2", "dcgan-lazy-r1", "mlp-r1"])
def test_itd_under_gradient_penalties_matches_finite_differences_of_retraining(tmp_path, case, reverse):
    """With ``F.layer_norm`` these were off by 1.3e-3 (the MLP) to 8.1e-2 (lazy R1) of the largest influence, and
    the hvp way sent every penalised step back to the VJP. Now both ways agree with retraining to 1e-6 (measured:
    2e-8 or less), every step by its own way."""
    arch, _, penalty = case.partition("-")
    run = gc.train(config(DCGAN if arch == "dcgan" else MLP, **PENALTIES[penalty]), tmp_path / "run",
                   progress=False)
    metric = make_metric("all", run)
    result = itd_influence(run, metric, progress=False, reverse=reverse)
    expected = central_differences(run, metric)
    scale = float(expected.abs().max())
    assert scale > 0 and float((result.influence - expected).abs().max()) < 1e-6 * scale
    if reverse == "hvp":
        assert result.reverse == {"reverse": "hvp", "vjp_fallback_steps": 0}


def test_aid_jacobian_products_under_r1_match_finite_differences(tmp_path):
    """J u (forward over reverse over reverse) and v^T J (reverse over reverse over reverse) of the game's gradient
    F, on a DCGAN with LayerNorm and R1, against central differences of F along u: off by 0.4 with F.layer_norm."""
    run = gc.train(config(DCGAN, **PENALTIES["r1"]), tmp_path / "run", progress=False)
    state = run.final_state()
    params = {"d": state["d"], "g": state["g"]}
    gen = torch.Generator().manual_seed(2)
    x = run.x_train[:30].to(torch.float64)
    z = torch.randn(30, run.cfg.model.z_dim, generator=gen, dtype=torch.float64)
    theta = flatten(params)
    u, v = (torch.randn(theta.shape, generator=gen, dtype=torch.float64) for _ in range(2))

    def game(point: torch.Tensor) -> torch.Tensor:
        return flatten(game_gradient(run.dynamics, unflatten(point, params), x, z))

    h = 1e-5  # truncation O(h^2) about 1e-6 relative here, rounding O(1e-16 / h) far below
    expected = (game(theta + h * u) - game(theta - h * u)) / (2 * h)
    operator = GameOperator(run.dynamics, params, x, z)
    assert float((operator.matvec(u) - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert abs(float(operator.rmatvec(v) @ u - v @ expected)) < 1e-4 * abs(float(v @ expected))

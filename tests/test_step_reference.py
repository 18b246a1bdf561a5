"""The pure step against an independent, plain PyTorch implementation (nn.Module + torch.optim)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gancleanse.config import Config
from gancleanse.models import build_models
from gancleanse.training.dynamics import Dynamics, StepBatch


def _reference_steps(models, params_d, params_g, batches, update, optimizer, lr, weights, wd):
    """Train copies of the modules with torch.optim and the textbook non-saturating losses."""
    G, D = copy.deepcopy(models.generator).double(), copy.deepcopy(models.discriminator).double()
    with torch.no_grad():
        for n, p in D.named_parameters():
            p.copy_(params_d[n])
        for n, p in G.named_parameters():
            p.copy_(params_g[n])
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=lr),
            "momentum": lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9),
            "adam": lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.5, 0.999), eps=1e-8)}[optimizer]
    opt_d, opt_g = make(D.parameters()), make(G.parameters())
    for x, z, w in zip(batches["x"], batches["z"], weights):
        B = x.shape[0]

        def d_loss():
            real = D(x).reshape(-1)
            fake = D(G(z)).reshape(-1)
            reg = sum(0.5 * (p * p).sum() for p in D.parameters() if p.ndim >= 2)
            return ((w * F.softplus(-real)).sum() + F.softplus(fake).sum()) / B + wd * reg

        def g_loss():
            return F.softplus(-D(G(z)).reshape(-1)).mean()

        if update == "simultaneous":
            opt_d.zero_grad(), opt_g.zero_grad()
            gd = torch.autograd.grad(d_loss(), list(D.parameters()))
            gg = torch.autograd.grad(g_loss(), list(G.parameters()))
            for p, g in zip(D.parameters(), gd):
                p.grad = g
            for p, g in zip(G.parameters(), gg):
                p.grad = g
            opt_d.step(), opt_g.step()
        else:
            opt_d.zero_grad()
            d_loss().backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss().backward()
            opt_g.step()
    return dict(D.named_parameters()), dict(G.named_parameters())


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_step_matches_torch_optim(update, optimizer):
    cfg = Config.from_dict({"model": {"activation": "elu", "z_dim": 4, "g_hidden": 6, "d_hidden": 7, "bias": True},
                            "train": {"update": update, "optimizer": optimizer, "lr_d": 0.05, "lr_g": 0.05,
                                      "weight_decay_d": 0.01}})
    models = build_models(cfg, (2,))
    dyn = Dynamics.from_config(cfg, models)
    pd, pg = models.initial_params(0, torch.float64)
    gen = torch.Generator().manual_seed(0)
    batches = {"x": [torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(5)],
               "z": [torch.randn(8, 4, generator=gen, dtype=torch.float64) for _ in range(5)]}
    weights = [torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.float64)] * 5
    # torch.optim.SGD adds weight decay to every parameter; ours decays only weights (ndim >= 2),
    # so the reference decays through its loss exactly as ours does.
    state = dyn.init_state(pd, pg)
    for t, (x, z, w) in enumerate(zip(batches["x"], batches["z"], weights)):
        state, _ = dyn.step(state, StepBatch(x, z, z, t), w)
    ref_d, ref_g = _reference_steps(models, pd, pg, batches, update, optimizer, 0.05, weights, 0.01)
    for n, p in ref_d.items():
        torch.testing.assert_close(state["d"][n], p.detach(), rtol=1e-10, atol=1e-12)
    for n, p in ref_g.items():
        torch.testing.assert_close(state["g"][n], p.detach(), rtol=1e-10, atol=1e-12)


def test_zero_weight_is_dropping_the_instance_with_fixed_denominator():
    cfg = Config.from_dict({"model": {"activation": "softplus", "z_dim": 3}})
    models = build_models(cfg, (2,))
    dyn = Dynamics.from_config(cfg, models)
    pd, pg = models.initial_params(1, torch.float64)
    x = torch.randn(6, 2, dtype=torch.float64)
    z = torch.randn(6, 3, dtype=torch.float64)
    w = torch.ones(6, dtype=torch.float64)
    w[2] = 0
    keep = [0, 1, 3, 4, 5]
    real = F.softplus(-models.discriminate(pd, x[keep])).sum()
    fake = F.softplus(models.discriminate(pd, models.generate(pg, z))).sum()
    torch.testing.assert_close(dyn.loss_d(pd, pg, x, z, w), (real + fake) / 6, rtol=1e-14, atol=0)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("loss,penalty", [("modified_minmax", {}), ("hinge", {}),
                                          ("modified_minmax", {"r1_gamma": 1.0, "r2_gamma": 0.5})])
def test_shared_forward_gradients_equal_separate_ones_bitwise(arch, loss, penalty):
    """The simultaneous step's one-forward gradients are the two losses' own gradients, bit for
    bit, so runs recorded with either implementation replay identically."""
    from torch.func import grad_and_value

    model = {"mlp": {"activation": "relu", "z_dim": 3, "g_hidden": 6, "d_hidden": 7},
             "dcgan": {"arch": "dcgan", "z_dim": 8, "g_hidden": 4, "d_hidden": 4, "norm": "layer",
                       "activation": "sigmoid", "dtype": "float32"}}[arch]
    cfg = Config.from_dict({"model": model, "train": {"loss": loss, "weight_decay_d": 0.01, "weight_decay_g": 0.02,
                                                      **penalty}})
    shape = (2,) if arch == "mlp" else (1, 28, 28)
    models = build_models(cfg, shape)
    dyn = Dynamics.from_config(cfg, models)
    dtype = torch.float64 if arch == "mlp" else torch.float32
    pd, pg = models.initial_params(0, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, *shape, generator=gen).to(dtype)
    z = torch.randn(6, cfg.model.z_dim, generator=gen).to(dtype)
    w = torch.rand(6, generator=gen).to(dtype)
    (gd, ld), (gg, lg) = dyn.simultaneous_gradients(pd, pg, StepBatch(x, z, z, 0), w)
    ref_gd, ref_ld = grad_and_value(dyn.loss_d)(pd, pg, x, z, w, 0)
    ref_gg, ref_lg = grad_and_value(dyn.loss_g)(pg, pd, z)
    assert torch.equal(ld, ref_ld) and torch.equal(lg, ref_lg)
    for got, ref in ((gd, ref_gd), (gg, ref_gg)):
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
def test_gradient_penalties_match_plain_autograd(update):
    """R1 (weighted per real instance), R2 and lazy regularization against a textbook
    double-backward implementation on nn.Modules."""
    gamma1, gamma2, every, lr, B = 2.0, 0.5, 2, 0.05, 8
    cfg = Config.from_dict({"model": {"activation": "softplus", "z_dim": 4, "g_hidden": 6, "d_hidden": 7, "bias": True},
                            "train": {"update": update, "lr_d": lr, "lr_g": lr, "r1_gamma": gamma1,
                                      "r2_gamma": gamma2, "r1_every": every}})
    models = build_models(cfg, (2,))
    dyn = Dynamics.from_config(cfg, models)
    pd, pg = models.initial_params(2, torch.float64)
    gen = torch.Generator().manual_seed(5)
    steps = [(torch.randn(B, 2, generator=gen, dtype=torch.float64), torch.randn(B, 4, generator=gen, dtype=torch.float64),
              torch.rand(B, generator=gen, dtype=torch.float64)) for _ in range(4)]
    state = dyn.init_state(pd, pg)
    for t, (x, z, w) in enumerate(steps):
        state, _ = dyn.step(state, StepBatch(x, z, z, t), w)

    G, D = copy.deepcopy(models.generator).double(), copy.deepcopy(models.discriminator).double()
    with torch.no_grad():
        for n, p in D.named_parameters():
            p.copy_(pd[n])
        for n, p in G.named_parameters():
            p.copy_(pg[n])

    def penalty(inputs, weights):
        inputs = inputs.detach().requires_grad_()
        (g,) = torch.autograd.grad(D(inputs).sum(), inputs, create_graph=True)
        return (weights * g.pow(2).sum(1)).sum() / B

    def d_loss(x, z, w, t):
        fake = G(z).detach()
        value = ((w * F.softplus(-D(x).reshape(-1))).sum() + F.softplus(D(fake).reshape(-1)).sum()) / B
        if t % every == 0:
            value = value + 0.5 * gamma1 * every * penalty(x, w) + 0.5 * gamma2 * every * penalty(fake, torch.ones(B))
        return value

    for t, (x, z, w) in enumerate(steps):
        gd = torch.autograd.grad(d_loss(x, z, w, t), list(D.parameters()))
        if update == "alternating":
            with torch.no_grad():
                for p, g in zip(D.parameters(), gd):
                    p -= lr * g
        gg = torch.autograd.grad(F.softplus(-D(G(z)).reshape(-1)).mean(), list(G.parameters()))
        with torch.no_grad():
            if update == "simultaneous":
                for p, g in zip(D.parameters(), gd):
                    p -= lr * g
            for p, g in zip(G.parameters(), gg):
                p -= lr * g
    for n, p in D.named_parameters():
        torch.testing.assert_close(state["d"][n], p.detach(), rtol=1e-10, atol=1e-12)
    for n, p in G.named_parameters():
        torch.testing.assert_close(state["g"][n], p.detach(), rtol=1e-10, atol=1e-12)

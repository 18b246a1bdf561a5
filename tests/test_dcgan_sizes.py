"""The DCGAN at 32x32 and 64x64: side sequences, mirrored generator, shapes, independence, one step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gancleanse.config import Config
from gancleanse.models import build_models
from gancleanse.models.dcgan import SPECS, DCGANDiscriminator, DCGANGenerator, conv_sizes
from gancleanse.training.dynamics import Dynamics, StepBatch

D_SIDES = {32: [32, 30, 14, 6, 2, 1], 64: [64, 62, 30, 14, 6, 2, 1]}
SHAPES = [(c, s, s) for s in (32, 64) for c in (1, 3)]


def _cfg(**model):
    m = {"arch": "dcgan", "z_dim": 5, "g_hidden": 4, "d_hidden": 4, "activation": "softplus", "norm": "layer"}
    m.update(model)
    return Config.from_dict({"model": m})


def _generator_sides(g: DCGANGenerator, z_dim: int) -> list[int]:
    sides = []
    h = torch.randn(2, z_dim, 1, 1)
    for layer in g.net:
        h = layer(h)
        if isinstance(layer, nn.ConvTranspose2d):
            sides.append(h.shape[-1])
    return sides


def test_existing_specs_are_untouched():
    assert SPECS[28] == ((4, 3, 3, 2, 3, 3, 2), (1, 2, 1, 1, 2, 1, 1))
    assert SPECS[8] == ((3, 3, 3, 2), (1, 1, 1, 1))
    assert conv_sizes(28, *SPECS[28]) == [28, 25, 12, 10, 9, 4, 2, 1]
    assert conv_sizes(8, *SPECS[8]) == [8, 6, 4, 2, 1]
    # the paper's 28x28 parameter names and shapes (d_hidden=4, g_hidden=3, z_dim=5, C=1)
    d = dict(DCGANDiscriminator((1, 28, 28), hidden=4, norm="layer").named_parameters())
    convs = [f"features.{3 * i}.weight" for i in range(7)]
    assert [k for k in d if k.endswith("weight") and d[k].ndim == 4] == convs
    assert [tuple(d[k].shape[2:]) for k in convs] == [(k, k) for k in SPECS[28][0]]
    assert d["head.weight"].shape == (1, 4)
    g = dict(DCGANGenerator(5, (1, 28, 28), hidden=3, norm="layer").named_parameters())
    assert g["net.0.weight"].shape == (5, 3, 2, 2) and g["net.21.weight"].shape == (1, 3, 1, 1)


@pytest.mark.parametrize("side", [8, 28, 32, 64])
def test_every_spec_ends_at_one_and_inverts_exactly(side):
    kernels, strides = SPECS[side]
    sizes = conv_sizes(side, kernels, strides)
    assert sizes[-1] == 1 and all(n >= 1 for n in sizes)
    for n, k, s in zip(sizes, kernels, strides):
        assert (n - k) % s == 0, (side, n, k, s)  # floor division loses nothing


@pytest.mark.parametrize("shape", SHAPES)
def test_side_sequences_and_generator_mirror(shape):
    c, side, _ = shape
    assert conv_sizes(side, *SPECS[side]) == D_SIDES[side]
    g = DCGANGenerator(5, shape, hidden=3)
    assert _generator_sides(g, 5) == D_SIDES[side][::-1][1:]
    assert isinstance(g.net[-2], nn.Conv2d) and g.net[-2].out_channels == c


@pytest.mark.parametrize("shape", SHAPES)
def test_output_shapes(shape):
    models = build_models(_cfg(activation="sigmoid"), shape)
    pd, pg = models.initial_params(0, torch.float64)
    z = torch.randn(3, 5, dtype=torch.float64)
    x = models.generate(pg, z)
    assert x.shape == (3, *shape) and x.dtype == torch.float64
    assert float(x.abs().max()) < 1.0 and float(x.std()) > 0  # tanh output, not constant
    assert models.discriminate(pd, x).shape == (3,)
    sub = {k.removeprefix("features."): v for k, v in pd.items() if k.startswith("features.")}
    feats = torch.func.functional_call(models.discriminator.features, sub, (x,))
    assert feats.shape == (3, 4, 1, 1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for mod in (models.generator, models.discriminator) for m in mod.modules())


@pytest.mark.parametrize("shape", SHAPES)
def test_instances_are_independent(shape):
    models = build_models(_cfg(bias=True), shape)
    pd, _ = models.initial_params(1, torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    y = x.clone()
    y[2] = torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1
    a, b = models.discriminate(pd, x), models.discriminate(pd, y)
    keep = [0, 1, 3]
    assert torch.allclose(a[keep], b[keep], rtol=0, atol=1e-13)
    assert not torch.allclose(a[2], b[2], rtol=0, atol=1e-8)
    assert torch.allclose(models.discriminate(pd, x[2:3])[0], a[2], rtol=0, atol=1e-13)


def test_one_training_step_on_32x32_rgb():
    cfg = _cfg()
    models = build_models(cfg, (3, 32, 32))
    dyn = Dynamics.from_config(cfg, models)
    state = dyn.init_state(*models.initial_params(0, torch.float64))
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    z_d = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    z_g = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    new, losses = dyn.step(state, StepBatch(x, z_d, z_g, 0), torch.ones(4, dtype=torch.float64))
    assert all(torch.isfinite(v).all() for v in losses.values())
    for player in ("d", "g"):
        assert new[player].keys() == state[player].keys()
        assert all(torch.isfinite(v).all() for v in new[player].values())
        assert any(not torch.equal(new[player][k], state[player][k]) for k in state[player])

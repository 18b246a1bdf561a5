"""A GAN as two stateless modules plus parameter dicts, evaluated with ``functional_call``: parameters
live outside the modules (in the training state) so that one pure step function can be replayed,
perturbed and differentiated by ``torch.func``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..config import Config, ModelConfig
from ..errors import ConfigError
from ..integrity import check_fits
from .dcgan import DCGANDiscriminator, DCGANGenerator
from .lora import is_adapter, lora
from .mlp import MLPDiscriminator, MLPGenerator

Params = dict[str, torch.Tensor]

_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def check_no_batchnorm(module: nn.Module, role: str) -> None:
    """BatchNorm couples instances in a batch, so a weight of 0 would not remove one instance."""
    for name, sub in module.named_modules():
        if isinstance(sub, _BATCHNORM):
            raise ConfigError(f"the {role} contains BatchNorm ({name or 'root'}: {type(sub).__name__}); batch "
                              "statistics mix instances, so removing one instance cannot be expressed by its "
                              "weight. Use LayerNorm (norm = \"layer\") or no normalization.")
        if any(True for _ in sub.buffers(recurse=False)):
            raise ConfigError(f"the {role} has buffers ({name or 'root'}): only parameters are "
                              "supported, since buffers are not part of the differentiated state")


@dataclass
class GANModules:
    """The architecture: modules whose own parameters are only a template."""

    generator: nn.Module
    discriminator: nn.Module
    z_dim: int
    train_only: tuple[str, ...] | None = None  # globs on d/<name>, g/<name>; the config's take precedence
    frozen: tuple[str, ...] = ()
    conditional: bool = False  # called G(z, y) and D(x, y), y the class labels (int64) of the samples

    def __post_init__(self) -> None:
        check_no_batchnorm(self.discriminator, "discriminator")
        check_no_batchnorm(self.generator, "generator")

    def to(self, device: torch.device) -> "GANModules":
        """Move both modules' templates to ``device`` (in place), for modules that make tensors like them."""
        self.generator.to(device)
        self.discriminator.to(device)
        return self

    def generate(self, params_g: Params, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """G(z), or G(z, labels) for a conditional pair."""
        return functional_call(self.generator, params_g, self._inputs(z, labels))

    def discriminate(self, params_d: Params, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape (batch,): D(x), or D(x, labels) for a conditional pair."""
        return functional_call(self.discriminator, params_d, self._inputs(x, labels)).reshape(x.shape[0])

    def _inputs(self, samples: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if not self.conditional:
            return (samples,)
        if labels is None:
            raise ValueError("conditional GANModules need the labels of every sample")
        return samples, labels

    def module_params(self, dtype: torch.dtype) -> tuple[Params, Params]:
        """The modules' own parameters (user modules keep the initialization they came with)."""
        return tuple({k: v.detach().to(dtype).clone() for k, v in module.named_parameters()}
                     for module in (self.discriminator, self.generator))

    def initial_params(self, seed: int, dtype: torch.dtype) -> tuple[Params, Params]:
        """Glorot-uniform weights, zero biases and unit norm gains, drawn from ``seed``."""
        generator = torch.Generator().manual_seed(seed)  # D's draws first, then G's
        return (_init(self.discriminator, generator, dtype), _init(self.generator, generator, dtype))


def _init(module: nn.Module, generator: torch.Generator, dtype: torch.dtype) -> Params:
    """``module``'s starting parameters, drawn in float64 (the same values whatever ``dtype``)."""
    out: Params = {}
    for name, param in module.named_parameters():
        if is_adapter(name):  # B = 0 (the adapted layer starts as it was), A as lora() drew it
            value = param.detach().to(torch.float64).clone()
        elif param.ndim >= 2:
            fan_out, fan_in = param.shape[0], param[0].numel()
            if isinstance(module.get_submodule(name.rpartition(".")[0]), nn.ConvTranspose2d):  # fans differ
                fan_in, fan_out = param.shape[0] * param[0, 0].numel(), param.shape[1] * param[0, 0].numel()
            elif param.ndim > 2:
                fan_out = param.shape[0] * param[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            value = (torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        elif name.endswith("bias"):
            value = torch.zeros(param.shape, dtype=torch.float64)
        else:  # norm gains and other vectors keep the module's own init
            value = param.detach().to(torch.float64).clone()
        out[name] = value.to(dtype)
    return out


def _mlp(model: ModelConfig, sample_shape: tuple[int, ...], classes: int, third: bool
         ) -> tuple[nn.Module, nn.Module]:
    return (MLPGenerator(model.z_dim, sample_shape, model.g_hidden, model.layers, model.activation, model.norm,
                         model.bias, classes),
            MLPDiscriminator(math.prod(sample_shape), model.d_hidden, model.layers, model.activation, model.norm,
                             model.bias, classes, third))


def _dcgan(model: ModelConfig, sample_shape: tuple[int, ...], classes: int, third: bool
           ) -> tuple[nn.Module, nn.Module]:
    return (DCGANGenerator(model.z_dim, sample_shape, model.g_hidden, model.activation, model.norm, model.bias,
                           classes),
            DCGANDiscriminator(sample_shape, model.d_hidden, model.activation, model.norm, model.bias, classes, third))


Builder = Callable[[ModelConfig, tuple[int, ...], int, bool], tuple[nn.Module, nn.Module]]

# model.arch -> (model config, sample shape, number of classes or 0, whether D is differentiated three times)
# -> (generator, discriminator). Each builds G before D: module construction draws default inits from the global RNG.
ARCHITECTURES: dict[str, Builder] = {"mlp": _mlp, "dcgan": _dcgan}


def third_derivatives(cfg: Config) -> bool:
    """Whether ITD and AID differentiate D three times: gradient penalties put D's input gradient in its loss.
    Such a D normalizes through ``layer_norm.layer_norm`` where that can happen (right at that order, where
    ``F.layer_norm`` is not; the same values and first two derivatives bit for bit); without penalties it keeps
    ``layer_norm.plain_layer_norm`` everywhere, which is faster."""
    return bool(cfg.train.r1_gamma or cfg.train.r2_gamma)


def build_models(cfg: Config, sample_shape: tuple[int, ...], n_classes: int | None = None) -> GANModules:
    """The built-in architecture the config names, shaped for the data (and its ``n_classes``
    when ``model.conditional``), with ``[model] lora_rank`` adapters (seeded: the same in every run)."""
    model = cfg.model
    if model.conditional and not n_classes:
        raise ConfigError("model.conditional = true needs labelled data (the number of classes)")
    if model.arch == "custom":
        raise ConfigError("model.arch = 'custom' stands for modules given to the Python API: train with "
                          "gancleanse.train(cfg, out, models=GANModules(G, D, z_dim)) and reopen with "
                          "gancleanse.Run.open(path, models=...)")
    build = ARCHITECTURES.get(model.arch)
    if build is None:
        raise ConfigError(f"model.arch = {model.arch!r} is not available in this build")
    classes = n_classes if model.conditional else 0
    check_model_fits(build, model, sample_shape, classes)
    generator, discriminator = build(model, sample_shape, classes, third_derivatives(cfg))
    if model.lora_rank:
        lora(discriminator, model.lora_rank, targets=model.lora_targets, seed=1)
        lora(generator, model.lora_rank, targets=model.lora_targets, seed=2)
    return GANModules(generator, discriminator, model.z_dim, conditional=model.conditional)


def check_model_fits(build: Builder, model: ModelConfig, sample_shape: tuple[int, ...], classes: int) -> None:
    """Refuse widths whose parameters the memory available cannot hold, before allocating them: the pair is built
    on the meta device first (no memory, no random draw), and each player's parameters need a float32 template and
    their values in ``model.dtype`` at least."""
    with torch.device("meta"):
        generator, discriminator = build(model, sample_shape, classes, False)
    value_bytes = 8 if model.dtype == "float64" else 4
    for role, module, key in (("generator", generator, "g_hidden"), ("discriminator", discriminator, "d_hidden")):
        n = sum(p.numel() for p in module.parameters())
        check_fits(f"model.{key}", getattr(model, key), n * (4 + value_bytes),
                   f"the {role}'s {n} parameters (model.layers = {model.layers}, model.z_dim = {model.z_dim})")

"""Which parameters train. The rest are constants: they live in the modules (``functional_call`` takes
them from there), are saved once per run (``frozen.safetensors``), and stay out of the training state,
the optimizer state, every checkpoint and ITD's adjoint, so that time and memory scale with the
trainable part. Parameters are named ``d/<name>`` and ``g/<name>`` (as in checkpoints) and chosen with
glob patterns: ``[model] train_only`` (default: everything; for a module with low-rank adapters, only
its adapters) minus ``[model] frozen``.
"""

from __future__ import annotations

import hashlib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .lora import is_adapter

if TYPE_CHECKING:
    from .base import GANModules, Params

PLAYERS = ("d", "g")
ROLES = {"d": "discriminator", "g": "generator"}


def select_trainable(params: dict[str, "Params"], train_only: Sequence[str] | None,
                     frozen: Sequence[str]) -> dict[str, list[str]]:
    """The trainable parameter names of each player, in their module order."""
    qualified = [f"{p}/{n}" for p in PLAYERS for n in params[p]]

    def matching(pattern: str, key: str) -> set[str]:
        hits = {q for q in qualified if fnmatchcase(q, pattern)}
        if not hits:
            shown = ", ".join(qualified[:6]) + (", ..." if len(qualified) > 6 else "")
            raise ConfigError(f"model.{key} pattern {pattern!r} matches no parameter (names: {shown})")
        return hits

    if train_only is None:  # everything, except where a module carries adapters: those alone
        chosen = set()
        for p in PLAYERS:
            adapters = [f"{p}/{n}" for n in params[p] if is_adapter(n)]
            chosen |= set(adapters) if adapters else {f"{p}/{n}" for n in params[p]}
    else:
        chosen = set().union(*(matching(pat, "train_only") for pat in train_only)) if train_only else set()
    for pat in frozen:
        chosen -= matching(pat, "frozen")
    out = {p: [n for n in params[p] if f"{p}/{n}" in chosen] for p in PLAYERS}
    for p in PLAYERS:
        if not out[p]:
            raise ConfigError(f"model.train_only / frozen leave the {ROLES[p]} nothing to train: instances enter "
                              "only the discriminator and their effect only the generator, so both must train")
    return out


def split_trainable(params: dict[str, "Params"], keep: dict[str, list[str]]
                    ) -> tuple[dict[str, "Params"], dict[str, "Params"]]:
    """(trainable, frozen) parameter trees."""
    return ({p: {n: params[p][n] for n in keep[p]} for p in PLAYERS},
            {p: {n: v for n, v in params[p].items() if n not in keep[p]} for p in PLAYERS})


# ------------------------------------------------------------------- pretrained starts
def read_init(cfg_model, sample: dict[str, "Params"]) -> tuple[dict[str, "Params"], dict[str, dict]]:
    """Starting parameters from ``[model] init`` (keys ``generator.<name>`` and ``discriminator.<name>``)
    or ``init_g`` / ``init_d`` (plain names), safetensors only, replacing ``sample`` (names, shapes,
    dtypes). Returns the new parameters and what run.json records of each file (path and sha256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files: dict[str, tuple[str, str]] = (  # player -> (path, key prefix)
        {"d": (cfg_model.init, "discriminator."), "g": (cfg_model.init, "generator.")} if cfg_model.init else {})
    files.update({p: (getattr(cfg_model, f"init_{p}"), "") for p in PLAYERS if getattr(cfg_model, f"init_{p}")})
    out = {p: dict(sample[p]) for p in PLAYERS}
    record: dict[str, dict] = {}
    for p, (path, prefix) in files.items():
        key = "init" if prefix else f"init_{p}"
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"model.{key}: file not found: {file}")
        if file.suffix != ".safetensors":
            raise ConfigError(f"model.{key}: {file} is not a .safetensors file (pickled checkpoints are never loaded)")
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"model.{key}: {file} is not a readable safetensors file ({e})") from None
        mine = {wrapped_name(k[len(prefix):], sample[p]): v for k, v in tensors.items() if k.startswith(prefix)}
        # adapters added for fine-tuning keep their own start (B = 0) unless the file has them
        if missing := [n for n in sample[p] if n not in mine and not is_adapter(n)]:
            raise ConfigError(f"model.{key}: {file} has no {prefix}{missing[0]} (the {ROLES[p]} needs "
                              f"{len(sample[p])} parameters; {len(missing)} missing)")
        if extra := [n for n in mine if n not in sample[p]]:
            raise ConfigError(f"model.{key}: {file} has {prefix}{extra[0]}, which the {ROLES[p]} does not have")
        for n, v in mine.items():
            if tuple(v.shape) != tuple(sample[p][n].shape):
                raise ConfigError(f"model.{key}: {prefix}{n} in {file} has shape {tuple(v.shape)}, the "
                                  f"{ROLES[p]} needs {tuple(sample[p][n].shape)}")
            if not torch.isfinite(v).all():
                raise ConfigError(f"model.{key}: {prefix}{n} in {file} has NaN or infinite values")
            out[p][n] = v.to(sample[p][n].device, sample[p][n].dtype)
        record[ROLES[p]] = {"path": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    return out, record


def wrapped_name(name: str, params: "Params") -> str:
    """A pretrained weight's name where its layer now carries adapters (``a.weight`` became ``a.base.weight``)."""
    if name in params:
        return name
    owner, _, leaf = name.rpartition(".")
    wrapped = f"{owner}.base.{leaf}" if owner else f"base.{leaf}"
    return wrapped if wrapped in params else name


def freeze(models: "GANModules", constants: dict[str, "Params"]) -> None:
    """Put the frozen values into the modules as constants (no gradient, not in the state)."""
    for p, module in (("d", models.discriminator), ("g", models.generator)):
        names = dict(module.named_parameters())
        for name, value in constants.get(p, {}).items():
            if name not in names:
                raise ConfigError(f"frozen parameter {p}/{name} is not a parameter of the {ROLES[p]}")
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, nn.Parameter(value.detach().clone(), requires_grad=False))

"""Training states as flat tensor files: the (de)serialization of checkpoints.

A state is nested dicts of tensors (``{"d": {...}, "opt_d": {"m": {...}}, ...}``); on disk it is one
safetensors file whose keys are the paths joined by ``/``. Errors name the file, so a damaged run says which, and
so does a failed write (a full disk), through ``writing``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .errors import RunDirError
from .training.dynamics import State

STATE_KEYS = ("d", "g", "opt_d", "opt_g", "ema_g")


def flatten_state(state: State) -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> {"d/net.0.weight": ..., "opt_d/m/net.0.weight": ...}."""
    flat: dict[str, torch.Tensor] = {}
    for key, node in state.items():
        if isinstance(node, dict):
            flat.update({f"{key}/{inner}": value for inner, value in flatten_state(node).items()})
        else:
            flat[key] = node.detach().contiguous()
    return flat


def unflatten_state(flat: dict[str, torch.Tensor]) -> State:
    """Inverse of ``flatten_state``, in the canonical key order that ``Dynamics.step`` emits: ``torch.func``
    matches trees by structure including key order, so every loaded state orders its keys alike (top
    level as in STATE_KEYS, leaves sorted by name)."""
    nested: dict = {}
    for key in sorted(flat):
        parts = key.split("/")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = flat[key]
    # an optimizer without state (SGD) has no tensors on disk, but its key in the state
    return {k: nested.get(k, {}) for k in STATE_KEYS if k in nested or k.startswith("opt_")}


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write of the run file ``path`` (a full disk, a read-only directory) as one line naming it; the staged
    run directory it is written in is then removed whole."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RunDirError(f"{path}: cannot write it ({reason})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A run's safetensors file; a failed write is an error naming it."""
    with writing(path):
        save_file(tensors, str(path))


def save_state(state: State, path: Path) -> None:
    """Checkpoints are written from CPU copies, so a run opens on any device."""
    save_tensors({k: v.detach().cpu() for k, v in flatten_state(state).items()}, path)


def to_device(tree: Any, device: torch.device) -> Any:
    """A state (nested dicts of tensors) on ``device``."""
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_device(v, device) for v in tree)
    return tree.to(device)


def parse_tensors(data: bytes, label: str) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors, each float finite (training never writes a NaN, so one means
    damage); a failure is named by ``label``."""
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types
        raise RunDirError(f"{label}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RunDirError(f"{label}: non-finite values in {key}")
    return tensors

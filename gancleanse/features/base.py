"""What every feature space gives the metrics: a frozen network, images -> (features, logits).

``FeatureModel`` wraps the network of one feature space (``gancleanse.features``): the classifier trained
on the run's labels, the Inception-v3 network of the FID standard, the self-supervised encoder, or a user's
TorchScript file. ``load_cached`` / ``save_cached`` are the one cache format for networks trained inside
a run directory (the classifier and the encoder): safetensors weights beside a JSON of the settings that
produced them, the JSON written last, so a half-written cache never matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from ..data.base import as_float
from ..files import atomic_write, write_json_atomic


@dataclass(frozen=True)
class FeatureModel:
    """A frozen network: images -> (features, logits), both float64. ``logits`` is None for a space without
    classes (the self-supervised encoder). ``key`` identifies the model (hash of settings and weights, or of
    the file) for caches of real statistics; ``space`` names the feature space; ``record`` is what outputs
    record about it (file, sha256, settings)."""

    module: nn.Module
    dtype: torch.dtype
    key: str
    source: str
    accuracy: float | None = None
    space: str = "classifier"
    has_logits: bool = True
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.module(as_float(x, self.dtype))
        features, logits = out if isinstance(out, (tuple, list)) else (out, out)
        return features.to(torch.float64), logits.to(torch.float64)

    def to(self, device: torch.device) -> "FeatureModel":
        """The same frozen model on ``device`` (it is trained and cached on the CPU)."""
        return dataclasses.replace(self, module=self.module.to(device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[1]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of many images without a graph (real data), in chunks."""
        parts = [self(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def freeze(module: nn.Module) -> nn.Module:
    """Evaluation mode, parameters excluded from autograd (gradients stop at the images)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def model_key(prefix: str, settings: dict, module: nn.Module) -> str:
    """A short hash of the settings and the weights (equal settings on other thread counts can differ)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + t.detach().contiguous().cpu().numpy().tobytes())
    return f"{prefix}:{h.hexdigest()[:16]}"


def load_cached(directory: Path, stem: str, settings: dict, build: Callable[[], nn.Module]
                ) -> tuple[nn.Module, dict] | None:
    """The network cached as ``directory/stem.{safetensors,json}`` if its settings equal ``settings`` and its
    weights their recorded hash; None for a missing, stale, damaged or replaced cache (never trusted blindly)."""
    try:
        meta = json.loads((directory / f"{stem}.json").read_text())
        if meta["settings"] != settings:
            raise ValueError("settings changed since the network was cached")
        data = (directory / f"{stem}.safetensors").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
            raise ValueError("weights changed since they were cached")
        module = build()
        module.load_state_dict(load_safetensors(data))
    except Exception:  # noqa: BLE001 - any failure means: train again
        return None
    return module, meta


def save_cached(directory: Path, stem: str, module: nn.Module, meta: dict) -> dict:
    """Write the cache (weights first, then the JSON with their hash); returns ``meta`` with the hash. An
    unwritable directory only costs the reuse (a warning)."""
    weights = tensors_to_bytes({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    meta = {**meta, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{stem}.json").unlink(missing_ok=True)  # invalidate before the weights change
        with atomic_write(directory / f"{stem}.safetensors", binary=True) as f:
            f.write(weights)
        write_json_atomic(directory / f"{stem}.json", meta)
    except OSError as e:
        warnings.warn(f"could not cache the {stem} network in {directory}: {e}", stacklevel=3)
    return meta

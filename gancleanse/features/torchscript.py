"""Feature space ``torchscript``: the user's TorchScript file named by ``metric.extractor``.

Its ``forward`` takes a float tensor (N, C, H, W) of images in [-1, 1] (the data's own shape) and returns either

- ``logits`` of shape (N, K): used as logits for IS and as the features of FID/KID, or
- a tuple ``(features, logits)`` of shapes (N, D) and (N, K).

Inputs are cast to the dtype of the module's first floating parameter (float32 if it has none) and outputs
to float64. A relative path is taken from the current directory. Loading TorchScript runs code, so a path
stored in a run directory's config is never loaded on its own authority: it must be named again
(``--extractor``, ``Run.open(path, extractor=...)``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, DataError
from ..integrity import sha256_file
from .base import FeatureModel, freeze

if TYPE_CHECKING:
    from ..run import Run


def load_extractor(path: str | Path, sample_shape: tuple[int, ...]) -> FeatureModel:
    """A user TorchScript model, checked on a probe batch of the data's sample shape."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"metric.extractor: file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = freeze(torch.jit.load(str(path), map_location="cpu"))
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        raise DataError(f"metric.extractor {path}: not a loadable TorchScript file ({_failure(e)})") from None
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    probe = torch.zeros((2, *sample_shape), dtype=dtype)
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
        raise DataError(f"metric.extractor {path}: failed on a batch of shape {tuple(probe.shape)} "
                        f"({_failure(e)})") from None
    _check_output(out, path, tuple(probe.shape))
    digest = sha256_file(path)
    return FeatureModel(module, dtype, f"extractor:{digest[:16]}", str(path), space="torchscript",
                        record={"file": str(path), "sha256": digest})


def _failure(e: Exception) -> str:
    """The exception's type and the first line of its message (at most 200 characters)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _check_output(out: object, path: Path, shape: tuple[int, ...]) -> None:
    def ok(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 2 and t.shape[0] == shape[0]

    def describe(t: object) -> str:
        return f"tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

    pair = isinstance(out, (tuple, list))
    parts: list[Any] = list(out) if isinstance(out, (tuple, list)) else [out]  # (features, logits), or logits
    if len(parts) == (2 if pair else 1) and all(ok(t) for t in parts) and parts[-1].shape[1] >= 2:
        return
    got = "(" + ", ".join(describe(t) for t in parts) + ")" if pair else describe(out)
    raise DataError(f"metric.extractor {path}: for input of shape {shape} it must return logits "
                    f"({shape[0]}, K>=2) or (features ({shape[0]}, D), logits ({shape[0]}, K>=2)); got {got}")


def extractor_file(run: "Run") -> str | None:
    """The TorchScript extractor to load for ``run``: only one the user named explicitly. Loading TorchScript
    runs code, so the path stored in a run directory's config is never loaded on its own authority; it must be
    given again (``--extractor`` / ``Run.open``)."""
    if run.extractor is not None:
        return run.extractor
    if run.cfg.metric.extractor:
        raise ConfigError(f"the metrics of run {run.path} use the TorchScript extractor "
                          f"{run.cfg.metric.extractor}, which runs code when loaded: name it explicitly "
                          f"(--extractor {run.cfg.metric.extractor}, or Run.open(path, extractor=...))")
    return None


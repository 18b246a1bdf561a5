"""Discriminator ranking: the real instances the trained discriminator finds least real go first.

A GAN's own judgement of its data, free once it is trained: the final discriminator's logit
of each training instance (higher = more real); harmfulness is minus the logit.
"""

from __future__ import annotations

import time

import torch

from ..data.base import as_float
from ..options import NoOptions
from ..run import Run, torch_threads
from ..scores import Scores

CHUNK = 1024


@torch.no_grad()
def discriminator_logits(run: Run) -> torch.Tensor:
    """The final discriminator's logit of every training instance, float64, in split order."""
    params = run.final_state()["d"]
    out = []
    with torch_threads(run.threads):
        for lo in range(0, run.n_train, CHUNK):
            x = as_float(run.splits.train[lo:lo + CHUNK].to(run.device), run.dtype)
            y = None if run.y_train is None else run.y_train[lo:lo + CHUNK]
            out.append(run.models.discriminate(params, x, y).to(torch.float64))
    return torch.cat(out).cpu()


def score(run: Run, metric: str, *, seed: int = 0, progress: bool = True, options: NoOptions | None = None) -> Scores:
    started = time.perf_counter()
    logits = discriminator_logits(run).numpy()
    return Scores(metric, "discriminator", logits, -logits, info={"seconds": time.perf_counter() - started})

"""How much memory the reverse pass's graphs take, and how much the machine can give them.

ITD keeps the graphs of one stretch of steps alive between its forward replay and its reverse sweep; each
step's graph holds the activations of both players' forward and backward passes (about 0.14 GB per step for
the digits DCGAN at batch 50). The stretch is therefore sized from a memory budget and a measurement of one
step's graph, not from a fixed step count.
"""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager, suppress
from typing import Callable, Iterator

import torch

GB = 1e9
AUTO_FRACTION = 0.5  # of the memory available when the reverse pass starts


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free memory, or Linux's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def budget_bytes(memory_gb: float | None, device: torch.device) -> int | None:
    """The graph budget: ``memory_gb`` if given, else half of what is available (None: unbounded)."""
    if memory_gb is not None:
        return int(memory_gb * GB)
    return None if (free := available_bytes(device)) is None else int(AUTO_FRACTION * free)


def graph_bytes(build: Callable[[], object], device: torch.device) -> tuple[int, object]:
    """Bytes that stay allocated after ``build()`` (one step's VJP, whose closure keeps its
    graph), and what ``build`` returned. CUDA: the allocator's count; CPU: the profiler's
    allocation record (the resident size is no measure: freed heap memory is reused)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        out = build()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.memory_allocated(device) - before), out
    from torch.autograd.profiler import profile

    gc.disable()  # a collection during the probe would free garbage from before it, counted as negative
    try:
        with _silenced_stderr(), profile(profile_memory=True, use_kineto=False) as prof:
            out = build()
    finally:
        gc.enable()
    return max(0, int(sum(e.self_cpu_memory_usage for e in prof.function_events))), out


def steps_within(budget: int | None, per_step: int, longest: int) -> int:
    """How many steps' graphs fit in ``budget`` (at least 1, at most ``longest``)."""
    if budget is None or per_step <= 0:
        return longest
    return max(1, min(longest, budget // per_step))


@contextmanager
def _silenced_stderr() -> Iterator[None]:
    """The profiler's native layer announces its start and stop on descriptor 2 (whatever ``sys.stderr`` is)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no descriptor 2 to redirect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

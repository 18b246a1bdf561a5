"""Where the computations run: the device a run trains and replays on, made deterministic.

``[train] device`` ("auto", "cpu", "cuda", "cuda:N") picks it; every command that computes takes ``--device``
to override it. Run directories stay device-portable (tensors are saved from CPU copies); run.json records the
device it was trained on. A replay is bitwise only on the recorded device kind: on CUDA that needs
deterministic kernels, a fixed cuBLAS workspace and no TF32, which ``use`` sets for the whole process.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch

from .config import DEVICE_PATTERN
from .errors import ConfigError, GancleanseWarning

# cuBLAS reads this once, when it starts: set before any CUDA work (importing gancleanse does).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; a CUDA device that is absent is an error."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def use(device: torch.device) -> torch.device:
    """Make computations on ``device`` deterministic (CUDA: deterministic kernels, no autotuning, no TF32)."""
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(device)
    return device


def describe(device: torch.device) -> dict[str, str | None]:
    """What run.json records of the device: its kind, its name and the CUDA version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": device.type, "device_name": name,
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def local_workers(device: str | torch.device, workers: int, executor: str) -> int:
    """Parallel local processes on one CUDA device would each hold a CUDA context and a copy
    of the data: there, jobs run in one process (small GANs leave the GPU idle per job anyway;
    the retrains of one job are batched where that pays). Ray schedules its own workers."""
    if executor == "local" and workers > 1 and resolve(str(device)).type == "cuda":
        warnings.warn(f"--workers {workers} on CUDA: the jobs run in this one process (one CUDA context); "
                      "use --executor ray to spread them over several GPUs", GancleanseWarning, stacklevel=3)
        return 1
    return workers


def recorded_kind(recorded: str) -> str:
    """The device to check a replay on: the recorded kind where this machine has it."""
    return "cuda" if recorded == "cuda" and torch.cuda.is_available() else "cpu"


def warn_if_other_kind(recorded: str, device: torch.device, path: object) -> None:
    """Replaying on another device kind works, but not bit for bit."""
    if recorded != device.type:
        warnings.warn(f"{path} was trained on {recorded} and is replayed on {device.type}: counterfactual "
                      f"retrains are not bitwise comparable with the recorded run", GancleanseWarning, stacklevel=3)


def check_threads(n: int, key: str = "train.threads") -> None:
    """Refuse more torch threads than this process has cores (called by training code, not by config
    loading: a run directory recorded on a bigger machine must still load and be inspected here)."""
    if n < 1:
        raise ConfigError(f"{key} = {n} is out of range (must be >= 1)")
    try:  # the cores this process may run on: its affinity mask where the OS has one (containers, taskset)
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if n > cores:
        raise ConfigError(f"{key} = {n} exceeds the {cores} CPU core{'s' if cores != 1 else ''} "
                          "available to this process; lower it")

"""Resume checkpoints: a training killed part-way continues from its last one and finishes bitwise as if never stopped.

While training, ``OUT.partial/resume.safetensors`` holds the training state after ``step`` steps (parameters, optimizer
states, generator average) and every loss logged so far; its header holds the step, the time spent so far and a
fingerprint of what decides the trajectory: the config keys that shape the training, the data, the starting parameters,
the device and the versions. No random state needs saving: every draw of the schedule derives from the seed and the step
alone, so the recorded window's draws before ``step`` are drawn again. The file is replaced atomically (a kill while
writing it leaves the previous one) and removed before the run directory is complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as serialize

from ..config import Config
from ..data.base import Splits
from ..errors import ConfigError, RunDirError
from ..files import atomic_write
from ..state_files import flatten_state, writing
from ..version import __version__
from .dynamics import State

RESUME_FILE = "resume.safetensors"
HEADER_KEY = "gancleanse.resume"
TIME_RULE_SECONDS = 600.0  # resume_every unset: every epoch, or after this much work, whichever comes first
SHAPING_SECTIONS = ("data", "model", "train", "metric")  # [cleanse] never enters a training
# Keys that do not change the trajectory: resume_every only says when to save, and the device is compared resolved
# ("auto" and "cpu" are the same device on a machine without CUDA).
NEUTRAL_KEYS = frozenset({"train.resume_every", "train.device"})
LABELS = {"data": "the data", "start": "the starting parameters (model.init files or the modules given)",
          "device": "train.device", "torch": "the torch version", "gancleanse": "the gancleanse version"}


def config_keys(cfg: Config) -> dict[str, Any]:
    """The keys that shape a training, flat (``section.key``), as JSON reads them back."""
    sections = cfg.to_dict()
    flat = {f"{section}.{key}": value for section in SHAPING_SECTIONS
            for key, value in sections[section].items() if f"{section}.{key}" not in NEUTRAL_KEYS}
    return json.loads(json.dumps(flat))


def tensors_digest(groups: list[dict[str, torch.Tensor]]) -> str:
    """sha256 of tensors' names, dtypes, shapes and values, in a fixed order."""
    digest = hashlib.sha256()
    for group in groups:
        for name in sorted(group):
            tensor = group[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint(cfg: Config, splits: Splits, data_fingerprint: str, initial: tuple[dict, dict],
                constants: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Everything a resumed training must share with the one that wrote the checkpoint to finish bitwise alike."""
    labels = {name: y for name, y in (("y_train", splits.y_train), ("y_valid", splits.y_valid),
                                      ("y_test", splits.y_test)) if y is not None}
    return {"config": config_keys(cfg), "data": hashlib.sha256(
                (data_fingerprint + tensors_digest([labels])).encode()).hexdigest(),
            "start": tensors_digest([initial[0], initial[1], constants]),
            "device": str(device), "torch": torch.__version__, "gancleanse": __version__}


def first_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between two fingerprints, in words (a config key with both values first), or None."""
    before, now = saved.get("config", {}), current["config"]
    for key in [*now, *(k for k in before if k not in now)]:
        if before.get(key, "(unset)") != now.get(key, "(unset)"):
            return f"{key} ({json.dumps(before.get(key))} then, {json.dumps(now.get(key))} now)"
    for key, label in LABELS.items():
        if saved.get(key) != current[key]:
            return label if key in ("data", "start") else f"{label} ({saved.get(key)} then, {current[key]} now)"
    return None


def read_header(path: Path) -> dict[str, Any]:
    """The resume checkpoint's header (step, losses' names, seconds, fingerprint), without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[HEADER_KEY])
    except Exception as e:  # safetensors raises its own error types; a missing key or bad JSON alike
        raise RunDirError(f"{path}: not a readable resume checkpoint ({e}); --force starts over") from None
    if not isinstance(header, dict) or not isinstance(header.get("step"), int):
        raise RunDirError(f"{path}: not a readable resume checkpoint (no step); --force starts over")
    return header


def check_resumable(stage: Path, current: dict[str, Any]) -> bool:
    """Whether ``stage`` (a killed training's directory) holds a resume checkpoint of this very training; one of
    another config or data is refused, naming what changed, so that no run mixes two trainings."""
    path = stage / RESUME_FILE
    if not path.is_file():
        return False  # killed before its first resume checkpoint: nothing worth keeping
    change = first_change(read_header(path).get("fingerprint", {}), current)
    if change is not None:
        raise ConfigError(f"{stage} holds an interrupted training that differs in {change}: rerun with what it "
                          "was started with to resume it, or --force starts over")
    return True


@dataclass
class Progress:
    """What the step loop has done so far, as a resume checkpoint keeps it."""

    step: int = 0  # the steps behind the last resume checkpoint: where a resumed training starts
    losses: dict[str, list[float]] = field(default_factory=dict)  # each logged stat, one value per step
    seconds: float = 0.0  # training time before this process
    window_seconds: float = 0.0  # time in the window's steps before this process

    def log_line(self, step: int, steps_per_epoch: int) -> str:
        """Step ``step``'s line of losses.jsonl."""
        stats = {key: values[step] for key, values in self.losses.items()}
        return json.dumps({"step": step, "epoch": step // steps_per_epoch, **stats}) + "\n"

    def record(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.losses.setdefault(key, []).append(value)


def save_resume(stage: Path, state: State, progress: Progress, current: dict[str, Any]) -> None:
    """Write the resume checkpoint after ``progress.step`` steps, atomically (a kill leaves the previous one)."""
    tensors = {f"state/{k}": v.detach().cpu().contiguous() for k, v in flatten_state(state).items()}
    tensors.update({f"losses/{k}": torch.tensor(v, dtype=torch.float64) for k, v in progress.losses.items()})
    header = {"step": progress.step, "losses": list(progress.losses), "seconds": progress.seconds,
              "window_seconds": progress.window_seconds, "fingerprint": current}
    path = stage / RESUME_FILE
    with writing(path), atomic_write(path, binary=True) as f:
        f.write(serialize(tensors, metadata={HEADER_KEY: json.dumps(header)}))


def in_order_of(template: State, flat: dict[str, torch.Tensor], device: torch.device) -> State:
    """A loaded state with the keys in ``template``'s order, on ``device``: sums over parameters (weight decay) then
    add in the order an uninterrupted training adds them."""
    def build(node: dict, prefix: str) -> dict:
        return {k: build(v, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"].to(device)
                for k, v in node.items()}
    expected = set(flatten_state(template))
    if set(flat) != expected:
        missing = sorted(expected ^ set(flat))[0]
        raise RunDirError(f"the resume checkpoint's state does not match the model ({missing}); --force starts over")
    return build(template, "")


def load_resume(stage: Path, template: State, device: torch.device) -> tuple[State, Progress]:
    """The state and progress of the resume checkpoint in ``stage`` (its fingerprint already checked)."""
    path = stage / RESUME_FILE
    header = read_header(path)
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as e:  # safetensors raises its own error types
        raise RunDirError(f"{path}: not a readable resume checkpoint ({e}); --force starts over") from None
    state = in_order_of(template, {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}, device)
    try:
        losses = {key: tensors[f"losses/{key}"].tolist() for key in header["losses"]}
        progress = Progress(header["step"], losses, float(header["seconds"]), float(header["window_seconds"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{path}: not a readable resume checkpoint (no {e}); --force starts over") from None
    if any(len(values) != progress.step for values in losses.values()):
        raise RunDirError(f"{path}: its losses do not cover its {progress.step} steps; --force starts over")
    return state, progress


@dataclass
class ResumeRule:
    """When to write a resume checkpoint: every ``every`` steps, or (unset) at every epoch start and after
    ``TIME_RULE_SECONDS`` of work, whichever comes first; never at the first or the last step."""

    every: int | None
    steps_per_epoch: int
    total: int
    last: float = field(default_factory=time.perf_counter)

    def due(self, step: int) -> bool:
        if step <= 0 or step >= self.total:
            return False
        if self.every is not None:
            return step % self.every == 0
        return step % self.steps_per_epoch == 0 or time.perf_counter() - self.last >= TIME_RULE_SECONDS

    def saved(self) -> None:
        self.last = time.perf_counter()

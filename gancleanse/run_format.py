"""The run directory's format facts, defined once for what training writes and what ``Run.open`` /
``verify`` accept: the format version, the checkpoint names and steps, the fields run.json must carry
(sealed), the numbers it derives from the config, the memory its size keys ask for, and the evaluation latents (and
labels) file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import GAUSSIAN2D_N_TRAIN, Config
from .errors import RunDirError
from .integrity import RUN_JSON_MAX_BYTES, check_fits, read_bounded, seal_of
from .state_files import save_tensors
from .training.schedule import eval_labels, eval_latents

FORMAT_VERSION = 2  # 2: content hashes and seal in run.json
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FROZEN_FILE = "frozen.safetensors"  # parameters that do not train: constants, saved once
EVAL_SPLITS = ("valid", "test")
GAUSSIAN2D_ROW_BYTES = 16  # two float64 coordinates per instance, all splits drawn at once

META_FIELDS: dict[str, type] = {
    "format": int, "status": str, "threads": int, "n_train": int, "steps_per_epoch": int, "total_steps": int,
    "window": dict, "checkpoints": list, "data_fingerprint": str, "files": dict, "seal": str}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


STATES_BUDGET_BYTES = 2 * 10**9  # the window's states on disk under checkpoint_every's default
SMALL_STATE_BYTES = 256 * 1024  # states below: a segment's graphs are small and a state's load is not
LONGEST_DEFAULT_INTERVAL = 25


def default_checkpoint_interval(window_steps: int, state_bytes: int) -> int:
    """``[train] checkpoint_every``'s default: 1 (every step's state kept: ITD then holds one step's graph at a time
    and replays nothing twice) while the window's states fit ``STATES_BUDGET_BYTES``, else the fewest steps apart
    that fit it, at most ``LONGEST_DEFAULT_INTERVAL``. A state under ``SMALL_STATE_BYTES`` (the 2D MLP's, 45 KB)
    gets the longest: its network's graphs are small, and loading a state per step (0.3 ms against a 2 ms step)
    made ITD over the 2D MLP's window 3.0x its replay instead of 2.1x (0.43 MB, 1.8 ms against 270 ms, for the
    28x28 DCGAN)."""
    if state_bytes < SMALL_STATE_BYTES:
        return LONGEST_DEFAULT_INTERVAL
    return min(LONGEST_DEFAULT_INTERVAL, max(1, -(-window_steps * state_bytes // STATES_BUDGET_BYTES)))


def window_checkpoints(window_start: int, total: int, every: int, steps_per_epoch: int) -> list[int]:
    """Checkpoint steps: the window start, every ``every`` steps, every epoch start, the end."""
    steps = set(range(window_start, total, every))
    if steps_per_epoch:  # the epoch starts in the window, without visiting every step
        steps |= set(range(-(-window_start // steps_per_epoch) * steps_per_epoch, total, steps_per_epoch))
    steps |= {0, window_start, total}
    return sorted(steps)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a gancleanse run (its run.json says so), whatever its state."""
    try:
        meta = json.loads(read_bounded(path / "run.json", RUN_JSON_MAX_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta and "status" in meta and "n_train" in meta


def read_meta(path: Path) -> dict[str, Any]:
    """run.json of ``path``: parsed, complete, of this format, sealed, with well-typed fields."""
    meta_path = path / "run.json"
    if not (meta_path.exists() or meta_path.is_symlink()):
        raise RunDirError(f"{path} is not a gancleanse run directory (no run.json)")
    try:
        meta = json.loads(read_bounded(meta_path, RUN_JSON_MAX_BYTES, "the cap on run.json").decode("utf-8"))
    except OSError as e:
        raise RunDirError(f"{meta_path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise RunDirError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{meta_path}: not a JSON object")
    if meta.get("status") != "complete":
        raise RunDirError(f"run {path} is not complete (run.json status {meta.get('status')!r})")
    if meta.get("format") != FORMAT_VERSION:
        raise RunDirError(f"{meta_path}: format {meta.get('format')!r}, this gancleanse reads format "
                          f"{FORMAT_VERSION} (runs without content hashes cannot be trusted: retrain it)")
    for key, kind in META_FIELDS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise RunDirError(f"{meta_path}: field {key!r} is missing or not a {kind.__name__}")
    try:
        seal = seal_of(meta)
    except ValueError as e:  # NaN or infinity in run.json
        raise RunDirError(f"{meta_path}: {e}") from None
    if seal != meta["seal"]:
        raise RunDirError(f"{meta_path} was edited after training (its seal does not match its content)")
    check_file_records(meta["files"], meta.get("sizes", {}), str(meta_path))
    return meta


def check_file_records(hashes: dict[str, Any], sizes: Any, label: str) -> None:
    """Every recorded file lies inside the run, and a recorded size (runs since sizes were recorded) is a byte count:
    a reader never reads outside the run nor more than that."""
    for name in hashes:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise RunDirError(f"{label}: {name!r} names a file outside the run directory")
    if not isinstance(sizes, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in sizes.values()):
        raise RunDirError(f"{label}: field 'sizes' must map file names to byte counts")


def check_meta_against_config(meta: dict[str, Any], cfg: Config, label: str) -> None:
    """The numbers run.json derives from the config must be the ones the config gives."""
    train, n_train = cfg.train, cfg.data.n_train
    steps_per_epoch = n_train // train.batch_size if n_train else 0
    start, total = (train.record_from_epoch or 0) * steps_per_epoch, train.epochs * steps_per_epoch
    expected = {"n_train": n_train, "steps_per_epoch": steps_per_epoch, "total_steps": total, "threads": train.threads,
                "window": {"start_epoch": train.record_from_epoch, "start_step": start, "end_step": total}}
    for key, value in expected.items():
        if meta[key] != value:
            raise RunDirError(f"{label}: {key} = {meta[key]!r} disagrees with config.toml ({value!r})")
    if train.checkpoint_every is None:  # a run records the interval it used
        raise RunDirError(f"{label}: config.toml has no train.checkpoint_every")
    # the steps checkpointed every checkpoint_every and at every epoch start: never list more than run.json holds
    at_least = max(len(range(start, total, train.checkpoint_every)), len(range(start, total, steps_per_epoch or 1)) - 1)
    if at_least > len(meta["checkpoints"]) or meta["checkpoints"] != window_checkpoints(
            start, total, train.checkpoint_every, steps_per_epoch):
        raise RunDirError(f"{label}: the checkpoint steps disagree with config.toml")
    for name in ["config.toml", "schedule.safetensors", "eval_latents.safetensors", "splits.json",
                 *(f"checkpoints/{checkpoint_name(c)}" for c in meta["checkpoints"])]:
        if not isinstance(meta["files"].get(name), str):
            raise RunDirError(f"{label}: no sha256 recorded for {name}")


def is_index_tensor(values: torch.Tensor, n: int) -> bool:
    """Whether ``values`` are int64 in 0..n-1 (instance indices, class labels)."""
    return values.dtype == torch.int64 and (values.numel() == 0 or (0 <= int(values.min()) and int(values.max()) < n))


def check_label_tensors(tensors: dict[str, torch.Tensor], names: tuple[str, ...], n_classes: int,
                        label: str) -> None:
    """Stored generated labels (those of ``names`` present) must be int64 classes of the data."""
    for name in names:
        if name in tensors and not is_index_tensor(tensors[name], n_classes):
            raise RunDirError(f"{label}: {name} must hold int64 labels in 0..{n_classes - 1}")


def check_sizes(cfg: Config) -> None:
    """Refuse, before anything is allocated, size keys whose arrays the memory available cannot hold, naming the key:
    gaussian2d's splits (drawn at once) and the evaluation latents (and labels) of both splits."""
    data, metric = cfg.data, cfg.metric
    if data.name == "gaussian2d":
        sizes = {"data.n_train": data.n_train or GAUSSIAN2D_N_TRAIN, "data.n_valid": data.n_valid,
                 "data.n_test": data.n_test}
        key = max(sizes, key=lambda k: sizes[k])
        check_fits(key, sizes[key], sum(sizes.values()) * GAUSSIAN2D_ROW_BYTES, "the gaussian2d splits")
    key, n = ("metric.n_samples", metric.n_samples) if metric.n_samples is not None else ("data.n_valid", data.n_valid)
    per_sample = 8 * cfg.model.z_dim + (8 if cfg.model.conditional else 0)
    check_fits(key, n, len(EVAL_SPLITS) * n * per_sample, "the evaluation latents (metric.n_samples per split)")


def write_eval_latents(cfg: Config, stage: Path, label_frequencies: torch.Tensor | None = None) -> None:
    """The fixed evaluation latents of both splits, and generated labels for a conditional GAN."""
    cfg = cfg.resolved()
    metric = cfg.metric
    tensors = {split: eval_latents(metric.seed, split, metric.n_samples, cfg.model.z_dim) for split in EVAL_SPLITS}
    if label_frequencies is not None:
        tensors.update({f"{split}_labels": eval_labels(metric.seed, split, metric.n_samples, label_frequencies)
                        for split in EVAL_SPLITS})
    save_tensors(tensors, stage / "eval_latents.safetensors")

"""The run directory: what training records and what every later command reads.

Layout (all tensors in safetensors)::

    RUN/
      config.toml               the resolved config (every default explicit)
      run.json                  status, sizes, the recorded window, checkpoint steps, versions
      schedule.safetensors      instance indices and latents of every step in the window
      eval_latents.safetensors  fixed latents for metrics on the valid and test splits
      checkpoints/step_*.safetensors   full state (params + optimizer [+ average]) at steps
      losses.jsonl              one line per training step
      splits.json               the instance keys of each split and where the data came from

A run is written under ``RUN.partial`` and renamed only when complete, and ``run.json``
carries ``"status": "complete"``, so an interrupted run is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .config import Config, load_config
from .data import Splits, load_data
from .data.base import as_float
from .errors import RunDirError
from .models import GANModules, build_models
from .training.dynamics import Dynamics, State, StepBatch
from .training.schedule import Schedule, eval_latents

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------ state <-> flat dict
def flatten_state(state: State) -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> {"d/net.0.weight": ..., "opt_d/m/net.0.weight": ...}."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else k, v)
        else:
            flat[prefix] = node.detach().contiguous()

    walk("", state)
    return flat


STATE_KEYS = ("d", "g", "opt_d", "opt_g", "ema_g")


def unflatten_state(flat: dict[str, torch.Tensor]) -> State:
    """Inverse of ``flatten_state``, in the canonical key order that ``Dynamics.step`` emits.

    ``torch.func`` matches trees by structure including key order, so every state that is
    loaded must order its keys alike: top level as in STATE_KEYS, leaves sorted by name.
    """
    nested: dict = {}
    for key in sorted(flat):
        parts = key.split("/")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = flat[key]
    nested.setdefault("opt_d", {})
    nested.setdefault("opt_g", {})
    return {k: nested[k] for k in STATE_KEYS if k in nested}


def save_state(state: State, path: Path) -> None:
    save_file(flatten_state(state), str(path))


def load_state_file(path: Path) -> State:
    if not path.is_file():
        raise RunDirError(f"checkpoint missing: {path}")
    return unflatten_state(load_file(str(path)))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with a fixed CPU thread count (bitwise replay needs the recorded one)."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextmanager
def staged_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` only if the block finishes.

    On any error the staging directory is removed, so nothing half-written remains.
    """
    out = Path(out)
    if out.exists():
        if not force:
            raise RunDirError(f"output directory already exists: {out} (use --force to replace it)")
    stage = out.with_name(out.name + ".partial")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


# ---------------------------------------------------------------------------- reader
@dataclass
class Run:
    """A finished run directory, opened for reading."""

    path: Path
    cfg: Config
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, models: GANModules | None = None) -> "Run":
        """Open a finished run; ``models`` are required for runs trained with user modules."""
        path = Path(path)
        if not path.is_dir():
            partial = path.with_name(path.name + ".partial")
            hint = f" ({partial} exists: that run did not finish)" if partial.exists() else ""
            raise RunDirError(f"run directory not found: {path}{hint}")
        meta_path = path / "run.json"
        if not meta_path.is_file():
            raise RunDirError(f"{path} is not a gancleanse run directory (no run.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("status") != "complete":
            raise RunDirError(f"run {path} is not complete (status {meta.get('status')!r})")
        if meta.get("format") != FORMAT_VERSION:
            raise RunDirError(f"run {path} has format {meta.get('format')}, expected {FORMAT_VERSION}")
        cfg = load_config(path / "config.toml")
        run = cls(path, cfg, meta)
        if models is not None:
            run.__dict__["models"] = models  # fills the cached property
        elif cfg.model.arch == "custom":
            raise RunDirError(f"{path} was trained with user-supplied modules: open it with "
                              "gancleanse.Run.open(path, models=GANModules(generator, discriminator, z_dim))")
        return run

    def __getstate__(self) -> dict[str, Any]:
        """Pickle what reopens the run in another process (caches are rebuilt there)."""
        state = {"path": self.path, "cfg": self.cfg, "meta": self.meta}
        if self.cfg.model.arch == "custom":
            state["models"] = self.models
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- derived objects -------------------------------------------------------
    @cached_property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.model.dtype]

    @cached_property
    def splits(self) -> Splits:
        if self.cfg.data.name == "custom":
            keys_file = self.path / "splits.json"
            keys = json.loads(keys_file.read_text()) if keys_file.is_file() else {}
            keys = {k: keys[k] for k in ("train", "valid", "test")} if "train" in keys else None
            return Splits(**load_file(str(self.path / "data.safetensors")), keys=keys)
        splits = load_data(self.cfg)
        if splits.fingerprint() != self.meta["data_fingerprint"]:
            raise RunDirError(f"the data of {self.path} changed since training "
                              f"(fingerprint {splits.fingerprint()} != {self.meta['data_fingerprint']})")
        return splits

    @cached_property
    def models(self) -> GANModules:
        return build_models(self.cfg, self.splits.sample_shape)

    @cached_property
    def dynamics(self) -> Dynamics:
        return Dynamics.from_config(self.cfg, self.models)

    @cached_property
    def x_train(self) -> torch.Tensor:
        """The whole training split as model values (AID's operator); steps decode per batch."""
        return as_float(self.splits.train, self.dtype)

    @cached_property
    def train_keys(self) -> list[str]:
        """Each training instance's stable key (relative path, or ``#i``), by index."""
        return self.splits.key_list("train")

    @cached_property
    def _schedule(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "schedule.safetensors"))

    # --- window ----------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.meta["n_train"])

    @property
    def steps_per_epoch(self) -> int:
        return int(self.meta["steps_per_epoch"])

    @property
    def window_start(self) -> int:
        return int(self.meta["window"]["start_step"])

    @property
    def final_step(self) -> int:
        return int(self.meta["total_steps"])

    @property
    def checkpoint_steps(self) -> list[int]:
        return [int(s) for s in self.meta["checkpoints"]]

    @property
    def threads(self) -> int:
        return int(self.meta["threads"])

    def epoch_start_step(self, epoch: int) -> int:
        step = epoch * self.steps_per_epoch
        if not self.window_start <= step < self.final_step:
            first = self.window_start // self.steps_per_epoch
            raise RunDirError(f"epoch {epoch} is outside the recorded window "
                              f"(epochs {first}..{self.cfg.train.epochs - 1})")
        return step

    @cached_property
    def schedule(self) -> Schedule:
        """The generator of every step's indices and latents (the window is also recorded)."""
        t = self.cfg.train
        return Schedule(self.n_train, t.batch_size, self.cfg.model.z_dim, t.seed,
                        shared_latents=t.update == "simultaneous")

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.final_step:
            raise RunDirError(f"step {step} is outside the training (0..{self.final_step - 1})")

    def indices(self, step: int) -> torch.Tensor:
        """Instance indices of the minibatch of ``step`` (recorded in the window, else regenerated)."""
        self._check_step(step)
        if step < self.window_start:
            return self.schedule.indices(step)
        return self._schedule["indices"][step - self.window_start]

    def batch(self, step: int) -> StepBatch:
        self._check_step(step)
        if step < self.window_start:
            z_d, z_g = self.schedule.latents(step)
        else:
            i = step - self.window_start
            z_d = self._schedule["z_d"][i]
            z_g = self._schedule["z_g"][i] if "z_g" in self._schedule else z_d
        x = as_float(self.splits.train[self.indices(step)], self.dtype)
        return StepBatch(x, z_d.to(self.dtype), z_g.to(self.dtype), step)

    def load_state(self, step: int) -> State:
        if step not in self.checkpoint_steps:
            raise RunDirError(f"no checkpoint at step {step} in {self.path}")
        return load_state_file(self.path / "checkpoints" / checkpoint_name(step))

    def final_state(self) -> State:
        return self.load_state(self.final_step)

    def eval_latents(self, split: str) -> torch.Tensor:
        return load_file(str(self.path / "eval_latents.safetensors"))[split].to(self.dtype)


def write_eval_latents(cfg: Config, stage: Path) -> None:
    cfg = cfg.resolved()
    z = {split: eval_latents(cfg.metric.seed, split, cfg.metric.n_samples, cfg.model.z_dim)
         for split in ("valid", "test")}
    save_file(z, str(stage / "eval_latents.safetensors"))

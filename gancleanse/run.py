"""The run directory: what training records and what every later command reads.

Layout (all tensors in safetensors)::

    RUN/
      config.toml               the resolved config (every default explicit)
      run.json                  status, sizes, the recorded window, checkpoint steps, versions
      schedule.safetensors      instance indices, latents (and generated labels) of the window's steps
      eval_latents.safetensors  fixed latents (and labels) for metrics on the valid and test splits
      checkpoints/step_*.safetensors   full state (params + optimizer [+ average]) at steps
      losses.jsonl              one line per training step
      splits.json               the instance keys of each split and where the data came from

A run is written under ``RUN.partial`` (locked by its writer) and renamed only when complete, with
``"status": "complete"`` in run.json, so an interrupted run is never taken for a finished one. run.json
records the sha256 and size of every other file and is sealed (``gancleanse.integrity``); every read below
verifies the bytes it parses and reads a regular file, never more than run.json records. The format's facts
and checks live in ``run_format``, the (de)serialization of states in ``state_files``; this module opens a
run and serves what it recorded.
"""

from __future__ import annotations

import copy
import json
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch

from . import device as devices
from .config import Config
from .data import Splits, load_data
from .data.base import SPLIT_NAMES, as_float
from .errors import ConfigError, RunDirError
from .integrity import read_verified
from .models import GANModules, build_models
from .models.trainable import freeze
from .run_format import (DTYPES, EVAL_SPLITS, FROZEN_FILE, check_label_tensors, check_meta_against_config,
                         check_sizes, checkpoint_name, is_index_tensor, read_meta)
from .state_files import parse_tensors, to_device, unflatten_state
from .training.dynamics import Dynamics, State, StepBatch, gather_batch
from .training.schedule import Schedule


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


def read_recorded(path: Path, meta: dict[str, Any], name: str) -> bytes:
    """The bytes of the run's file ``name``, verified against its recorded sha256 and read up to its recorded size
    (a run from before sizes were recorded: the cap of its kind)."""
    return read_verified(path, name, meta["files"].get(name), meta.get("sizes", {}).get(name))


@dataclass
class Run:
    """A finished run directory, opened for reading: ``Run.open`` checks run.json's seal and the
    config, every file is checked against its sha256 as it is read, ``gancleanse verify`` checks all."""

    path: Path
    cfg: Config
    meta: dict[str, Any]
    extractor: str | None = None  # a TorchScript file the user named explicitly (it runs code)
    device: torch.device = torch.device("cpu")  # where replays, influence and metrics compute
    features: str | None = None  # the metrics' feature space when given at open (else [metric] features)

    @classmethod
    def open(cls, path: str | Path, models: GANModules | None = None, extractor: str | Path | None = None,
             device: str | None = None, features: str | None = None) -> "Run":
        """Open a finished run; ``models`` are required for runs trained with user modules.
        ``extractor``: the TorchScript feature extractor for is/fid/kid. Loading one runs code, so it is
        never taken from the run's stored config: a run whose config names one needs it named here (the
        CLI's ``--extractor``). ``device``: where to compute (default: ``train.device``); another kind
        than the recorded one works, with a warning (not bitwise). ``features``: the metrics' feature space
        (``gancleanse.features``; default ``[metric] features``)."""
        path = Path(path)
        if not path.is_dir():
            partial = path.with_name(path.name + ".partial")
            hint = f" ({partial} exists: that run did not finish)" if partial.exists() else ""
            raise RunDirError(f"run directory not found: {path}{hint}")
        meta = read_meta(path)
        text = read_recorded(path, meta, "config.toml")
        try:
            cfg = Config.from_dict(tomllib.loads(text.decode("utf-8")), source=str(path / "config.toml"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f"{path / 'config.toml'}: unreadable ({e})") from None
        check_meta_against_config(meta, cfg, str(path / "run.json"))
        check_sizes(cfg)  # a crafted config must not make a reader allocate what the machine cannot hold
        chosen = devices.use(devices.resolve(device or cfg.train.device))
        devices.warn_if_other_kind(str(meta.get("device", "cpu")), chosen, path)
        run = cls(path, cfg, meta, None if extractor is None else str(extractor), chosen, features)
        if models is not None:
            if models.conditional != cfg.model.conditional:
                raise ConfigError(f"{path} was trained with {'' if cfg.model.conditional else 'un'}conditional "
                                  f"modules; these are {'' if models.conditional else 'un'}conditional "
                                  "(GANModules(..., conditional=...))")
            run.__dict__["models"] = run.with_constants(models).to(chosen)  # fills the cached property
        return run

    def __getstate__(self) -> dict[str, Any]:
        """Pickle what reopens the run in another process (caches are rebuilt there)."""
        state = {key: getattr(self, key) for key in ("path", "cfg", "meta", "extractor", "device", "features")}
        if self.cfg.model.arch == "custom":
            state["models"] = self.models
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        devices.use(self.device)

    @property
    def id(self) -> str:
        """The run's identity: the seal of its run.json, which hashes every file of the run."""
        return self.meta["seal"]

    def read(self, name: str) -> bytes:
        """The verified bytes of the run's file ``name`` (relative, e.g. "checkpoints/step_...")."""
        return read_recorded(self.path, self.meta, name)

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The run's safetensors file ``name``: verified, parsed and finite."""
        return parse_tensors(self.read(name), f"{name} in {self.path}")

    # --- derived objects -------------------------------------------------------
    @cached_property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.model.dtype]

    @cached_property
    def recorded_splits(self) -> dict[str, Any]:
        """splits.json: the data source and every split's instance keys."""
        label = f"splits.json in {self.path}"
        try:
            record = json.loads(self.read("splits.json").decode("utf-8"))
        except ValueError as e:
            raise RunDirError(f"{label}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in SPLIT_NAMES):
            raise RunDirError(f"{label}: no key list for every split")
        return record

    @cached_property
    def splits(self) -> Splits:
        """The run's data: stored in the run for user data, else reloaded and checked unchanged."""
        if self.cfg.data.name == "custom":
            keys = {k: self.recorded_splits[k] for k in SPLIT_NAMES}
            try:
                return Splits(**self.read_tensors("data.safetensors"), keys=keys)
            except TypeError as e:
                raise RunDirError(f"data.safetensors in {self.path}: unexpected tensors ({e})") from None
        splits = load_data(self.cfg)
        if splits.fingerprint() != self.meta["data_fingerprint"]:
            raise RunDirError(f"the data of {self.path} changed since training "
                              f"(fingerprint {splits.fingerprint()} != {self.meta['data_fingerprint']})")
        return splits

    @cached_property
    def models(self) -> GANModules:
        """The built-in architecture the config names (user modules must be given to ``open``)."""
        if self.cfg.model.arch == "custom":
            raise RunDirError(f"{self.path} was trained with user-supplied modules: open it with "
                              "gancleanse.Run.open(path, models=GANModules(generator, discriminator, z_dim))")
        return self.with_constants(build_models(self.cfg, self.splits.sample_shape,
                                                self.splits.n_classes)).to(self.device)

    def with_constants(self, models: GANModules) -> GANModules:
        """``models`` with the run's frozen parameters put in (a run without any: unchanged)."""
        if FROZEN_FILE in self.meta["files"]:
            flat = self.read_tensors(FROZEN_FILE)
            freeze(models, {player: {k[2:]: v for k, v in flat.items() if k.startswith(player + "/")}
                            for player in ("d", "g")})
        return models

    @cached_property
    def dynamics(self) -> Dynamics:
        return Dynamics.from_config(self.cfg, self.models)

    @cached_property
    def x_train(self) -> torch.Tensor:
        """The whole training split as model values on the device (AID's operator)."""
        return as_float(self._train_stored, self.dtype)

    @cached_property
    def _train_stored(self) -> torch.Tensor:
        """The training split as stored (uint8 for images) on the device: steps gather and decode there."""
        return self.splits.train.to(self.device)

    @property
    def conditional(self) -> bool:
        return self.cfg.model.conditional

    @cached_property
    def label_frequencies(self) -> torch.Tensor | None:
        """The training labels' class frequencies, which generated labels follow (conditional runs)."""
        return self.splits.label_frequencies() if self.conditional else None

    @cached_property
    def y_train(self) -> torch.Tensor | None:
        """The training labels on the device (conditional runs; None otherwise)."""
        return self.splits.y_train.to(self.device) if self.conditional else None

    def labels(self, split: str) -> torch.Tensor | None:
        """A split's labels on the device, as the conditional discriminator sees them (else None)."""
        return self.splits.labels(split).to(self.device) if self.conditional else None

    def real(self, split: str) -> torch.Tensor:
        """A whole split as float64 model values on the device (what metrics compare with)."""
        return as_float(self.splits.split_stored(split).to(self.device), torch.float64)

    @cached_property
    def train_keys(self) -> list[str]:
        """Each training instance's stable key (relative path, or ``#i``), by index."""
        return self.splits.key_list("train")

    @property
    def has_features(self) -> bool:
        """Whether the metrics have a feature space (is/fid/kid, ``--features`` other than raw): images, or an
        extractor named at ``open`` (``gancleanse.features.has_features``)."""
        from .features import has_features

        return has_features(self)

    def with_features(self, space: str | None) -> "Run":
        """This run with its metrics in feature space ``space`` (None: unchanged); caches are shared."""
        if space is None or space == self.features:
            return self
        from .features import check_space

        other = copy.copy(self)
        other.features = check_space(space)
        other.__dict__.pop("_feature_models", None)
        return other

    @property
    def feature_space(self) -> str | None:
        """The metrics' feature space where its network can load, else None (``gancleanse.features.usable_space``)."""
        from .features import usable_space

        return usable_space(self)

    @cached_property
    def _schedule(self) -> dict[str, torch.Tensor]:
        """The recorded window's indices and latents, checked against the window's shape."""
        recorded = self.read_tensors("schedule.safetensors")
        label = f"schedule.safetensors in {self.path}"
        steps, batch_size, z_dim = self.final_step - self.window_start, self.cfg.train.batch_size, self.cfg.model.z_dim
        players = ("d",) if self.cfg.train.update == "simultaneous" else ("d", "g")  # shared latents: stored once
        shapes = {"indices": (steps, batch_size), **{f"z_{p}": (steps, batch_size, z_dim) for p in players},
                  **({f"c_{p}": (steps, batch_size) for p in players} if self.conditional else {})}
        for key, shape in shapes.items():
            if key not in recorded:
                raise RunDirError(f"{label}: no {key!r} tensor")
            if tuple(recorded[key].shape) != shape:
                raise RunDirError(f"{label}: {key} has shape {tuple(recorded[key].shape)}, the window needs {shape}")
        if not is_index_tensor(recorded["indices"], self.n_train):
            raise RunDirError(f"{label}: instance indices must be int64 in 0..{self.n_train - 1}")
        if self.conditional:
            check_label_tensors(recorded, ("c_d", "c_g"), self.splits.n_classes, label)
        return recorded

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
        """The first step of ``epoch``, which must lie in the recorded window."""
        step = epoch * self.steps_per_epoch
        if not self.window_start <= step < self.final_step:
            raise RunDirError(f"epoch {epoch} is outside the recorded window "
                              f"(epochs {self.window_start // self.steps_per_epoch}..{self.cfg.train.epochs - 1})")
        return step

    @cached_property
    def schedule(self) -> Schedule:
        """The generator of every step's indices and latents (the window is also recorded)."""
        train = self.cfg.train
        return Schedule(self.n_train, train.batch_size, self.cfg.model.z_dim, train.seed,
                        shared_latents=train.update == "simultaneous", label_frequencies=self.label_frequencies)

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
        """Everything step ``step`` consumes, on the device (recorded in the window, else regenerated)."""
        self._check_step(step)
        if step < self.window_start:
            latents, labels = self.schedule.latents(step), self.schedule.labels(step)
        else:  # recorded, already on the device
            i, window = step - self.window_start, self._window_latents
            z_d, c_d = window["z_d"][i], (window["c_d"][i] if "c_d" in window else None)
            latents = (z_d, window["z_g"][i] if "z_g" in window else z_d)
            labels = (c_d, window["c_g"][i] if "c_g" in window else c_d)
        return gather_batch(self._train_stored, self.y_train, self.indices(step), step, latents, labels,
                            self.device, self.dtype)

    @cached_property
    def _window_latents(self) -> dict[str, torch.Tensor]:
        """The recorded window's latents in the model's dtype (and generated labels), on the device."""
        return {k: v.to(self.device) if k.startswith("c_") else v.to(self.device, self.dtype)
                for k, v in self._schedule.items() if k != "indices"}

    def load_state(self, step: int) -> State:
        """The verified checkpoint at ``step`` (finite, as training wrote it)."""
        if step not in self.checkpoint_steps:
            raise RunDirError(f"no checkpoint at step {step} in {self.path}")
        return to_device(unflatten_state(self.read_tensors(f"checkpoints/{checkpoint_name(step)}")), self.device)

    def final_state(self) -> State:
        """The state training ended with."""
        return self.load_state(self.final_step)

    @cached_property
    def _eval_latents(self) -> dict[str, torch.Tensor]:
        """eval_latents.safetensors, checked against the metric's sample count and z_dim."""
        stored = self.read_tensors("eval_latents.safetensors")
        label = f"eval_latents.safetensors in {self.path}"
        n_samples = self.cfg.metric.n_samples
        shape = (n_samples, self.cfg.model.z_dim)
        for split in EVAL_SPLITS:
            if split not in stored or tuple(stored[split].shape) != shape:
                raise RunDirError(f"{label}: {split!r} must have shape {shape}")
            labels = stored.get(f"{split}_labels")
            if self.conditional and (labels is None or tuple(labels.shape) != (n_samples,)):
                raise RunDirError(f"{label}: {split + '_labels'!r} must have shape ({n_samples},)")
        if self.conditional:
            check_label_tensors(stored, tuple(f"{split}_labels" for split in EVAL_SPLITS), self.splits.n_classes, label)
        return stored

    def eval_latents(self, split: str) -> torch.Tensor:
        """The fixed evaluation latents of ``split`` in the model's dtype, on the device."""
        return self._eval_latents[split].to(self.device, self.dtype)

    def eval_labels(self, split: str) -> torch.Tensor | None:
        """The fixed labels of the evaluation samples on ``split`` (conditional runs; else None)."""
        return self._eval_latents[f"{split}_labels"].to(self.device) if self.conditional else None


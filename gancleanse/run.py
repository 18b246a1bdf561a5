"""The run directory: what training records and what every later command reads.

Layout (all tensors in safetensors)::

    RUN/
      config.toml               the resolved config (every default explicit)
      run.json                  status, sizes, the recorded window, checkpoint steps, versions
      schedule.safetensors      instance indices and latents (and a conditional GAN's generated
                                labels) of every step in the window
      eval_latents.safetensors  fixed latents (and labels) for metrics on the valid and test splits
      checkpoints/step_*.safetensors   full state (params + optimizer [+ average]) at steps
      losses.jsonl              one line per training step
      splits.json               the instance keys of each split and where the data came from

A run is written under ``RUN.partial`` (locked by its writer) and renamed only when
complete, and ``run.json`` carries ``"status": "complete"``, so an interrupted run is never
taken for a finished one. ``run.json`` records the sha256 of every other file and is sealed
(``gancleanse.integrity``); every read below verifies the bytes it parses, and the derived
numbers of ``run.json`` must agree with the config they derive from.
"""

from __future__ import annotations

import json
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from . import device as devices
from .config import Config
from .data import Splits, load_data
from .data.base import SPLIT_NAMES, as_float
from .errors import ConfigError, RunDirError
from .integrity import read_verified, seal_of
from .models import GANModules, build_models
from .training.dynamics import Dynamics, State, StepBatch
from .training.schedule import Schedule, eval_labels, eval_latents

FORMAT_VERSION = 2  # 2: content hashes and seal in run.json
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
    """Checkpoints are written from CPU copies, so a run opens on any device."""
    save_file({k: v.detach().cpu() for k, v in flatten_state(state).items()}, str(path))


def to_device(tree: Any, device: torch.device) -> Any:
    """A state (nested dicts of tensors) on ``device``."""
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(to_device(v, device) for v in tree)
    return tree.to(device)


def parse_tensors(data: bytes, label: str) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors, with a parse failure named by ``label``."""
    try:
        return load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types
        raise RunDirError(f"{label}: not a readable safetensors file ({e})") from None


def check_finite_tensors(tensors: dict[str, torch.Tensor], label: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RunDirError(f"{label}: non-finite values in {key}")


def window_checkpoints(window_start: int, total: int, every: int, steps_per_epoch: int) -> list[int]:
    """Checkpoint steps: the window start, every ``every`` steps, every epoch start, the end."""
    steps = set(range(window_start, total, every))
    steps |= {s for s in range(window_start, total) if s % steps_per_epoch == 0}
    steps |= {0, window_start, total}
    return sorted(steps)


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


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a gancleanse run (its run.json says so), whatever its state."""
    try:
        meta = json.loads((path / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta and "status" in meta and "n_train" in meta


FROZEN_FILE = "frozen.safetensors"  # parameters that do not train: constants, saved once


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


# ---------------------------------------------------------------------------- reader
META_FIELDS: dict[str, type] = {
    "format": int, "status": str, "threads": int, "n_train": int, "steps_per_epoch": int,
    "total_steps": int, "window": dict, "checkpoints": list, "data_fingerprint": str, "files": dict,
    "seal": str,
}


def read_meta(path: Path) -> dict[str, Any]:
    """run.json of ``path``: parsed, complete, of this format, sealed, with well-typed fields."""
    meta_path = path / "run.json"
    if not meta_path.is_file():
        raise RunDirError(f"{path} is not a gancleanse run directory (no run.json)")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
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
    return meta


def check_meta_against_config(meta: dict[str, Any], cfg: Config, label: str) -> None:
    """The numbers run.json derives from the config must be the ones the config gives."""
    t = cfg.train
    n = cfg.data.n_train
    spe = n // t.batch_size if n else 0
    expected = {
        "n_train": n, "steps_per_epoch": spe, "total_steps": t.epochs * spe, "threads": t.threads,
        "window": {"start_epoch": t.record_from_epoch, "start_step": (t.record_from_epoch or 0) * spe,
                   "end_step": t.epochs * spe},
    }
    for key, value in expected.items():
        if meta[key] != value:
            raise RunDirError(f"{label}: {key} = {meta[key]!r} disagrees with config.toml ({value!r})")
    ckpts = window_checkpoints(expected["window"]["start_step"], expected["total_steps"], t.checkpoint_every, spe)
    if meta["checkpoints"] != ckpts:
        raise RunDirError(f"{label}: the checkpoint steps disagree with config.toml")
    for name in ["config.toml", "schedule.safetensors", "eval_latents.safetensors", "splits.json",
                 *(f"checkpoints/{checkpoint_name(c)}" for c in ckpts)]:
        if not isinstance(meta["files"].get(name), str):
            raise RunDirError(f"{label}: no sha256 recorded for {name}")


def gather_batch(stored: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor, step: int,
                 latents: tuple[torch.Tensor, torch.Tensor],
                 gen_labels: tuple[torch.Tensor | None, torch.Tensor | None],
                 device: torch.device, dtype: torch.dtype) -> StepBatch:
    """Step ``step``'s batch: minibatch ``idx`` of the stored training split (and its labels),
    gathered on ``device`` and made floats there, with the step's latents and generated
    labels. The one assembly that training and every replay share."""
    on = idx.to(device)
    (z_d, z_g), (c_d, c_g) = latents, gen_labels
    return StepBatch(as_float(stored[on], dtype), z_d.to(device, dtype), z_g.to(device, dtype), step,
                     None if labels is None else labels[on],
                     None if c_d is None else c_d.to(device), None if c_g is None else c_g.to(device))


@dataclass
class Run:
    """A finished run directory, opened for reading.

    Every file is verified against run.json's sha256 as it is read; ``Run.open`` checks
    run.json's seal and the config. ``verify`` (``gancleanse verify``) checks everything.
    """

    path: Path
    cfg: Config
    meta: dict[str, Any]
    extractor: str | None = None  # a TorchScript file the user named explicitly (it runs code)
    device: torch.device = torch.device("cpu")  # where replays, influence and metrics compute

    @classmethod
    def open(cls, path: str | Path, models: GANModules | None = None, extractor: str | Path | None = None,
             device: str | None = None) -> "Run":
        """Open a finished run; ``models`` are required for runs trained with user modules.

        ``extractor``: the TorchScript feature extractor for is/fid/kid. Loading one runs
        code, so it is never taken from the run directory's stored config: a run whose
        config names one needs it named here (the CLI's ``--extractor``).
        ``device``: where to compute (default: the config's ``train.device``); a device of
        another kind than the recorded one works, with a warning (not bitwise).
        """
        path = Path(path)
        if not path.is_dir():
            partial = path.with_name(path.name + ".partial")
            hint = f" ({partial} exists: that run did not finish)" if partial.exists() else ""
            raise RunDirError(f"run directory not found: {path}{hint}")
        meta = read_meta(path)
        text = read_verified(path, "config.toml", meta["files"].get("config.toml"))
        try:
            cfg = Config.from_dict(tomllib.loads(text.decode("utf-8")), source=str(path / "config.toml"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f"{path / 'config.toml'}: unreadable ({e})") from None
        check_meta_against_config(meta, cfg, str(path / "run.json"))
        chosen = devices.use(devices.resolve(device or cfg.train.device))
        devices.warn_if_other_kind(str(meta.get("device", "cpu")), chosen, path)
        run = cls(path, cfg, meta, None if extractor is None else str(extractor), chosen)
        if models is not None:
            if models.conditional != cfg.model.conditional:
                raise ConfigError(f"{path} was trained with {'' if cfg.model.conditional else 'un'}conditional "
                                  f"modules; these are {'' if models.conditional else 'un'}conditional "
                                  "(GANModules(..., conditional=...))")
            run.__dict__["models"] = run.with_constants(models).to(chosen)  # fills the cached property
        return run

    def __getstate__(self) -> dict[str, Any]:
        """Pickle what reopens the run in another process (caches are rebuilt there)."""
        state = {"path": self.path, "cfg": self.cfg, "meta": self.meta, "extractor": self.extractor,
                 "device": self.device}
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
        return read_verified(self.path, name, self.meta["files"].get(name))

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = parse_tensors(self.read(name), f"{name} in {self.path}")
        check_finite_tensors(tensors, f"{name} in {self.path}")
        return tensors

    # --- derived objects -------------------------------------------------------
    @cached_property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.model.dtype]

    @cached_property
    def recorded_splits(self) -> dict[str, Any]:
        """splits.json: the data source and every split's instance keys."""
        label = f"splits.json in {self.path}"
        try:
            rec = json.loads(self.read("splits.json").decode("utf-8"))
        except ValueError as e:
            raise RunDirError(f"{label}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), list) for k in SPLIT_NAMES):
            raise RunDirError(f"{label}: no key list for every split")
        return rec

    @cached_property
    def splits(self) -> Splits:
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
        if self.cfg.model.arch == "custom":
            raise RunDirError(f"{self.path} was trained with user-supplied modules: open it with "
                              "gancleanse.Run.open(path, models=GANModules(generator, discriminator, z_dim))")
        return self.with_constants(build_models(self.cfg, self.splits.sample_shape,
                                                self.splits.n_classes)).to(self.device)

    def with_constants(self, models: GANModules) -> GANModules:
        """``models`` with the run's frozen parameters put in (a run without any: unchanged)."""
        if FROZEN_FILE in self.meta["files"]:
            from .models.trainable import freeze

            flat = self.read_tensors(FROZEN_FILE)
            freeze(models, {p: {k[2:]: v for k, v in flat.items() if k.startswith(p + "/")} for p in ("d", "g")})
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
        """The training split as stored (uint8 for images), moved to the device once: steps
        gather and decode their minibatch there."""
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

    @cached_property
    def _schedule(self) -> dict[str, torch.Tensor]:
        """The recorded window's indices and latents, checked against the window's shape."""
        sched = self.read_tensors("schedule.safetensors")
        label = f"schedule.safetensors in {self.path}"
        steps, b, z_dim = self.final_step - self.window_start, self.cfg.train.batch_size, self.cfg.model.z_dim
        shapes = {"indices": (steps, b), "z_d": (steps, b, z_dim)}
        if self.cfg.train.update != "simultaneous":
            shapes["z_g"] = (steps, b, z_dim)
        if self.conditional:
            shapes["c_d"] = (steps, b)
            if self.cfg.train.update != "simultaneous":
                shapes["c_g"] = (steps, b)
        for key, shape in shapes.items():
            if key not in sched:
                raise RunDirError(f"{label}: no {key!r} tensor")
            if tuple(sched[key].shape) != shape:
                raise RunDirError(f"{label}: {key} has shape {tuple(sched[key].shape)}, the window needs {shape}")
        idx = sched["indices"]
        if idx.dtype != torch.int64 or (idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < self.n_train)):
            raise RunDirError(f"{label}: instance indices must be int64 in 0..{self.n_train - 1}")
        if self.conditional:
            check_label_tensors(sched, ("c_d", "c_g"), self.splits.n_classes, label)
        return sched

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
                        shared_latents=t.update == "simultaneous", label_frequencies=self.label_frequencies)

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
            latents, labels = self.schedule.latents(step), self.schedule.labels(step)
        else:  # recorded, already on the device
            i = step - self.window_start
            rec = self._window_latents
            z_d = rec["z_d"][i]
            c_d = rec["c_d"][i] if "c_d" in rec else None
            latents = (z_d, rec["z_g"][i] if "z_g" in rec else z_d)
            labels = (c_d, rec["c_g"][i] if "c_g" in rec else c_d)
        return gather_batch(self._train_stored, self.y_train, self.indices(step), step, latents, labels,
                            self.device, self.dtype)

    @cached_property
    def _window_latents(self) -> dict[str, torch.Tensor]:
        """The recorded window's latents in the model's dtype (and generated labels), on the
        device (moved once)."""
        return {k: v.to(self.device) if k.startswith("c_") else v.to(self.device, self.dtype)
                for k, v in self._schedule.items() if k != "indices"}

    def load_state(self, step: int) -> State:
        """The verified checkpoint at ``step`` (finite, as training wrote it)."""
        if step not in self.checkpoint_steps:
            raise RunDirError(f"no checkpoint at step {step} in {self.path}")
        return to_device(unflatten_state(self.read_tensors(f"checkpoints/{checkpoint_name(step)}")), self.device)

    def final_state(self) -> State:
        return self.load_state(self.final_step)

    @cached_property
    def _eval_latents(self) -> dict[str, torch.Tensor]:
        z = self.read_tensors("eval_latents.safetensors")
        label = f"eval_latents.safetensors in {self.path}"
        n = self.cfg.metric.n_samples
        shape = (n, self.cfg.model.z_dim)
        for split in ("valid", "test"):
            if split not in z or tuple(z[split].shape) != shape:
                raise RunDirError(f"{label}: {split!r} must have shape {shape}")
            if self.conditional and (f"{split}_labels" not in z or tuple(z[f"{split}_labels"].shape) != (n,)):
                raise RunDirError(f"{label}: {split + '_labels'!r} must have shape ({n},)")
        if self.conditional:
            check_label_tensors(z, ("valid_labels", "test_labels"), self.splits.n_classes, label)
        return z

    def eval_latents(self, split: str) -> torch.Tensor:
        return self._eval_latents[split].to(self.device, self.dtype)

    def eval_labels(self, split: str) -> torch.Tensor | None:
        """The fixed labels of the evaluation samples on ``split`` (conditional runs; else None)."""
        return self._eval_latents[f"{split}_labels"].to(self.device) if self.conditional else None


def check_label_tensors(tensors: dict[str, torch.Tensor], names: tuple[str, ...], n_classes: int,
                        label: str) -> None:
    """Stored generated labels (those of ``names`` present) must be int64 classes of the data."""
    for name in names:
        c = tensors.get(name)
        if c is None:
            continue
        if c.dtype != torch.int64 or (c.numel() and not (0 <= int(c.min()) and int(c.max()) < n_classes)):
            raise RunDirError(f"{label}: {name} must hold int64 labels in 0..{n_classes - 1}")


def write_eval_latents(cfg: Config, stage: Path, label_frequencies: torch.Tensor | None = None) -> None:
    """The fixed evaluation latents of both splits, and generated labels for a conditional GAN."""
    cfg = cfg.resolved()
    m = cfg.metric
    z = {split: eval_latents(m.seed, split, m.n_samples, cfg.model.z_dim) for split in ("valid", "test")}
    if label_frequencies is not None:
        z.update({f"{split}_labels": eval_labels(m.seed, split, m.n_samples, label_frequencies)
                  for split in ("valid", "test")})
    save_file(z, str(stage / "eval_latents.safetensors"))

"""Training with recording: runs the pure step over the whole schedule and writes a run directory.

Recorded for the window [record_from_epoch, epochs): each step's indices and latents, and checkpoints
every ``checkpoint_every`` steps plus every epoch boundary, so that the reverse pass replays short
segments instead of holding steps x parameters in memory. By default every step's state is kept while the
window's states fit 2 GB (``run_format.default_checkpoint_interval``): the reverse pass then needs one step's
graph at a time and no replay to find where a stretch starts. Resume checkpoints (``resume.py``) let a killed
training continue where it stopped when rerun, and finish with the same files as one never stopped."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from ..version import __version__
from .. import device as devices
from ..config import Config
from ..device import check_threads
from ..data import Splits, load_data
from ..data.base import SPLIT_NAMES
from ..errors import ConfigError, TrainingDivergedError
from ..models import GANModules, build_models
from ..models.trainable import freeze, read_init, select_trainable, split_trainable
from ..progress import StepCallback
from ..integrity import check_fits, file_hashes, file_sizes, sealed
from ..files import staged_directory, write_json_atomic
from ..run import Run, torch_threads
from ..run_format import (DTYPES, FORMAT_VERSION, FROZEN_FILE, check_sizes, checkpoint_name,
                          default_checkpoint_interval, is_run_dir, window_checkpoints, write_eval_latents)
from ..state_files import save_state, save_tensors, to_device, writing
from .dynamics import Dynamics, State, gather_batch
from .resume import RESUME_FILE, Progress, ResumeRule, check_resumable, fingerprint, load_resume, save_resume
from .schedule import Schedule


def check_finite(state: State, stats: dict[str, torch.Tensor], step: int, steps_per_epoch: int) -> None:
    """Raise if a loss or a parameter is NaN or infinite (one host sync when all is well)."""
    named = {**stats, **{f"{p}/{k}": v for p in ("d", "g") for k, v in state[p].items()}}
    if bool(torch.stack([torch.isfinite(v).all() for v in named.values()]).all()):
        return
    bad = [k for k in stats if not torch.isfinite(stats[k]).all()] or [
        k for k, v in named.items() if not torch.isfinite(v).all()]
    if bad:
        values = ", ".join(f"{k} = {float(v):.4g}" for k, v in stats.items())
        raise TrainingDivergedError(f"non-finite value in {', '.join(bad)} at step {step} "
                                    f"(epoch {step // steps_per_epoch}; {values}); "
                                    "lower the learning rates or use a bounded loss")


def with_user_inputs(cfg: Config, models: GANModules | None, data: Splits | None) -> Config:
    """The config of a run whose modules and/or data come from the Python API."""
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, name="custom", path=None, **{f"n_{name}": getattr(data, name).shape[0] for name in SPLIT_NAMES}))
    if models is not None:
        if cfg.model.conditional and not models.conditional:
            raise ConfigError("model.conditional = true, but the modules are not: pass "
                              "GANModules(G, D, z_dim, conditional=True) for G(z, y) and D(x, y)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="custom", z_dim=models.z_dim,
                                                                 conditional=models.conditional))
    cfg.validate("the training options")
    cfg.check_inputs()
    return cfg


def with_split_sizes(cfg: Config, splits: Splits) -> Config:
    """The config with the split sizes the data gave (an unset n_train takes the rest), checked."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, **{f"n_{name}": int(getattr(splits, name).shape[0]) for name in SPLIT_NAMES}))
    cfg.validate("the training options")
    return cfg


def data_summary(splits: Splits) -> dict:
    """What run.json says of the data: split sizes, and for image files how many were read or skipped."""
    out: dict = {name: int(getattr(splits, name).shape[0]) for name in SPLIT_NAMES}
    out.update(sample_shape=list(splits.sample_shape), dtype=str(splits.train.dtype).removeprefix("torch."))
    if (source := splits.source) is not None:
        out.update(format=source["format"], path=source["path"], n_files=source["n_files"],
                   n_read=source["n_read"], n_skipped=len(source["skipped"]), labels=source["labels"])
    return out


def start_parameters(cfg: Config, models: GANModules, initial: tuple[dict, dict]
                     ) -> tuple[tuple[dict, dict], dict, dict[str, torch.Tensor]]:
    """The starting (trainable D, trainable G), what run.json records of the init files, and
    the frozen constants (flat ``d/<name>`` / ``g/<name>``), which go into the modules."""
    model = cfg.model
    params, init_files = read_init(model, {"d": initial[0], "g": initial[1]})
    config_chooses = model.train_only is not None or bool(model.frozen)  # else the modules' own choice
    train_only, frozen = (model.train_only, model.frozen) if config_chooses else (models.train_only, models.frozen)
    trainable, constants = split_trainable(params, select_trainable(params, train_only, frozen))
    freeze(models, constants)
    flat = {f"{player}/{name}": value for player in ("d", "g") for name, value in constants[player].items()}
    return (trainable["d"], trainable["g"]), init_files, flat


WINDOW_DRAWS = ("indices", "z_d", "z_g", "c_d", "c_g")  # what each window step records, in this order


@dataclass
class Training:
    """What the step loop and the run directory need, from config, data and modules (on the training device)."""

    cfg: Config
    splits: Splits
    models: GANModules
    dynamics: Dynamics
    schedule: Schedule
    initial: tuple[dict, dict]  # the trainable (D, G) parameters training starts from
    init_files: dict  # what run.json records of [model] init files
    constants: dict[str, torch.Tensor]  # frozen parameters, flat d/<name>, g/<name>
    frequencies: torch.Tensor | None  # the training labels' class frequencies (conditional GANs)
    device: torch.device
    dtype: torch.dtype
    threads: int
    data_fingerprint: str  # run.json's hash of the data, computed once

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.steps_per_epoch

    @property
    def window_start(self) -> int:
        return self.cfg.train.record_from_epoch * self.steps_per_epoch

    @property
    def checkpoints(self) -> list[int]:
        return window_checkpoints(self.window_start, self.total_steps, self.cfg.train.checkpoint_every,
                                  self.steps_per_epoch)

    def check_window_fits(self) -> None:
        """The window's draws stay in memory until training ends, then are stacked (twice their size): refused
        before the first step when the memory available cannot hold them."""
        steps, train, z_dim = self.total_steps - self.window_start, self.cfg.train, self.cfg.model.z_dim
        players = 1 if self.schedule.shared_latents else 2
        per_step = train.batch_size * (8 + players * 8 * z_dim + (players * 8 if self.frequencies is not None else 0))
        check_fits("train.record_from_epoch", train.record_from_epoch, 2 * steps * per_step,
                   f"the recorded window's draws ({steps} steps from epoch {train.record_from_epoch})")


@dataclass
class Trajectory:
    """What the step loop leaves: the final state and losses, each window step's draws, and the timings."""

    state: State
    stats: dict[str, torch.Tensor]
    started: float  # perf_counter when the loop began
    window_seconds: float  # time spent in the window's steps (batch assembly and step)
    window: dict[str, list] = field(default_factory=lambda: {key: [] for key in WINDOW_DRAWS})


def prepare_training(cfg: Config, models: GANModules | None, data: Splits | None, device: torch.device
                     ) -> Training:
    """Load the data, build (or take) the modules and their starting parameters, on ``device``."""
    train, dtype = cfg.train, DTYPES[cfg.model.dtype]
    splits = data if data is not None else load_data(cfg)
    cfg = with_split_sizes(cfg, splits)
    frequencies = None
    if cfg.model.conditional:
        splits.check_conditional()
        frequencies = splits.label_frequencies()
    if models is None:
        models = build_models(cfg, splits.sample_shape, splits.n_classes)
        initial = models.initial_params(train.seed, dtype)
    else:
        initial = models.module_params(dtype)
    models.to(device)
    initial, init_files, constants = start_parameters(cfg, models, to_device(initial, device))
    schedule = Schedule(cfg.data.n_train, train.batch_size, cfg.model.z_dim, train.seed,
                        shared_latents=train.update == "simultaneous", label_frequencies=frequencies)
    dynamics = Dynamics.from_config(cfg, models)
    if cfg.train.checkpoint_every is None:  # the run's config.toml records the interval used
        window_steps = (train.epochs - train.record_from_epoch) * schedule.steps_per_epoch
        state_bytes = sum(t.numel() * t.element_size() for t in tree_leaves(dynamics.init_state(*initial)))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, checkpoint_every=default_checkpoint_interval(window_steps, state_bytes)))
    return Training(cfg, splits, models, dynamics, schedule, initial, init_files,
                    constants, frequencies, device, dtype, torch.get_num_threads(), splits.fingerprint())


def write_config(stage: Path, cfg: Config) -> None:
    with writing(stage / "config.toml"):
        (stage / "config.toml").write_text(cfg.to_toml())


def write_inputs(stage: Path, training: Training, data: Splits | None) -> None:
    """The files fixed before the first step: config, evaluation latents, user data, constants, split keys."""
    cfg, splits = training.cfg, training.splits
    with writing(stage / "checkpoints"):
        (stage / "checkpoints").mkdir()
    write_config(stage, cfg)
    write_eval_latents(cfg, stage, training.frequencies)
    if data is not None:
        save_tensors(data.tensors(), stage / "data.safetensors")
    if training.constants:
        save_tensors({k: v.detach().cpu().contiguous() for k, v in training.constants.items()}, stage / FROZEN_FILE)
    with writing(stage / "splits.json"):
        write_json_atomic(stage / "splits.json", {
            "source": splits.source, **{name: splits.key_list(name) for name in SPLIT_NAMES}})


def start_or_resume(stage: Path, training: Training, data: Splits | None) -> tuple[State, Progress]:
    """The state and progress to start from: a kept stage's resume checkpoint (its fingerprint checked when the stage
    was kept), else step 0 after writing the inputs. A resumed stage gets this config.toml: keys that do not change the
    trajectory (``resume_every``, ``[cleanse]``) may differ, and the run records the config that finished it."""
    if (stage / RESUME_FILE).is_file():
        write_config(stage, training.cfg)
        return load_resume(stage, training.dynamics.init_state(*training.initial), training.device)
    write_inputs(stage, training, data)
    return training.dynamics.init_state(*training.initial), Progress()


def step_draws(schedule: Schedule, step: int) -> tuple[torch.Tensor, tuple, tuple]:
    """Step ``step``'s (indices, latents, generated labels): what its batch uses and the window records."""
    return schedule.indices(step), schedule.latents(step), schedule.labels(step)


def run_steps(stage: Path, training: Training, progress: bool, start: tuple[State, Progress],
              fingerprint_now: dict[str, Any], on_step: StepCallback | None = None) -> Trajectory:
    """Every training step from the start's: checkpoints, the window's draws and resume checkpoints recorded, one
    loss line per step (the resumed steps' lines written again from the resume checkpoint); ``on_step(done, total)``
    at the start and after each step."""
    device, dtype, schedule, dynamics = training.device, training.dtype, training.schedule, training.dynamics
    total, window_start, checkpoints = training.total_steps, training.window_start, training.checkpoints
    steps_per_epoch = training.steps_per_epoch
    train_stored = training.splits.train.to(device)  # uint8 for images: a quarter of float32
    train_labels = training.splits.y_train.to(device) if training.frequencies is not None else None
    ones = torch.ones(training.cfg.train.batch_size, dtype=dtype, device=device)
    state, done = start
    trajectory = Trajectory(state, {}, time.perf_counter() - done.seconds, done.window_seconds)
    for step in range(window_start, done.step):  # the window's draws before the resume point, drawn again
        record_draws(trajectory, step_draws(schedule, step))
    rule = ResumeRule(training.cfg.train.resume_every, steps_per_epoch, total)
    bar = tqdm(total=total, initial=done.step, desc="train", unit="step", disable=not progress, leave=False)
    if on_step is not None:
        on_step(done.step, total)
    # a failed checkpoint write names the checkpoint (its error is no OSError); any other failed write is the log's
    with writing(stage / "losses.jsonl"), open(stage / "losses.jsonl", "w") as log:
        for step in range(done.step):
            log.write(done.log_line(step, steps_per_epoch))
        for step in range(done.step, total):
            if step in checkpoints:
                save_state(trajectory.state, stage / "checkpoints" / checkpoint_name(step))
            if step > done.step and rule.due(step):
                save_progress(stage, trajectory, done, step, fingerprint_now)
                rule.saved()
            idx, latents, labels = draws = step_draws(schedule, step)
            tic = time.perf_counter()
            batch = gather_batch(train_stored, train_labels, idx, step, latents, labels, device, dtype)
            trajectory.state, stats = dynamics.step(trajectory.state, batch, ones)
            trajectory.stats = stats
            if step >= window_start:
                trajectory.window_seconds += time.perf_counter() - tic
                record_draws(trajectory, draws)
            check_finite(trajectory.state, stats, step, steps_per_epoch)
            done.record({k: float(v) for k, v in stats.items()})
            log.write(done.log_line(step, steps_per_epoch))
            bar.update()
            if on_step is not None:
                on_step(step + 1, total)
            if step % 50 == 0:
                bar.set_postfix(loss_d=f"{float(stats['loss_d']):.3f}", loss_g=f"{float(stats['loss_g']):.3f}")
    bar.close()
    save_state(trajectory.state, stage / "checkpoints" / checkpoint_name(total))
    return trajectory


def record_draws(trajectory: Trajectory, draws: tuple[torch.Tensor, tuple, tuple]) -> None:
    idx, latents, labels = draws
    for key, drawn in zip(WINDOW_DRAWS, (idx, *latents, *labels)):
        trajectory.window[key].append(drawn)


def save_progress(stage: Path, trajectory: Trajectory, done: Progress, step: int, fingerprint_now: dict[str, Any]
                  ) -> None:
    """The resume checkpoint before step ``step``: the state, the losses so far and the time spent."""
    done.step, done.seconds = step, time.perf_counter() - trajectory.started
    done.window_seconds = trajectory.window_seconds
    save_resume(stage, trajectory.state, done, fingerprint_now)


def recorded_schedule(training: Training, trajectory: Trajectory) -> dict[str, torch.Tensor]:
    """schedule.safetensors: the window's indices and latents, and only the tensors that
    differ (a shared latent batch is stored once; labels only for a conditional GAN)."""
    shared, conditional = training.schedule.shared_latents, training.frequencies is not None
    return {key: torch.stack(trajectory.window[key]) for key in WINDOW_DRAWS
            if not (shared and key.endswith("_g")) and (conditional or not key.startswith("c_"))}


def run_meta(stage: Path, training: Training, trajectory: Trajectory, user_data: bool) -> dict[str, Any]:
    """run.json before its seal: versions, sizes, the window, the checkpoints and every file's sha256."""
    cfg, splits, constants, total = training.cfg, training.splits, training.constants, training.total_steps
    files = ["config.toml", "eval_latents.safetensors", "splits.json", "schedule.safetensors",
             "losses.jsonl", *(f"checkpoints/{checkpoint_name(c)}" for c in training.checkpoints)]
    files += (["data.safetensors"] if user_data else []) + ([FROZEN_FILE] if constants else [])
    frequencies = training.frequencies
    labels = {} if frequencies is None else {"labels": {"classes": splits.n_classes,
                                                        "frequencies": frequencies.tolist()}}
    return {
        "format": FORMAT_VERSION, "status": "complete", "gancleanse": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "threads": training.threads, **devices.describe(training.device),
        "n_train": cfg.data.n_train, "steps_per_epoch": training.steps_per_epoch, "total_steps": total,
        "window": {"start_epoch": cfg.train.record_from_epoch, "start_step": training.window_start,
                   "end_step": total},
        "checkpoints": training.checkpoints, "data_fingerprint": training.data_fingerprint,
        "data": data_summary(splits),
        **labels,
        "parameters": {player: {"trainable": sum(v.numel() for v in training.initial[i].values()),
                                "frozen": sum(v.numel() for k, v in constants.items() if k.startswith(player + "/"))}
                       for i, player in enumerate(("d", "g"))},
        "init": training.init_files,
        "seconds": {"train": time.perf_counter() - trajectory.started, "window_steps": trajectory.window_seconds},
        "final_losses": {k: float(v) for k, v in trajectory.stats.items()},
        "files": file_hashes(stage, files), "sizes": file_sizes(stage, files),
    }


def train(cfg: Config, out: str | Path, *, models: GANModules | None = None, data: Splits | None = None,
          force: bool = False, progress: bool = True, device: str | None = None,
          on_step: StepCallback | None = None) -> Run:
    """Train the GAN the config describes and record a run directory at ``out``. ``models`` / ``data``
    replace the config's architecture / dataset with the user's own modules (initialized as given) and
    tensors (saved in the run directory). ``device`` overrides ``train.device`` (and the config records it).
    ``on_step(done, total)``: called after each step (and at the start), for progress shown elsewhere.

    A training killed part-way leaves ``OUT.partial`` with a resume checkpoint: the same call resumes it (the same
    config keys that shape training, data, starting parameters and device; anything else is refused, naming it), and
    ``force`` starts over, replacing a finished ``out`` too."""
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    cfg = with_user_inputs(cfg, models, data)
    check_sizes(cfg)  # before the data or the evaluation latents are allocated
    cfg = cfg.resolved()
    check_threads(cfg.train.threads)
    on = devices.use(devices.resolve(cfg.train.device))
    with torch_threads(cfg.train.threads):
        training = prepare_training(cfg, models, data, on)
        training.check_window_fits()
        now = fingerprint(training.cfg, training.splits, training.data_fingerprint, training.initial,
                          training.constants, on)
        with staged_directory(Path(out), force=force, is_ours=is_run_dir,
                              resume=lambda stage: check_resumable(stage, now)) as stage:
            trajectory = run_steps(stage, training, progress, start_or_resume(stage, training, data), now, on_step)
            save_tensors(recorded_schedule(training, trajectory), stage / "schedule.safetensors")
            with writing(stage / "run.json"):
                write_json_atomic(stage / "run.json", sealed(run_meta(stage, training, trajectory, data is not None)))
            (stage / RESUME_FILE).unlink(missing_ok=True)  # the finished run holds what an uninterrupted one holds
    # The config came from the caller, so its extractor is explicitly theirs to load.
    return Run.open(out, models=training.models if training.cfg.model.arch == "custom" else None,
                    extractor=training.cfg.metric.extractor, device=str(on))

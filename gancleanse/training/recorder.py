"""Training with recording: runs the pure step over the whole schedule and writes a run directory.

Recorded for the window [record_from_epoch, epochs): each step's indices and latents, and
checkpoints every ``checkpoint_every`` steps plus every epoch boundary, so that the reverse
pass replays short segments instead of holding steps x parameters in memory.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..version import __version__
from .. import device as devices
from ..config import Config, check_threads
from ..data import Splits, load_data
from ..data.base import SPLIT_NAMES
from ..errors import ConfigError, TrainingDivergedError
from ..models import GANModules, build_models
from ..models.trainable import freeze, read_init, select_trainable, split_trainable
from ..integrity import file_hashes, sealed
from ..files import staged_directory, write_json_atomic
from ..run import (DTYPES, FORMAT_VERSION, FROZEN_FILE, Run, checkpoint_name, gather_batch, is_run_dir,
                   save_state, to_device, torch_threads, window_checkpoints, write_eval_latents)
from .dynamics import Dynamics, State
from .schedule import Schedule


def check_finite(state: State, stats: dict[str, torch.Tensor], step: int, steps_per_epoch: int) -> None:
    """Raise if a loss or a parameter is NaN or infinite (one host sync when all is well)."""
    named = {**stats, **{f"{p}/{k}": v for p in ("d", "g") for k, v in state[p].items()}}
    if bool(torch.stack([torch.isfinite(v).all() for v in named.values()]).all()):
        return
    bad = [k for k in stats if not torch.isfinite(stats[k]).all()]
    if not bad:
        bad = [k for k, v in named.items() if not torch.isfinite(v).all()]
    if bad:
        epoch = step // steps_per_epoch
        values = ", ".join(f"{k} = {float(v):.4g}" for k, v in stats.items())
        raise TrainingDivergedError(
            f"non-finite value in {', '.join(bad)} at step {step} (epoch {epoch}; {values}); "
            "lower the learning rates or use a bounded loss")


def with_user_inputs(cfg: Config, models: GANModules | None, data: Splits | None) -> Config:
    """The config of a run whose modules and/or data come from the Python API."""
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, name="custom", path=None, n_train=data.train.shape[0], n_valid=data.valid.shape[0],
            n_test=data.test.shape[0]))
    if models is not None:
        if cfg.model.conditional and not models.conditional:
            raise ConfigError("model.conditional = true, but the modules are not: pass "
                              "GANModules(G, D, z_dim, conditional=True) for G(z, y) and D(x, y)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="custom", z_dim=models.z_dim,
                                                                 conditional=models.conditional))
    cfg._check_cross("the training options")
    cfg.check_inputs()
    return cfg


def with_split_sizes(cfg: Config, splits: Splits) -> Config:
    """The config with the split sizes the data gave (an unset n_train takes the rest), checked."""
    n = {name: int(getattr(splits, name).shape[0]) for name in SPLIT_NAMES}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, n_train=n["train"], n_valid=n["valid"], n_test=n["test"]))
    cfg._check_cross("the training options")
    return cfg


def data_summary(splits: Splits) -> dict:
    """What run.json says of the data: split sizes, and for image files how many were read or skipped."""
    out: dict = {name: int(getattr(splits, name).shape[0]) for name in SPLIT_NAMES}
    out["sample_shape"] = list(splits.sample_shape)
    out["dtype"] = str(splits.train.dtype).removeprefix("torch.")
    if splits.source is not None:
        src = splits.source
        out.update(format=src["format"], path=src["path"], n_files=src["n_files"], n_read=src["n_read"],
                   n_skipped=len(src["skipped"]), labels=src["labels"])
    return out


def start_parameters(cfg: Config, models: GANModules, initial: tuple[dict, dict]
                     ) -> tuple[tuple[dict, dict], dict, dict[str, torch.Tensor]]:
    """The starting (trainable D, trainable G), what run.json records of the init files, and
    the frozen constants (flat ``d/<name>`` / ``g/<name>``), which go into the modules."""
    params = {"d": initial[0], "g": initial[1]}
    m = cfg.model
    params, init_files = read_init(m, params)
    train_only = m.train_only if (m.train_only is not None or m.frozen) else models.train_only
    frozen = m.frozen if (m.train_only is not None or m.frozen) else models.frozen
    trainable, const = split_trainable(params, select_trainable(params, train_only, frozen))
    freeze(models, const)
    flat = {f"{p}/{k}": v for p in ("d", "g") for k, v in const[p].items()}
    return (trainable["d"], trainable["g"]), init_files, flat


def train(cfg: Config, out: str | Path, *, models: GANModules | None = None, data: Splits | None = None,
          force: bool = False, progress: bool = True, device: str | None = None) -> Run:
    """Train the GAN the config describes and record a run directory at ``out``.

    ``models`` / ``data`` replace the config's architecture / dataset with the user's own
    modules (initialized as given) and tensors (saved in the run directory). ``device``
    overrides ``train.device`` (and is what the config records).
    """
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    cfg = with_user_inputs(cfg, models, data).resolved()
    t = cfg.train
    check_threads(t.threads)
    on = devices.use(devices.resolve(t.device))
    with torch_threads(t.threads):
        threads = torch.get_num_threads()
        dtype = DTYPES[cfg.model.dtype]
        splits = data if data is not None else load_data(cfg)
        cfg = with_split_sizes(cfg, splits)
        frequencies = None
        if cfg.model.conditional:
            splits.check_conditional()
            frequencies = splits.label_frequencies()
        if models is None:
            models = build_models(cfg, splits.sample_shape, splits.n_classes)
            initial = models.initial_params(t.seed, dtype)
        else:
            initial = models.module_params(dtype)
        models.to(on)
        initial, init_files, constants = start_parameters(cfg, models, to_device(initial, on))
        train_stored = splits.train.to(on)  # uint8 for images: a quarter of float32
        train_labels = splits.y_train.to(on) if frequencies is not None else None
        dyn = Dynamics.from_config(cfg, models)
        schedule = Schedule(cfg.data.n_train, t.batch_size, cfg.model.z_dim, t.seed,
                            shared_latents=t.update == "simultaneous", label_frequencies=frequencies)
        spe = schedule.steps_per_epoch
        total = t.epochs * spe
        window_start = t.record_from_epoch * spe
        ckpts = window_checkpoints(window_start, total, t.checkpoint_every, spe)
        ones = torch.ones(t.batch_size, dtype=dtype, device=on)

        with staged_directory(Path(out), force=force, is_ours=is_run_dir) as stage:
            (stage / "checkpoints").mkdir()
            (stage / "config.toml").write_text(cfg.to_toml())
            write_eval_latents(cfg, stage, frequencies)
            if data is not None:
                save_file(data.tensors(), str(stage / "data.safetensors"))
            if constants:
                save_file({k: v.detach().cpu().contiguous() for k, v in constants.items()},
                          str(stage / FROZEN_FILE))
            write_json_atomic(stage / "splits.json", {
                "source": splits.source, **{name: splits.key_list(name) for name in SPLIT_NAMES}})
            state = dyn.init_state(*initial)
            rec_idx, rec_zd, rec_zg, rec_cd, rec_cg = [], [], [], [], []
            started = time.perf_counter()
            window_seconds = 0.0
            bar = tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False)
            with open(stage / "losses.jsonl", "w") as log:
                for step in range(total):
                    if step in ckpts:
                        save_state(state, stage / "checkpoints" / checkpoint_name(step))
                    idx = schedule.indices(step)
                    (z_d, z_g), (c_d, c_g) = schedule.latents(step), schedule.labels(step)
                    tic = time.perf_counter()
                    batch = gather_batch(train_stored, train_labels, idx, step, (z_d, z_g), (c_d, c_g), on, dtype)
                    state, stats = dyn.step(state, batch, ones)
                    if step >= window_start:
                        window_seconds += time.perf_counter() - tic
                        rec_idx.append(idx)
                        rec_zd.append(z_d)
                        rec_zg.append(z_g)
                        rec_cd.append(c_d)
                        rec_cg.append(c_g)
                    check_finite(state, stats, step, spe)
                    log.write(json.dumps({"step": step, "epoch": step // spe,
                                          **{k: float(v) for k, v in stats.items()}}) + "\n")
                    bar.update()
                    if step % 50 == 0:
                        bar.set_postfix(loss_d=f"{float(stats['loss_d']):.3f}",
                                        loss_g=f"{float(stats['loss_g']):.3f}")
            bar.close()
            save_state(state, stage / "checkpoints" / checkpoint_name(total))
            sched = {"indices": torch.stack(rec_idx), "z_d": torch.stack(rec_zd)}
            if not schedule.shared_latents:
                sched["z_g"] = torch.stack(rec_zg)
            if frequencies is not None:
                sched["c_d"] = torch.stack(rec_cd)
                if not schedule.shared_latents:
                    sched["c_g"] = torch.stack(rec_cg)
            save_file(sched, str(stage / "schedule.safetensors"))
            files = ["config.toml", "eval_latents.safetensors", "splits.json", "schedule.safetensors",
                     "losses.jsonl", *(f"checkpoints/{checkpoint_name(c)}" for c in ckpts)]
            if data is not None:
                files.append("data.safetensors")
            if constants:
                files.append(FROZEN_FILE)
            write_json_atomic(stage / "run.json", sealed({
                "format": FORMAT_VERSION,
                "status": "complete",
                "gancleanse": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": threads,
                **devices.describe(on),
                "n_train": cfg.data.n_train,
                "steps_per_epoch": spe,
                "total_steps": total,
                "window": {"start_epoch": t.record_from_epoch, "start_step": window_start,
                           "end_step": total},
                "checkpoints": ckpts,
                "data_fingerprint": splits.fingerprint(),
                "data": data_summary(splits),
                **({} if frequencies is None else
                   {"labels": {"classes": splits.n_classes, "frequencies": frequencies.tolist()}}),
                "parameters": {p: {"trainable": sum(v.numel() for v in initial[i].values()),
                                   "frozen": sum(v.numel() for k, v in constants.items() if k.startswith(p + "/"))}
                               for i, p in enumerate(("d", "g"))},
                "init": init_files,
                "seconds": {"train": time.perf_counter() - started, "window_steps": window_seconds},
                "final_losses": {k: float(v) for k, v in stats.items()},
                "files": file_hashes(stage, files),
            }))
    # The config came from the caller, so its extractor is explicitly theirs to load.
    return Run.open(out, models=models if cfg.model.arch == "custom" else None, extractor=cfg.metric.extractor,
                    device=str(on))

"""``gancleanse verify``: check everything a run directory claims, down to a bitwise replay.

Opening a run already checks run.json's seal, the config's hash and the numbers run.json derives from
it; each later read checks the file it reads. ``verify_run`` reads all of them, compares the recorded
schedule and evaluation latents with the ones their seeds regenerate, and replays the recorded window
from its first checkpoint, comparing every checkpoint on the way bit for bit (on the recorded thread
count, on the CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import device as devices
from .data.base import SPLIT_NAMES
from .errors import RunDirError
from .run import Run, torch_threads
from .run_format import EVAL_SPLITS, checkpoint_name, read_meta
from .state_files import flatten_state
from .training.recorder import WINDOW_DRAWS, check_finite
from .training.schedule import eval_labels, eval_latents


def verify_run(run: Run, *, replay: bool = True, report: Callable[[str], None] = print,
               progress: bool = False) -> list[str]:
    """Check every file and claim of ``run``; raise RunDirError naming the first that fails.
    Returns (and passes to ``report``) one line per check that passed."""
    lines: list[str] = []

    def ok(line: str) -> None:
        lines.append(line)
        report(line)

    meta = run.meta
    ok(f"run.json: sealed, format {meta['format']}; n_train, window, total_steps, threads and checkpoint "
       "steps agree with config.toml")
    size = sum(len(run.read(name)) for name in sorted(meta["files"]))
    ok(f"{len(meta['files'])} files match the sha256 recorded in run.json ({size / 1e6:.1f} MB)")

    splits, recorded = run.splits, run.recorded_splits
    for name in SPLIT_NAMES:
        if len(recorded[name]) != (n_instances := int(getattr(splits, name).shape[0])):
            raise RunDirError(f"splits.json in {run.path}: {len(recorded[name])} {name} keys for {n_instances} "
                              "instances")
    if splits.train.shape[0] != run.n_train:
        raise RunDirError(f"run.json of {run.path}: n_train {run.n_train}, the data has {splits.train.shape[0]}")
    source = "data.safetensors" if run.cfg.data.name == "custom" else f"fingerprint {meta['data_fingerprint']}"
    ok(f"data: {source} matches; split sizes and splits.json keys agree")

    _check_schedule(run)
    ok(f"schedule.safetensors: {run.final_step - run.window_start} steps of indices and latents equal the "
       f"ones train.seed = {run.cfg.train.seed} regenerates")
    metric = run.cfg.metric
    for split in EVAL_SPLITS:
        if not torch.equal(run._eval_latents[split],
                           eval_latents(metric.seed, split, metric.n_samples, run.cfg.model.z_dim)):
            raise RunDirError(f"eval_latents.safetensors in {run.path}: the {split} latents are not the ones "
                              f"metric.seed = {metric.seed} gives")
        if run.conditional and not torch.equal(run._eval_latents[f"{split}_labels"], eval_labels(
                metric.seed, split, metric.n_samples, run.label_frequencies)):
            raise RunDirError(f"eval_latents.safetensors in {run.path}: the {split} labels are not the ones "
                              f"metric.seed = {metric.seed} draws from the training labels' frequencies")
    ok(f"eval_latents.safetensors: equal to the latents{' and labels' if run.conditional else ''} "
       f"metric.seed = {metric.seed} regenerates")

    for step in run.checkpoint_steps:
        run.load_state(step)
    ok(f"{len(run.checkpoint_steps)} checkpoints: readable and finite")

    if not replay:
        ok("replay: skipped")
        return lines
    if run.cfg.model.arch == "custom" and "models" not in run.__dict__:
        ok("replay: skipped (user modules: open the run with Run.open(path, models=...) to replay it)")
        return lines
    recorded = str(meta.get("device", "cpu"))
    if run.device.type != recorded:
        ok(f"replay: skipped (trained on {recorded}, opened on {run.device.type}: replays are bitwise only on "
           f"the device kind that trained; verify it with --device {recorded})")
        return lines
    n_checked = _replay_matches(run, progress)
    ok(f"replay: steps {run.window_start}..{run.final_step} from checkpoint {run.window_start} reproduce "
       f"{n_checked} checkpoint(s) bitwise (device {meta.get('device', 'cpu')}, {run.threads} thread(s))")
    return lines


def _check_schedule(run: Run) -> None:
    """The recorded window must be exactly what the training seed regenerates."""
    recorded = run._schedule  # shape and index range are checked as it loads
    regenerated = run.schedule
    for i, step in enumerate(range(run.window_start, run.final_step)):
        drawn = (regenerated.indices(step), *regenerated.latents(step), *regenerated.labels(step))
        if not all(torch.equal(recorded[key][i], value) for key, value in zip(WINDOW_DRAWS, drawn) if key in recorded):
            raise RunDirError(f"schedule.safetensors in {run.path}: step {step} differs from the minibatch and "
                              f"latents train.seed = {run.cfg.train.seed} gives")


def _replay_matches(run: Run, progress: bool) -> int:
    """Replay the window step by step; every checkpoint on the way must match bitwise."""
    dyn = run.dynamics
    ones = torch.ones(run.cfg.train.batch_size, dtype=run.dtype, device=run.device)
    checked = 0
    with torch_threads(run.threads), torch.no_grad():
        state = run.load_state(run.window_start)
        for step in tqdm(range(run.window_start, run.final_step), desc="replay", unit="step",
                         disable=not progress, leave=False):
            state, stats = dyn.step(state, run.batch(step), ones)
            check_finite(state, stats, step, run.steps_per_epoch)
            if step + 1 in run.checkpoint_steps:
                stored, replayed = flatten_state(run.load_state(step + 1)), flatten_state(state)
                differ = sorted(k for k in stored.keys() | replayed.keys()
                                if k not in stored or k not in replayed or not torch.equal(stored[k], replayed[k]))
                if differ:
                    raise RunDirError(f"checkpoints/{checkpoint_name(step + 1)} in {run.path} is not what replaying "
                                      f"the recorded steps gives ({', '.join(differ[:3])} differ)")
                checked += 1
    return checked


def open_for_replay(path: Path, device: str | None = None) -> Run:
    """Open a run on ``device``, by default on the kind of device that trained it (where present)."""
    return Run.open(path, device=device or devices.recorded_kind(str(read_meta(Path(path)).get("device", "cpu"))))


def verify_study(path: Path, *, replay: bool = True, report: Callable[[str], None] = print,
                 progress: bool = False) -> list[str]:
    """Verify every replicate's run of a study and that its stored scores and retrains name them."""
    from .study.layout import CHECK_FILE, STUDY_MARKER, is_study_dir, stored_run_id

    if not is_study_dir(path):
        raise RunDirError(f"{path} is neither a run directory (run.json) nor a study directory ({STUDY_MARKER})")
    run_ids: dict[str, str] = {}
    run_dirs = sorted(path.glob("seeds/seed_*/run")) + sorted(path.glob("export/run"))
    for run_dir in run_dirs:
        label = run_dir.relative_to(path).as_posix()
        run = open_for_replay(run_dir)
        verify_run(run, replay=replay, report=lambda line, label=label: report(f"{label}: {line}"), progress=progress)
        run_ids[run.id] = label
        check = run_dir.parent / CHECK_FILE
        for stored in sorted((run_dir.parent / "scores").glob("*.json")) + ([check] if check.is_file() else []):
            if stored_run_id(stored) != run.id:
                raise RunDirError(f"{stored}: these scores or checks name another run than {run_dir}")
    lines = [f"{len(run_dirs)} replicate run(s) verified"]
    report(lines[-1])
    parts = sorted(p for p in (path / "parts").glob("*.json"))
    for part in parts:
        if stored_run_id(part) not in run_ids:
            raise RunDirError(f"{part}: this stored retrain is unreadable or names no run of the study")
    lines.append(f"{len(parts)} stored retrain(s) name a verified run of the study")
    report(lines[-1])
    return lines

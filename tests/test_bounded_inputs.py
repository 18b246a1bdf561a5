"""Nothing a crafted directory or config holds can hang a command, exhaust its memory, or end in a traceback:
every case is refused with one line naming the file or key, exit 2, and nothing written.

Each case runs the real command line in-process on a thread with a timeout, so that a regression (a reader that
blocks on a FIFO, reads ``/dev/zero`` or allocates terabytes) fails its case instead of hanging the suite.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import resource
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from safetensors import SafetensorError

from gancleanse import integrity
from gancleanse.cli import main

from conftest import train_toml
from gancleanse.integrity import seal_of
from gancleanse.toml_writer import dump_toml
from test_integrity import CONFIG, FINAL, assert_refused, damaged_copy, edit_meta, meta_set

TIMEOUT = 120  # seconds; every case takes a few
GUARD_BYTES = 4 * 2**30  # the most memory a case may add: a regression fails with MemoryError, the machine lives


@pytest.fixture(autouse=True)
def memory_guard() -> Iterator[None]:
    """Limit this process's data to what it holds plus GUARD_BYTES while a case runs (Linux: VmData, RLIMIT_DATA)."""
    found = re.search(r"VmData:\s+(\d+) kB", Path("/proc/self/status").read_text()) if Path("/proc/self").exists() \
        else None
    if found is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = int(found.group(1)) * 1024 + GUARD_BYTES
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def run_main(argv: list[str]) -> int:
    """``main(argv)`` on a daemon thread: a command that never ends fails the test instead of hanging it."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(main(argv))
        except BaseException as e:  # noqa: BLE001 - reported below as the test's failure
            result.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"gancleanse {' '.join(argv)} did not finish within {TIMEOUT} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return train_toml(tmp_path_factory.mktemp("bounded"), CONFIG)


# ------------------------------------------------------------- crafted run directories
def fifo(name: str) -> Callable[[Path], None]:
    """``name`` replaced by a FIFO nobody writes to: a plain open() would block forever."""
    def apply(run: Path) -> None:
        (run / name).unlink()
        os.mkfifo(run / name)
    return apply


def symlink(name: str, target: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).unlink()
        (run / name).symlink_to(target)
    return apply


def directory(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
    return apply


def sparse(name: str, size: int, legacy: bool = False) -> Callable[[Path], None]:
    """``name`` grown to ``size`` bytes (a sparse file: nothing is written); ``legacy``: run.json resealed without
    recorded sizes, as runs trained before sizes were recorded, so the cap of the file's kind bounds the read."""
    def apply(run: Path) -> None:
        os.truncate(run / name, size)
        if legacy:
            edit_meta(lambda meta: meta.pop("sizes"), reseal=True)(run)
    return apply


def resealed_meta(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_meta(fn, reseal=True)


RUN_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "config.toml a FIFO": (fifo("config.toml"), "config.toml"),
    "run.json a FIFO": (fifo("run.json"), "run.json"),
    "splits.json a FIFO": (fifo("splits.json"), "splits.json"),
    "final checkpoint a FIFO": (fifo(FINAL), FINAL),
    "splits.json -> /dev/zero": (symlink("splits.json", "/dev/zero"), "splits.json"),
    "schedule -> /dev/zero": (symlink("schedule.safetensors", "/dev/zero"), "schedule.safetensors"),
    "run.json -> /dev/zero": (symlink("run.json", "/dev/zero"), "run.json"),
    "eval latents a directory": (directory("eval_latents.safetensors"), "eval_latents.safetensors"),
    "splits.json past its recorded size": (sparse("splits.json", 2**36), "splits.json"),
    "checkpoint past its recorded size": (sparse(FINAL, 2**36), FINAL),
    "run.json past its cap": (sparse("run.json", 2**36), "run.json"),
    "legacy run: splits.json past its cap": (sparse("splits.json", 2**31, legacy=True), "splits.json"),
    "legacy run: config.toml past its cap": (sparse("config.toml", 2**25, legacy=True), "config.toml"),
    "recorded size shrunk": (resealed_meta(lambda m: m["sizes"].__setitem__("splits.json", 10)), "splits.json"),
    "recorded sizes not counts": (resealed_meta(meta_set("sizes", {"splits.json": "many"})), "run.json"),
    "a recorded file outside the run": (resealed_meta(lambda m: m["files"].__setitem__("../elsewhere", "0" * 64)),
                                        "run.json"),
}


# influence reads every file but splits.json (the data's keys come from the data itself)
COMMAND_CASES = [(command, case) for case in sorted(RUN_CASES) for command in ("verify", "influence")
                 if command == "verify" or RUN_CASES[case][1] != "splits.json"]


@pytest.mark.parametrize(("command", "case"), COMMAND_CASES)
def test_a_crafted_run_directory_is_refused_without_hanging(command, case, pristine, tmp_path, capsys):
    craft, names = RUN_CASES[case]
    run = damaged_copy(pristine, tmp_path, craft, capsys)
    out = tmp_path / "scores.csv"
    argv = ["verify", str(run), "-q"] if command == "verify" else [
        "influence", "--check", "0", str(run), "--out", str(out), "-q"]
    assert_refused(run_main(argv), capsys.readouterr().err, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no scores, no temporary or lock file


def test_a_run_without_recorded_sizes_still_verifies(pristine, tmp_path, capsys):
    """Runs trained before sizes were recorded open, replay and verify as before (bounded by the caps)."""
    run = damaged_copy(pristine, tmp_path, lambda r: edit_meta(lambda m: m.pop("sizes"), reseal=True)(r), capsys)
    assert run_main(["verify", str(run), "-q"]) == 0
    assert "every check passed" in capsys.readouterr().out


def test_new_runs_record_every_file_size(pristine):
    meta = json.loads((pristine / "run.json").read_text())
    assert meta["sizes"] == {name: (pristine / name).stat().st_size for name in meta["files"]}
    assert seal_of(meta) == meta["seal"]


# ----------------------------------------------------------------------- crafted studies
def study_with(craft: Callable[[Path], None]) -> Callable[[Path, Path], Path]:
    """A study directory holding the pristine run as its replicate and one stored retrain, then ``craft``ed."""
    def build(pristine: Path, tmp: Path) -> Path:
        study = tmp / "study"
        shutil.copytree(pristine, study / "seeds" / "seed_0" / "run")
        (study / "study.json").write_text(json.dumps({"kind": "gancleanse study", "format": 1}))
        (study / "parts").mkdir()
        seal = json.loads((pristine / "run.json").read_text())["seal"]
        (study / "parts" / "seed0_none.json").write_text(json.dumps({"provenance": {"run_id": seal}}))
        craft(study)
        return study
    return build


PART = "parts/seed0_none.json"
STUDY_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "stored retrain a FIFO": (study_with(fifo(PART)), "seed0_none.json"),
    "stored retrain -> /dev/zero": (study_with(symlink(PART, "/dev/zero")), "seed0_none.json"),
    "stored retrain past its cap": (study_with(sparse(PART, 2**36)), "seed0_none.json"),
    "study.json a FIFO": (study_with(fifo("study.json")), "study.json"),
    "replicate's config.toml a FIFO": (study_with(fifo("seeds/seed_0/run/config.toml")), "config.toml"),
}


@pytest.mark.parametrize("case", sorted(STUDY_CASES))
def test_verify_refuses_a_crafted_study_without_hanging(case, pristine, tmp_path, capsys):
    build, names = STUDY_CASES[case]
    study = build(pristine, tmp_path)
    capsys.readouterr()
    assert_refused(run_main(["verify", str(study), "--no-replay", "-q"]), capsys.readouterr().err, names)


# ---------------------------------------------------------------------------- sizes
BASE: dict[str, dict[str, Any]] = {
    "data": {"n_train": 60, "n_valid": 30, "n_test": 30},
    "model": {"activation": "softplus", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
    "train": {"epochs": 1, "batch_size": 10},
    "metric": {"n_samples": 30},
}
MiB = 2**20

# case -> (config overrides, the key the error must name, the memory available (None: the machine's own))
SIZE_CASES: dict[str, tuple[dict[str, dict[str, Any]], str, int | None]] = {
    "data.n_valid 10**12": ({"data": {"n_valid": 10**12}}, "data.n_valid", None),
    "data.n_test 10**12": ({"data": {"n_test": 10**12}}, "data.n_test", None),
    "data.n_train 10**12": ({"data": {"n_train": 10**12}}, "data.n_train", None),
    "metric.n_samples 10**12": ({"metric": {"n_samples": 10**12}}, "metric.n_samples", None),
    "model.z_dim 2**40": ({"model": {"z_dim": 2**40}}, "model.z_dim", None),
    "model.layers 10**6": ({"model": {"layers": 10**6}}, "model.layers", None),
    "train.batch_size 10**12": ({"train": {"batch_size": 10**12}}, "train.batch_size", None),
    # within the static bounds, beyond any machine's memory (petabytes)
    "evaluation latents beyond memory": ({"metric": {"n_samples": 10**9}, "model": {"z_dim": 2**20}},
                                         "metric.n_samples", None),
    "generator beyond memory": ({"model": {"g_hidden": 2**24}}, "model.g_hidden", None),
    "discriminator beyond memory": ({"model": {"d_hidden": 2**24}}, "model.d_hidden", None),
    "recorded window beyond memory": ({"train": {"epochs": 10**12, "record_from_epoch": 0}},
                                      "train.record_from_epoch", None),
    # within the machine's RAM, beyond the memory available now
    "gaussian2d splits beyond free memory": ({"data": {"n_valid": 10**6}}, "data.n_valid", 4 * MiB),
    "n_samples by default beyond free memory": ({"data": {"n_valid": 10**4}, "model": {"z_dim": 100},
                                                 "metric": {"n_samples": None}}, "data.n_valid", MiB),
    "evaluation latents beyond free memory": ({"metric": {"n_samples": 10**5}}, "metric.n_samples", MiB),
}


def config_toml(overrides: dict[str, dict[str, Any]]) -> str:
    raw = {name: dict(values) for name, values in BASE.items()}
    for name, values in overrides.items():
        raw.setdefault(name, {}).update(values)
    return dump_toml({name: {k: v for k, v in values.items() if v is not None} for name, values in raw.items()})


def assert_nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.toml"]  # no run, no stage, no lock


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_a_size_beyond_memory_is_refused_before_allocating(case, tmp_path, capsys, monkeypatch):
    overrides, key, free = SIZE_CASES[case]
    if free is not None:
        monkeypatch.setattr(integrity, "available_bytes", lambda device: free)
    (tmp_path / "cfg.toml").write_text(config_toml(overrides))
    code = run_main(["train", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert_refused(code, err, key)
    if free is not None or "beyond memory" in case:
        assert "bytes of memory" in err and "available" in err, err
    assert_nothing_written(tmp_path)


# ------------------------------------------------------------------------ a full disk
NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_tensors(name: str, error: Exception) -> Callable[[Any], None]:
    """Every safetensors file of a run goes through state_files.save_file: the one named ``name`` fails."""
    def patch(monkeypatch) -> None:  # noqa: ANN001
        from gancleanse import state_files

        real = state_files.save_file

        def save_file(tensors: dict, path: str) -> None:
            if path.endswith(name):
                raise error
            real(tensors, path)
        monkeypatch.setattr(state_files, "save_file", save_file)
    return patch


def failing_json(name: str) -> Callable[[Any], None]:
    def patch(monkeypatch) -> None:  # noqa: ANN001
        from gancleanse.training import recorder

        real = recorder.write_json_atomic

        def write_json_atomic(path: Path, obj: Any) -> None:
            if Path(path).name == name:
                raise NO_SPACE
            real(path, obj)
        monkeypatch.setattr(recorder, "write_json_atomic", write_json_atomic)
    return patch


class FullFile:
    """A text file on a full disk: every write fails."""

    def __enter__(self) -> "FullFile":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, text: str) -> int:
        raise NO_SPACE


def failing_log(monkeypatch) -> None:  # noqa: ANN001
    from gancleanse.training import recorder

    monkeypatch.setattr(recorder, "open", lambda path, *a, **k: FullFile() if str(path).endswith("losses.jsonl")
                        else builtins.open(path, *a, **k), raising=False)


def failing_config(monkeypatch) -> None:  # noqa: ANN001
    real = Path.write_text

    def write_text(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        if self.name == "config.toml" and self.parent.name.endswith(".partial"):
            raise NO_SPACE
        return real(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", write_text)


SERIALIZING = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
DISK_CASES: dict[str, tuple[Callable[[Any], None], str]] = {
    "first checkpoint": (failing_tensors("step_00000000.safetensors", NO_SPACE), "step_00000000.safetensors"),
    "window checkpoint (safetensors' own error)": (failing_tensors("step_00000008.safetensors", SERIALIZING),
                                                  "step_00000008.safetensors"),
    "final checkpoint": (failing_tensors("step_00000012.safetensors", NO_SPACE), "step_00000012.safetensors"),
    "evaluation latents": (failing_tensors("eval_latents.safetensors", SERIALIZING), "eval_latents.safetensors"),
    "schedule": (failing_tensors("schedule.safetensors", NO_SPACE), "schedule.safetensors"),
    "splits.json": (failing_json("splits.json"), "splits.json"),
    "run.json": (failing_json("run.json"), "run.json"),
    "losses.jsonl": (failing_log, "losses.jsonl"),
    "config.toml": (failing_config, "config.toml"),
}


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_a_full_disk_during_train_is_one_line_and_leaves_nothing(case, tmp_path, capsys, monkeypatch):
    patch, names = DISK_CASES[case]
    (tmp_path / "cfg.toml").write_text(CONFIG)
    patch(monkeypatch)
    code = run_main(["train", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert_refused(code, err, names)
    assert "No space left on device" in err, err
    assert_nothing_written(tmp_path)


def test_the_metric_classifier_refuses_a_class_count_it_cannot_hold():
    import torch

    from gancleanse.errors import DataError
    from gancleanse.features.classifier import count_classes

    assert count_classes(torch.tensor([0, 3]), torch.tensor([1])) == 4
    with pytest.raises(DataError, match=r"at most 65536 classes .* found label 1073741824"):
        count_classes(torch.tensor([0, 2**30]))  # one output per class: a terabyte-sized layer

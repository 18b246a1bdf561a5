"""Output files under adversarial conditions: a second writer of the same output, a full disk, a user's own
files beside the output. Each case: exit 2, one line naming the file, no partial output, no user file touched."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gancleanse as gc
from gancleanse.cli import main

from conftest import tiny_config

COMMANDS = {  # a command that writes the one file --out names, and that file's name
    "influence": (["influence", "{run}", "--method", "random", "--check", "0", "-q"], "scores.csv"),
    "validate": (["validate", "{run}", "--instances", "2", "-q"], "valid.json"),
    "lds": (["lds", "{run}", "--methods", "random", "--subsets", "3", "-q"], "lds.json"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return gc.train(tiny_config(), tmp_path_factory.mktemp("outputs") / "run", progress=False).path


def one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gancleanse: error:") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def arguments(command: str, run: Path, out: Path) -> list[str]:
    args, _ = COMMANDS[command]
    return [a.format(run=run) for a in args] + ["--out", str(out)]


def users_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def hold_lock(directory: Path, name: str) -> subprocess.Popen:
    """Another process holding the output's lock, as a running `gancleanse influence` would."""
    code = (f"import sys, time; from gancleanse.locks import DirectoryLock; "
            f"DirectoryLock({str(directory)!r}, 'output', lock_name={'.' + name + '.lock'!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_second_writer_of_the_same_output_is_refused_naming_the_first(run, tmp_path, capsys, command):
    name = COMMANDS[command][1]
    (tmp_path / "notes.txt").write_text("mine")
    holder = hold_lock(tmp_path, name)
    before = users_files(tmp_path)  # the user's file and the holder's lock
    try:
        assert main(arguments(command, run, tmp_path / name)) == 2
        one_line_error(capsys, f"--out {tmp_path / name}", "is being written by process", str(holder.pid))
        assert not (tmp_path / name).exists() and users_files(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_full_disk_leaves_no_partial_output_and_names_the_file(run, tmp_path, capsys, monkeypatch, command):
    name = COMMANDS[command][1]
    (tmp_path / f"{name}.tmp").write_text("the user's own file")  # the name a naive writer would use
    before = users_files(tmp_path)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, *args, **kwargs) -> None:
            self.file = real_fdopen(fd, *args, **kwargs)

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):  # os.fdopen is patched for every module: reading still works
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

    monkeypatch.setattr("gancleanse.files.os.fdopen", FullDisk)
    assert main(arguments(command, run, tmp_path / name)) == 2
    one_line_error(capsys, "No space left on device", str(tmp_path))
    assert users_files(tmp_path) == before  # no output, no temporary left, the user's .tmp file untouched
    assert not any(p.name.startswith(".") and p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_the_lock_is_released_when_the_command_ends(run, tmp_path):
    out = tmp_path / "scores.csv"
    assert main(arguments("influence", run, out)) == 0
    assert out.is_file() and not (tmp_path / ".scores.csv.lock").exists()
    started = time.monotonic()
    assert main(arguments("influence", run, out) + ["--force"]) == 0  # not refused by a lock of its own
    assert time.monotonic() - started < 60

"""One writer per directory: the lock file, its refusal message, stale and garbled locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gancleanse.errors import RunDirError
from gancleanse.locks import DirectoryLock, lock_holder

HOLD = """
import sys, time
from pathlib import Path
from gancleanse.locks import DirectoryLock
from gancleanse.errors import RunDirError
directory, go, hold = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
try:
    lock = DirectoryLock(directory, "study").acquire()
except RunDirError as e:
    print("refused", e, flush=True)
    sys.exit(0)
print("got", flush=True)
time.sleep(hold)
lock.release()
"""


def _write_lock(directory: Path, pid: int, **extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00",
                                "command": "gancleanse cleanse other.toml --out x", **extra}))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the PID no longer exists
    return p.pid


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "30"])
    yield p
    p.kill()
    p.wait()


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    d = tmp_path / "study"  # created by the lock
    with DirectoryLock(d, "study") as lock:
        assert lock.held and lock.path == d / ".lock"
        info = json.loads((d / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == " ".join(sys.argv) and info["what"] == "study"
        assert info["started"][:4].isdigit() and "T" in info["started"]
        holder = lock_holder(d)
        assert holder["pid"] == os.getpid() and holder["ours"] is True
    assert not (d / ".lock").exists() and not lock.held
    assert lock_holder(d) is None
    assert d.is_dir()


def test_directory_created_beforehand(tmp_path):
    (tmp_path / "data.txt").write_text("kept")
    with DirectoryLock(tmp_path):
        assert (tmp_path / ".lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_reentrant_in_the_same_process(tmp_path):
    with DirectoryLock(tmp_path, "study"):
        with DirectoryLock(tmp_path, "run"):  # no deadlock, no refusal
            assert (tmp_path / ".lock").is_file()
        assert (tmp_path / ".lock").is_file()  # the outer holder still has it
    assert not (tmp_path / ".lock").exists()


def test_second_writer_is_refused_with_the_holder(tmp_path):
    go = tmp_path / "go"
    go.touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "d"), str(go), "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "got"
        with pytest.raises(RunDirError) as e:
            DirectoryLock(tmp_path / "d", "study").acquire()
        msg = str(e.value)
        assert "\n" not in msg
        assert f"process {holder.pid} " in msg and str(tmp_path / "d") in msg
        assert socket.gethostname() in msg and "wait for it or stop it" in msg
        assert lock_holder(tmp_path / "d")["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # killed without releasing: its lock is stale now and taken over
    assert json.loads((tmp_path / "d" / ".lock").read_text())["pid"] == holder.pid
    assert lock_holder(tmp_path / "d") is None
    with DirectoryLock(tmp_path / "d"):
        assert json.loads((tmp_path / "d" / ".lock").read_text())["pid"] == os.getpid()


def test_live_process_in_the_lock_file_is_refused(tmp_path, sleeper):
    _write_lock(tmp_path, sleeper.pid)
    with pytest.raises(RunDirError, match=rf"{tmp_path} is being written by process {sleeper.pid} "):
        DirectoryLock(tmp_path, "run").acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid


def test_lock_from_another_host_is_refused_with_a_hint(tmp_path):
    path = _write_lock(tmp_path, 1)
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "host": socket.gethostname() + "-elsewhere"}))
    with pytest.raises(RunDirError, match=r"if it no longer runs, delete .*\.lock"):
        DirectoryLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid())
    assert lock_holder(tmp_path) is None
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_reused_pid_is_stale(tmp_path, sleeper):
    """The PID runs, but it is not the process that wrote the lock (another start time)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    if not boot.exists():
        pytest.skip("no /proc boot id")
    _write_lock(tmp_path, sleeper.pid, boot_id=boot.read_text().strip(), process_start=1)
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_own_pid_left_by_an_earlier_process_is_stale(tmp_path):
    """Our PID in a lock this process never took (containers reuse PIDs across runs)."""
    _write_lock(tmp_path, os.getpid())
    assert lock_holder(tmp_path) is None
    with DirectoryLock(tmp_path):
        assert lock_holder(tmp_path)["ours"] is True


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"pid": "12"}', b"[1, 2]", b"\xff\xfe"],
                         ids=["empty", "garbled", "bad-pid", "not-a-dict", "not-utf8"])
def test_garbled_lock_is_taken_over(tmp_path, content):
    (tmp_path / ".lock").write_bytes(content)
    assert lock_holder(tmp_path) is None
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_release_keeps_someone_elses_lock(tmp_path, sleeper):
    lock = DirectoryLock(tmp_path).acquire()
    _write_lock(tmp_path, sleeper.pid)  # replaced behind our back (say, deleted by hand and retaken)
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid
    assert not lock.held


def test_one_of_several_takers_of_a_stale_lock_wins(tmp_path):
    d = tmp_path / "d"
    _write_lock(d, _dead_pid())
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(d), str(go), "3"], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        time.sleep(2.5)  # let them import and wait at the barrier
        go.touch()
        outcomes = [p.communicate(timeout=30)[0].split(" ", 1)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(outcomes) == ["got", "refused", "refused", "refused"]
    assert not (d / ".lock").exists()  # the winner released it

"""Pool workers die with the study that started them, however it ends (Linux: reads /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")

# Two replicates trained in parallel, each for several seconds (8000 steps of a tiny 2D GAN), so
# that both workers are mid-task when the parent is signalled.
CONFIG = """
[data]
n_train = 200
n_valid = 50
n_test = 50
[model]
activation = "softplus"
g_hidden = 8
d_hidden = 8
z_dim = 3
[train]
epochs = 400
batch_size = 10
lr_d = 0.01
lr_g = 0.01
[metric]
n_samples = 40
[cleanse]
metrics = ["loss_d"]
methods = ["random"]
removal_rates = [0.0]
seeds = [0, 1]
"""
CLI = "import sys; from gancleanse.cli import main; sys.exit(main())"  # what the console script runs


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[1] == pid and st[0] not in "ZX":
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX"


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the study exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _default_sigint() -> None:
    """A shell starting the test run in the background (no job control) ignores SIGINT, and
    children inherit that; the study must see SIGINT as a terminal's Ctrl-C would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_workers_die_with_the_parent(tmp_path, sig):
    cfg = tmp_path / "study.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "study"
    log = tmp_path / "study.log"
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", CLI, "cleanse", str(cfg), "--out", str(out),
                                 "--workers", "2", "-q", "--no-report"],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_default_sigint)
    workers: list[int] = []
    try:
        # Both workers have started training their replicate (the staged run directory exists).
        staged = [out / "seeds" / f"seed_{s}" / "run.partial" for s in (0, 1)]
        _wait_for(lambda: all(p.is_dir() for p in staged), 60, "both workers to start training", proc, log)
        time.sleep(0.5)
        workers = _children(proc.pid)
        assert len(workers) >= 2, f"expected the 2 pool workers among the children, found {workers}"
        t_signal = time.monotonic()
        os.kill(proc.pid, sig)  # the parent only, not its process group
        deadline = t_signal + 5.0
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = [w for w in workers if _alive(w)]
        t_dead = time.monotonic() - t_signal
        assert survivors == [], f"workers {survivors} still run 5 s after {sig.name} to the parent"
        rc = proc.wait(timeout=10)  # and the parent itself does not hang
        assert rc != 0
        print(f"{sig.name}: workers gone {t_dead:.2f} s after the signal, parent rc {rc}, "
              f"case {time.monotonic() - t0:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # never leave a stray worker behind, even when the test fails
            if _alive(w):
                try:
                    os.kill(w, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def sleep_and_report(seconds: float) -> int:
    """A pool job: sleep, then return the worker's PID."""
    time.sleep(seconds)
    return os.getpid()


def _pool_workers() -> list[int]:
    """This process's pool workers (spawned children; not multiprocessing's resource tracker)."""
    out = []
    for pid in _children(os.getpid()):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("how", ["raise", "break"])
def test_consumer_stopping_kills_running_workers(how):
    """An error in the loop consuming the results (or leaving it) does not wait for running tasks."""
    from gancleanse.study.executor import run_tasks

    tasks = [("fast", (0.0,)), ("slow", (60.0,)), ("queued", (60.0,))]
    workers: list[int] = []
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="consumer failed") if how == "raise" else nullcontext():
            for key, _ in run_tasks(sleep_and_report, tasks, workers=2, progress=False):
                assert key == "fast"
                workers = _pool_workers()
                if how == "raise":
                    raise RuntimeError("consumer failed")
                break
        elapsed = time.monotonic() - t0
        assert len(workers) == 2
        assert [w for w in workers if _alive(w)] == [], "pool workers outlived the consuming loop"
        assert elapsed < 30, f"the loop waited {elapsed:.1f} s for running tasks"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)

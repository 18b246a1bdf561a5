"""Fan-out of independent jobs (counterfactual retrains, cleansing retrains).

``run_tasks`` maps a picklable top-level function over task arguments and yields
``(key, result)`` as tasks finish, on one of three executors (``then(key, result)`` may return follow-up
tasks, queued as soon as their task finishes: work that depends on one task, a seed's retrains on its
training, starts then, on a worker that would otherwise idle while the other tasks run):

- ``local`` with ``workers=1``: in this process, in order (no start-up cost);
- ``local`` with ``workers>1``: a spawn-based process pool on this machine;
- ``ray``: Ray tasks, on the cluster at ``RAY_ADDRESS`` if set, else on a local Ray instance started without
  dashboard or usage reporting. The local instance keeps its session files (logs, sockets) under
  ``$RAY_TMPDIR/ray`` (Ray reads that variable itself; default ``$TMPDIR/ray`` or ``/tmp/ray``); keep the path
  short, Ray's Unix socket paths beneath it must stay under 107 characters.

Workers die with the process that started them: pool workers kill themselves when their parent goes away
(``PR_SET_PDEATHSIG`` on Linux, a watchdog thread polling the parent PID everywhere), and any exception in the
parent while tasks run (``KeyboardInterrupt``, an error in the consuming loop, the generator closed) kills the
workers at once instead of waiting for their tasks, then propagates. On Ray, pending tasks are cancelled.

Progress (``progress=True``): ``gancleanse.progress.ProgressDisplay`` on stderr, the jobs done and one line per
job in flight with its stage and steps. Each job runs inside ``progress.running_job``, so the code it calls
reports to the parent through ``progress.current_job()``: directly when in this process, through a
``multiprocessing`` queue handed to each pool worker when it starts. Ray tasks report only their completion.

Every job is deterministic on its own (its seeds, indices and latents come from the run
directory, and it sets the recorded thread count), so results do not depend on the executor.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import nullcontext, suppress
from typing import Any, Callable, Hashable, Iterable, Iterator

from ..errors import GancleanseError
from ..progress import Channel, ProgressDisplay, running_job

EXECUTORS = ("local", "ray")


Task = tuple[Hashable, tuple]  # (key, the function's arguments)
Labelled = tuple[Hashable, str, tuple]  # (key, the job's name in the progress lines, arguments)
FollowUps = Callable[[Hashable, Any], list[Labelled]]


def run_tasks(fn: Callable[..., Any], tasks: Iterable[Task], *, executor: str = "local",
              workers: int = 1, progress: bool = True, desc: str = "jobs",
              label: Callable[[Hashable], str] = str,
              then: Callable[[Hashable, Any], Iterable[Task]] | None = None) -> Iterator[tuple[Hashable, Any]]:
    """Yield ``(key, fn(*args))`` for each ``(key, args)`` in ``tasks``, in completion order; ``label``: a job's
    name in the progress lines (unique among the jobs). ``then(key, result)``, called in this process as each
    task finishes and before it is yielded: the follow-up tasks it makes possible, queued behind those already
    queued and yielded like them."""
    tasks = list(tasks)
    if executor not in EXECUTORS:
        raise GancleanseError(f"unknown executor {executor!r} (available: {', '.join(EXECUTORS)})")
    if workers < 1:
        raise GancleanseError(f"--workers must be at least 1, got {workers}")
    shown = progress and (bool(tasks) or then is not None)
    channel = _channel(executor, workers) if shown else None
    names: dict[Hashable, str] = {}
    display: ProgressDisplay | None = None

    def labelled(batch: Iterable[Task]) -> list[Labelled]:
        out = [(key, label(key), args) for key, args in batch]
        names.update((key, name) for key, name, _ in out)
        return out

    def follow_ups(key: Hashable, result: Any) -> list[Labelled]:
        new = labelled(then(key, result)) if then is not None else []
        if display is not None:
            display.add_jobs(len(new))
        return new

    first = labelled(tasks)
    source = (_ray(fn, first, workers, follow_ups) if executor == "ray"
              else _pool(fn, first, workers, channel, follow_ups) if workers > 1
              else _in_process(fn, first, channel, follow_ups))
    # jobs with follow-ups are unlike (a training, then its retrains): no ETA from the mean time per job
    with ProgressDisplay(desc, len(tasks), channel, jobs_eta=then is None) if shown else nullcontext() as display:
        try:
            for key, result in source:
                if display is not None:
                    display.job_done(names[key])
                yield key, result
        finally:
            # Closed here, not whenever it is garbage collected: a pool or Ray source stops its
            # workers now when the consumer stops early or raises.
            source.close()


def call(fn: Callable[..., Any], args: tuple) -> Any:
    """``fn(*args)``: as ``run_tasks``' function, with ``(fn, args)`` as each task's arguments, it runs jobs of
    several functions in one stream (a seed's training, then its retrains)."""
    return fn(*args)


def _channel(executor: str, workers: int) -> Channel | None:
    """Where jobs send their progress: none from Ray, a queue in this process or one pool workers inherit."""
    if executor == "ray":
        return None
    return multiprocessing.get_context("spawn").Queue() if workers > 1 else queue.SimpleQueue()


def _in_process(fn: Callable[..., Any], tasks: list[Labelled], channel: Channel | None, follow_ups: FollowUps
                ) -> Iterator[tuple[Hashable, Any]]:
    queued = deque(tasks)
    while queued:
        key, name, args = queued.popleft()
        with running_job(channel, name):
            result = fn(*args)
        queued.extend(follow_ups(key, result))
        yield key, result


# ---------------------------------------------------------------------- local process pool
WATCHDOG_INTERVAL = 0.5  # seconds between a worker's checks that its parent still runs
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies


def _pool(fn: Callable[..., Any], tasks: list[Labelled], workers: int, channel: Channel | None,
          follow_ups: FollowUps) -> Iterator[tuple[Hashable, Any]]:
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools can deadlock
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), channel))
    try:
        pending = {pool.submit(_run_job, fn, name, args): key for key, name, args in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                key, result = pending.pop(fut), fut.result()
                pending.update((pool.submit(_run_job, fn, name, args), k) for k, name, args in follow_ups(key, result))
                yield key, result
    except BaseException:  # KeyboardInterrupt, GeneratorExit, a failed task, an error downstream
        # Not ``with pool``: its __exit__ waits for the running tasks (minutes of retraining).
        _kill_workers(pool)
        raise
    pool.shutdown(wait=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's workers now (not after their running tasks), then shut the pool down."""
    # ``_processes`` (pid -> Process) is private, but it is the only handle on the workers (the public
    # API can only cancel tasks not yet started and wait for the running ones). submit() starts them
    # in the thread driving this generator, so the mapping is complete here.
    killed = False
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            p.kill()
            killed = True
        except (OSError, ValueError, AttributeError):
            pass  # already gone or closed
    # With the workers dead the pool's manager thread notices at once, fails the remaining futures
    # and releases the queues, so waiting takes milliseconds (and frees the queues' semaphores, else
    # reported as leaked at exit). Without a handle on them, do not wait: see _worker_init.
    pool.shutdown(wait=killed, cancel_futures=True)


_worker_channel: Channel | None = None  # a pool worker's channel to the parent's progress display


def _run_job(fn: Callable[..., Any], name: str, args: tuple) -> Any:
    """A pool job: ``fn(*args)``, its progress sent to the parent."""
    with running_job(_worker_channel, name):
        return fn(*args)


def _worker_init(parent_pid: int, channel: Channel | None) -> None:
    """Runs first in every pool worker: die with the parent, however it ends; keep the progress channel."""
    global _worker_channel
    _worker_channel = channel
    cancel_join = getattr(channel, "cancel_join_thread", None)
    if cancel_join is not None:  # exiting never waits to send progress (the parent may have stopped reading)
        cancel_join()
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # PDEATHSIG fires when the *thread* that created this process exits, not only when the whole
    # parent does (so a run_tasks generator must be driven from one thread, which it is), and
    # exists only on Linux: the watchdog covers the rest.
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="gancleanse-parent-watchdog", daemon=True).start()
    # tqdm's default lock is a multiprocessing RLock: a named semaphore that a killed worker cannot
    # unlink (reported as leaked). A worker's progress bars (disabled anyway) need only a thread lock.
    with suppress(Exception):  # cosmetic only
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    # Interrupting the parent from a terminal sends SIGINT to the whole process group; the parent
    # kills the workers, which must not die half-way on their own with a traceback each.
    with suppress(OSError, ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        if os.getppid() != parent_pid:
            os._exit(1)


_RAY_TOKEN: list[str] = []  # this process's token for the local Ray instances it starts


def _ray_token() -> str:
    if not _RAY_TOKEN:
        _RAY_TOKEN.append(secrets.token_hex(32))
    return _RAY_TOKEN[0]


def _ray(fn: Callable[..., Any], tasks: list[Labelled], workers: int, follow_ups: FollowUps
         ) -> Iterator[tuple[Hashable, Any]]:
    try:
        import ray
    except ImportError:
        raise GancleanseError("--executor ray needs Ray: pip install 'gancleanse[ray]'") from None
    started_here = not ray.is_initialized()
    address = os.environ.get("RAY_ADDRESS")
    saved_env = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_TOKEN")}
    if started_here:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if not address:
            kwargs["num_cpus"] = max(workers, 1)
            if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
                # An in-memory token, so Ray writes no token file into the user's home directory; one per
                # process, as Ray keeps the first it reads: a fresh one would lock out every later instance.
                os.environ["RAY_AUTH_TOKEN"] = _ray_token()
        ray.init(address=address or None, **kwargs)
    refs: dict = {}
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(*args): key for key, _, args in tasks}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                key, result = refs.pop(ref), ray.get(ref)
                refs.update((remote.remote(*args), k) for k, _, args in follow_ups(key, result))
                yield key, result
    except BaseException:
        # On a cluster the tasks would run on after we are gone; a local instance is shut down below.
        if not started_here or address:
            for ref in refs:
                with suppress(Exception):  # best effort while propagating the original error
                    ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

"""Fan-out of independent jobs (counterfactual retrains, cleansing retrains).

``run_tasks`` maps a picklable top-level function over task arguments and yields
``(key, result)`` as tasks finish, on one of three executors:

- ``local`` with ``workers=1``: in this process, in order (no start-up cost);
- ``local`` with ``workers>1``: a spawn-based process pool on this machine;
- ``ray``: Ray tasks, on the cluster at ``RAY_ADDRESS`` if set, else on a local Ray
  instance started without dashboard or usage reporting.

Every job is deterministic on its own (its seeds, indices and latents come from the run
directory, and it sets the recorded thread count), so results do not depend on the executor.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Hashable, Iterable, Iterator

from tqdm.auto import tqdm

from ..errors import GancleanseError

EXECUTORS = ("local", "ray")


def run_tasks(fn: Callable[..., Any], tasks: Iterable[tuple[Hashable, tuple]], *, executor: str = "local",
              workers: int = 1, progress: bool = True, desc: str = "jobs") -> Iterator[tuple[Hashable, Any]]:
    """Yield ``(key, fn(*args))`` for each ``(key, args)`` in ``tasks``, in completion order."""
    tasks = list(tasks)
    if executor not in EXECUTORS:
        raise GancleanseError(f"unknown executor {executor!r} (available: {', '.join(EXECUTORS)})")
    if workers < 1:
        raise GancleanseError(f"--workers must be at least 1, got {workers}")
    bar = tqdm(total=len(tasks), desc=desc, unit="job", disable=not progress or not tasks, leave=False)
    try:
        if executor == "ray":
            source = _ray(fn, tasks, workers)
        elif workers == 1:
            source = ((key, fn(*args)) for key, args in tasks)
        else:
            source = _pool(fn, tasks, workers)
        for item in source:
            bar.update()
            yield item
    finally:
        bar.close()


def _pool(fn, tasks, workers) -> Iterator[tuple[Hashable, Any]]:
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = {pool.submit(fn, *args): key for key, args in tasks}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield pending.pop(fut), fut.result()


def _ray(fn, tasks, workers) -> Iterator[tuple[Hashable, Any]]:
    try:
        import ray
    except ImportError:
        raise GancleanseError("--executor ray needs Ray: pip install 'gancleanse[ray]'") from None
    started_here = not ray.is_initialized()
    saved_env = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_AUTH_TOKEN")}
    if started_here:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if not address:
            kwargs["num_cpus"] = max(workers, 1)
            if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
                # A local instance authenticates with a fresh in-memory token, so Ray does not
                # write a token file into the user's home directory.
                os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        ray.init(address=address or None, **kwargs)
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(*args): key for key, args in tasks}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                yield refs.pop(ref), ray.get(ref)
    finally:
        if started_here:
            ray.shutdown()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

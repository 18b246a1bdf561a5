"""``run_tasks``' follow-up tasks: queued as their task finishes, run by a worker that would otherwise idle."""

from __future__ import annotations

import os
import posixpath
import time
from itertools import product
from pathlib import Path
from typing import Any

import pytest

import gancleanse.progress as progress
import gancleanse.study.executor as executor
from gancleanse.study.executor import call, run_tasks


def _square(x: int) -> int:
    return x * x


def _wait_for(path: str, timeout: float) -> bool:
    """Whether ``path`` appeared within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


def _touch(path: str) -> str:
    Path(path).touch()
    return path


@pytest.mark.parametrize("executor,workers", [("local", 1), ("local", 2), ("ray", 2)])
def test_follow_ups_of_follow_ups_run_after_their_task_and_are_yielded(executor, workers, capsys):
    """Each task joins two path parts (``posixpath.join``, a function Ray workers can import); a result of fewer
    than four parts queues two follow-ups that extend it (their parent's result is in their arguments), so the
    whole tree runs and every key comes after its parent's."""
    if executor == "ray":
        pytest.importorskip("ray", reason="Ray is not installed (pip install 'gancleanse[ray]')")

    def then(key: tuple, result: str) -> list[tuple[tuple, tuple]]:
        return [] if len(key) >= 4 else [((*key, d), (result, d)) for d in ("x", "y")]

    got = list(run_tasks(posixpath.join, [(("a",), ("", "a")), (("b",), ("", "b"))], executor=executor,
                         workers=workers, progress=True, then=then))
    expected = {key: "/".join(key) for n in range(1, 5) for key in product("ab", *[("x", "y")] * (n - 1))}
    assert dict(got) == expected and len(got) == len(expected) == 30
    order = [key for key, _ in got]
    assert all(order.index(key[:-1]) < order.index(key) for key in order if len(key) > 1)
    assert "30/30 jobs done" in capsys.readouterr().err.strip().splitlines()[-1]  # it counted the follow-ups


def test_a_stream_with_follow_ups_shows_no_eta_from_the_mean_time_per_job(monkeypatch):
    """Its jobs are unlike (a training, then its retrains): each job's own line has an ETA, the header none."""
    made: list[progress.ProgressDisplay] = []
    display = progress.ProgressDisplay
    monkeypatch.setattr(executor, "ProgressDisplay", lambda *a, **k: made.append(display(*a, **k)) or made[-1])
    for then in (None, lambda key, result: []):
        list(run_tasks(posixpath.join, [("a", ("x", "y")), ("b", ("x", "z"))], progress=True, then=then))
    alike, stream = made
    for d in made:
        d.finished = {"a"}
        d.started -= 60
    assert "ETA ~" in alike._header(time.time()) and "ETA ~" not in stream._header(time.time())
    assert "1/2 jobs done, 1:00" in stream._header(time.time())


def test_a_follow_up_runs_while_another_first_task_still_runs(tmp_path):
    """Two workers, two first tasks: one waits for a file that only the other's follow-up writes. Queued only
    after every first task, the follow-up would come after the wait had failed."""
    flag = str(tmp_path / "flag")
    tasks = [("wait", (_wait_for, (flag, 60.0))), ("quick", (_square, (4,)))]

    def then(key: str, result: Any) -> list[tuple[str, tuple]]:
        return [("touch", (_touch, (flag,)))] if key == "quick" else []

    got = dict(run_tasks(call, tasks, workers=2, progress=False, then=then))
    assert got == {"wait": True, "quick": 16, "touch": flag}


def test_an_error_in_then_stops_the_tasks(tmp_path):
    def then(key: str, result: Any) -> list:
        raise ValueError(f"cannot plan after {key}")

    with pytest.raises(ValueError, match="cannot plan after a"):
        list(run_tasks(call, [("a", (_square, (1,))), ("b", (_wait_for, (str(tmp_path / "never"), 60.0)))],
                       workers=2, progress=False, then=then))


def test_ray_starts_again_in_the_same_process():
    """Each ``run_tasks`` on Ray starts and stops its own local instance (a study runs two: its trainings, then
    its retrains); the second must accept the process's token like the first."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'gancleanse[ray]')")
    for _ in range(2):
        assert dict(run_tasks(posixpath.join, [("a", ("x", "y"))], executor="ray", workers=1, progress=False)) \
            == {"a": "x/y"}

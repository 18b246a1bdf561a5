"""Progress of jobs run in worker processes, shown by the process that started them.

Two sides, joined by a channel (anything with ``put`` and ``get(timeout=...)``: a ``queue.SimpleQueue`` when
the jobs run in this process, a ``multiprocessing`` queue handed to each pool worker when it starts):

- **Worker side.** A job runs inside ``running_job(channel, label)``; the code it calls asks ``current_job()``
  for its ``JobReport`` (a silent one outside any job) and reports ``stage("train")`` and then
  ``step(done, total)`` after each step (``StepCallback``: training, replays and retrains take one as
  ``on_step``). A report is sent when a stage starts, on its first and last steps and otherwise at most every
  ``SEND_INTERVAL`` seconds, so a step costs a clock read. Reporting never touches a random generator or a
  tensor, so training is bitwise the same with or without it, and a failed send is dropped, never raised.
- **Parent side.** ``ProgressDisplay`` drains the channel in a thread and shows, on stderr, the jobs done, the
  time elapsed and an ETA from the jobs' mean time, and one line per job in flight: its label, stage, steps
  done of the stage's total, the rate and the stage's ETA. The rate is measured over the last ``RATE_WINDOW``
  seconds of reports, so a job suspended for a while, or slowed and sped up by other work on the machine, shows
  its current rate again within that time rather than its mean since the stage began (for hours, in a long
  training). The stage's first step report is left out (it comes before the first steps' warm-up, and a
  retrain's before its replay up to the fork), so a rate is measured between later reports and first shows
  with the third; while the window holds no earlier report the rate runs from the last one before it. A stage
  whose steps come in bursts (ITD replays each stretch forward, reporting nothing, then reverses it step by
  step) says so (``step(..., in_bursts=True)``), and its rate is then the mean since its first step report: a
  window would show the burst's rate (an ETA short by the replays) or, just after a replay, one step across it
  (hours). A stage that reports no steps (a scorer that does not report them) shows the time spent in it. On a
  terminal the block is redrawn in place every ``REDRAW_INTERVAL`` seconds and erased at the end. When stderr
  is not a terminal (a log, a pipe) plain lines are printed, at most every ``PLAIN_INTERVAL`` seconds and only
  for the jobs whose stage or step changed (or whose line is ``PLAIN_REPEAT`` seconds old), and a last one when
  all jobs are done:
  ``cleanse: 0/2 jobs done, 0:12 | seed 0: train step 40/120, 12.3 step/s, ETA 0:07``.

Jobs on Ray report nothing but their completion (the header); ``progress=False`` creates no display.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, Callable, Iterator, Protocol, TextIO

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)

SEND_INTERVAL = 0.5  # seconds between a job's step reports (its first and last steps always go)
PLAIN_INTERVAL = 5.0  # seconds between plain lines when stderr is not a terminal
PLAIN_REPEAT = 60.0  # seconds after which a job's unchanged line is printed again (it still runs)
REDRAW_INTERVAL = 0.25  # seconds between redraws on a terminal
LABEL_WIDTH = 40  # characters of a job's label shown
RATE_WINDOW = 60.0  # seconds of recent step reports a job's rate (and so its ETA) is measured over


class Channel(Protocol):
    def put(self, item: Any) -> None: ...

    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


@dataclass(frozen=True)
class Update:
    """One report of a job: its stage, and the steps done of the stage's total when it has steps."""

    job: str
    stage: str
    done: int | None
    total: int | None
    time: float  # time.time() in the worker: the same clock as the parent's on one machine
    in_bursts: bool = False  # the stage's steps come in bursts: its rate is measured since its first step


class JobReport:
    """A job's reports to the parent (none when ``channel`` is None)."""

    def __init__(self, channel: Channel | None, job: str) -> None:
        self.channel, self.job = channel, job
        self._stage, self._last_sent, self._fresh = "", -math.inf, False

    def stage(self, name: str) -> None:
        """The job starts stage ``name`` (``train``, ``score itd-fid``, ``retrain``...)."""
        self._stage, self._fresh = name, True
        self._send(None, None)

    def step(self, done: int, total: int, *, in_bursts: bool = False) -> None:
        """``done`` of the stage's ``total`` steps are done (a ``StepCallback``). ``in_bursts``: the steps come in
        bursts separated by work that reports none, so the display measures their rate since the stage's first
        step rather than over its last ``RATE_WINDOW`` seconds."""
        if self.channel is None:
            return
        if self._fresh or done >= total or time.monotonic() - self._last_sent >= SEND_INTERVAL:
            self._fresh = False
            self._send(done, total, in_bursts)

    def _send(self, done: int | None, total: int | None, in_bursts: bool = False) -> None:
        if self.channel is None:
            return
        self._last_sent = time.monotonic()
        with suppress(OSError, ValueError):  # the parent went away or closed the channel: progress is cosmetic
            self.channel.put(Update(self.job, self._stage, done, total, time.time(), in_bursts))


_current = JobReport(None, "")


def current_job() -> JobReport:
    """The report of the job this process runs now; a silent one outside any job."""
    return _current


@contextmanager
def running_job(channel: Channel | None, label: str) -> Iterator[JobReport]:
    """Run a job named ``label`` whose reports go to ``channel`` (None: nowhere)."""
    global _current
    saved, _current = _current, JobReport(channel, label)
    try:
        yield _current
    finally:
        _current = saved


def clock(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class JobState:
    """What the display knows of one job in flight."""

    stage: str
    started: float  # when the stage started (worker's clock)
    done: int | None = None
    total: int | None = None
    first: tuple[float, int] | None = None  # (time, steps done) of the stage's first step report
    # the step reports after the first (its warm-up is left out): those of the last RATE_WINDOW seconds, and
    # the latest one before them
    recent: deque[tuple[float, int]] = field(default_factory=deque)
    latest: float = 0.0
    in_bursts: bool = False  # rate since the first step report, not over the window (``JobReport.step``)
    shown: tuple = ()  # the (stage, done) last printed as a plain line
    shown_at: float = -math.inf  # when (time.monotonic)

    def update(self, u: Update) -> None:
        if u.done is not None and self.first is None:
            self.first = (u.time, u.done)
        elif u.done is not None and (self.recent or u.done > self.first[1]):
            self.recent.append((u.time, u.done))
            while len(self.recent) > 2 and self.recent[1][0] < u.time - RATE_WINDOW:
                self.recent.popleft()
        self.done, self.total, self.latest, self.in_bursts = u.done, u.total, u.time, u.in_bursts

    def since(self) -> tuple[float, int] | None:
        """The report the rate is measured from: the oldest one after the first of the last ``RATE_WINDOW``
        seconds with fewer steps done than now, else the latest one before them, else none (no rate yet); the
        stage's first one for steps in bursts."""
        if self.in_bursts:
            return self.first
        earlier = [r for r in self.recent if r[1] < self.done]
        inside = [r for r in earlier if r[0] >= self.latest - RATE_WINDOW]
        return inside[0] if inside else earlier[-1] if earlier else None

    def describe(self, now: float) -> str:
        if self.done is None or not self.total or self.first is None:
            return f"{self.stage} ({clock(now - self.started)})"
        text = f"{self.stage} step {self.done}/{self.total}"
        since = self.since()
        seconds, steps = (0.0, 0) if since is None else (self.latest - since[0], self.done - since[1])
        rate = steps / seconds if steps > 0 and seconds > 0 else None
        if rate is not None:
            text += f", {rate:.3g} step/s" if rate >= 1 else f", {1 / rate:.3g} s/step"
        if self.done >= self.total:
            return text + ", ETA 0:00"
        return text if rate is None else text + f", ETA {clock((self.total - self.done) / rate)}"


class ProgressDisplay:
    """Shows the progress of ``total_jobs`` jobs named ``desc`` on ``stream`` (default stderr) while open.
    ``jobs_eta``: an ETA from the mean time per job done, for jobs alike (not for a stream of trainings and
    retrains, where each job's own line has its ETA)."""

    def __init__(self, desc: str, total_jobs: int, channel: Channel | None, stream: TextIO | None = None,
                 jobs_eta: bool = True) -> None:
        self.desc, self.total_jobs, self.channel, self.jobs_eta = desc, total_jobs, channel, jobs_eta
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.time()
        self.jobs: dict[str, JobState] = {}
        self.finished: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = 0  # lines of the block on a terminal
        self._last_plain = -math.inf
        self._header_shown = -1
        self._thread = threading.Thread(target=self._run, name="gancleanse-progress", daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        with self._lock:
            self._erase() if self.interactive else self._plain()

    def add_jobs(self, n: int) -> None:
        """``n`` more jobs to show (follow-up tasks queued while the display runs)."""
        with self._lock:
            self.total_jobs += n

    def job_done(self, label: str) -> None:
        with self._lock:
            self.finished.add(label)
            self.jobs.pop(label, None)

    def _run(self) -> None:
        last_draw = -math.inf
        while not self._stop.is_set():
            self._drain(timeout=min(REDRAW_INTERVAL, 0.1))
            now = time.monotonic()
            if self.interactive and now - last_draw >= REDRAW_INTERVAL:
                last_draw = now
                with self._lock:
                    self._redraw()
            elif not self.interactive and now - self._last_plain >= PLAIN_INTERVAL:
                with self._lock:
                    self._plain(now)

    def _drain(self, timeout: float = 0.0) -> None:
        """Apply every report waiting in the channel (waiting up to ``timeout`` for the first)."""
        if self.channel is None:
            self._stop.wait(timeout)
            return
        block = timeout > 0
        while True:
            try:
                update = self.channel.get(block=block, timeout=timeout if block else None)
            except (Empty, OSError, ValueError, EOFError):
                return
            block = False
            with self._lock:
                if update.job in self.finished:  # a late report of a finished job
                    continue
                job = self.jobs.get(update.job)
                if job is None or job.stage != update.stage:
                    job = self.jobs[update.job] = JobState(update.stage, update.time)
                job.update(update)

    def _header(self, now: float) -> str:
        n, elapsed = len(self.finished), now - self.started
        text = f"{self.desc}: {n}/{self.total_jobs} jobs done, {clock(elapsed)}"
        if self.jobs_eta and 0 < n < self.total_jobs:
            text += f", ETA ~{clock(elapsed / n * (self.total_jobs - n))}"
        return text

    def _redraw(self) -> None:
        now = time.time()
        width = max(20, shutil.get_terminal_size().columns - 1)
        lines = [self._header(now)] + [f"  {label[:LABEL_WIDTH]}: {job.describe(now)}"
                                       for label, job in self.jobs.items()]
        self._erase()
        self._write([line[:width] for line in lines])
        self._drawn = len(lines)

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # to the block's first line, clear to the end
            self._drawn = 0
            self.stream.flush()

    def _plain(self, monotonic_now: float | None = None) -> None:
        """One line per job whose stage or step changed (or was last printed ``PLAIN_REPEAT`` seconds ago), after
        the header's counts; the header alone when only those changed."""
        now, monotonic_now = time.time(), time.monotonic() if monotonic_now is None else monotonic_now
        header, lines = self._header(now), []
        for label, job in self.jobs.items():
            if job.shown != (job.stage, job.done) or monotonic_now - job.shown_at >= PLAIN_REPEAT:
                job.shown, job.shown_at = (job.stage, job.done), monotonic_now
                lines.append(f"{header} | {label[:LABEL_WIDTH]}: {job.describe(now)}")
        if not lines and len(self.finished) == self._header_shown:
            return
        self._header_shown = len(self.finished)
        self._last_plain = monotonic_now
        self._write(lines or [header])

    def _write(self, lines: list[str]) -> None:
        with suppress(OSError, ValueError):  # a closed stderr must not stop the study
            self.stream.write("".join(line + "\n" for line in lines))
            self.stream.flush()

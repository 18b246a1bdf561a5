"""Progress inside studies: each job's stage and steps with a rate and an ETA on stderr, plain lines when stderr
is not a terminal, nothing with progress=False, and results that do not depend on it."""

from __future__ import annotations

import io
import queue
import re

import pytest
import torch

import gancleanse as gc
import gancleanse.progress as progress
from gancleanse.config import Config
from gancleanse.progress import JobReport, ProgressDisplay, Update
from gancleanse.training.replay import replay
from gancleanse.training.retrain import retrain_many

from conftest import tiny_config

N_TRAIN, BATCH, EPOCHS = 400, 5, 3
TRAIN_STEPS = EPOCHS * N_TRAIN // BATCH  # 240
WINDOW_STEPS = N_TRAIN // BATCH  # the last epoch, traced and retrained
STUDY = {
    "data": {"n_train": N_TRAIN, "n_valid": 100, "n_test": 100},
    "model": {"activation": "elu", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
    "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr_d": 0.01, "lr_g": 0.01},
    "metric": {"n_samples": 50},
    "cleanse": {"metrics": ["loss_d"], "methods": ["itd", "random"], "removal_rates": [0.0, 0.1], "seeds": [0, 1],
                "check": 0},
}
# One plain progress line of a job: the study's counts, the job, its stage, steps, rate and ETA.
JOBS = 2 + 6 + 2  # 2 trainings; 2 seeds x (2 scorers at 10% + the shared rate 0) retrains; 2 originals
STEP_LINE = re.compile(r"^cleanse: \d+/(?P<jobs>\d+) jobs done, \d+:\d\d(, ETA ~\d+:\d\d)? "
                       r"\| (?P<job>[^:]+): (?P<stage>\w+) step (?P<done>\d+)/(?P<total>\d+), "
                       r"[\d.e+]+ (step/s|s/step), ETA \d+:\d\d$")


def step_lines(err: str) -> list[dict[str, str]]:
    return [m.groupdict() for m in map(STEP_LINE.match, err.splitlines()) if m]


@pytest.fixture(scope="module")
def quiet_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("quiet")
    return out, gc.cleanse(Config.from_dict(STUDY), out, report=False, progress=False)


@pytest.fixture
def received(monkeypatch) -> list[Update]:
    """Every report the progress display reads from its channel. The printed lines coalesce the reports that
    arrive between two reads (a fast retrain's steps and its evaluate stage in one read show as the evaluate
    stage only), so which steps show as lines depends on the machine's speed; what arrives does not."""
    got: list[Update] = []

    class Recording:  # the display's end of the channel; the jobs hold the channel itself
        def __init__(self, channel):
            self.channel = channel

        def get(self, *args, **kwargs):
            got.append(self.channel.get(*args, **kwargs))
            return got[-1]

    display_init = ProgressDisplay.__init__
    monkeypatch.setattr(ProgressDisplay, "__init__", lambda self, desc, jobs, channel, **kw: display_init(
        self, desc, jobs, Recording(channel), **kw))
    return got


def test_a_study_shows_each_jobs_steps_with_a_rate_and_an_eta(tmp_path, capsys, monkeypatch, quiet_study, received):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    monkeypatch.setattr(progress, "SEND_INTERVAL", 0.0)  # every step is reported (jobs run in this process)
    summary = gc.cleanse(Config.from_dict(STUDY), tmp_path, report=False, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err  # stderr is no terminal: plain lines only
    lines = step_lines(err)
    train = [r for r in lines if r["stage"] == "train"]
    assert {r["job"] for r in train} == {"seed 0", "seed 1"}
    assert {r["total"] for r in train} == {str(TRAIN_STEPS)}
    assert any(0 < int(r["done"]) < TRAIN_STEPS for r in train), "no line part-way through training"
    for seed in ("seed 0", "seed 1"):  # steps only move forward
        done = [int(r["done"]) for r in train if r["job"] == seed]
        assert done == sorted(done)
        assert [u.done for u in received if u.job == seed and u.stage == "train"] == [None, *range(TRAIN_STEPS + 1)]
    retrains = [r for r in lines if r["stage"] == "retrain"]
    # from the last checkpoint before a removed instance's first use
    assert retrains and all(0 <= int(r["done"]) <= int(r["total"]) <= WINDOW_STEPS for r in retrains)
    removals = {f"seed{s}_{name}" for s in (0, 1) for name in ("itd-loss_d_r0.1", "random-none_r0.1")}
    assert {r["job"] for r in retrains} <= removals | {"seed0_none", "seed1_none"}
    assert removals <= {u.job for u in received if u.stage == "retrain" and u.done == u.total == WINDOW_STEPS}
    # the count grows as each training queues its seed's 3 retrains and original (in process: seed 0, seed 1,
    # then the queued jobs in order)
    assert [{r["jobs"] for r in train if r["job"] == f"seed {s}"} for s in (0, 1)] == [{"2"}, {"6"}]
    assert {r["jobs"] for r in retrains} == {str(JOBS)}
    # a stage without steps shows its time so far; each seed's scorers, its retrains' and its original's evaluation
    # are reported (which of them show as lines depends on how fast they end)
    stage_line = re.compile(r"\| (?P<job>seed ?\d[^:]*): (?P<stage>[\w -]+) \(\d+:\d\d\)$", re.M)
    assert {m["stage"] for m in stage_line.finditer(err)} & {"score itd-loss_d", "score random-none", "evaluate"}
    stages = {(u.job, u.stage) for u in received if u.done is None}
    for s in (0, 1):
        assert {(f"seed {s}", "score itd-loss_d"), (f"seed {s}", "score random-none"),
                (f"seed {s} original", "evaluate")} <= stages
        assert {(f"seed{s}_{name}", "evaluate") for name in ("itd-loss_d_r0.1", "random-none_r0.1")} <= stages
    assert re.search(rf"^cleanse: {JOBS}/{JOBS} jobs done, \d+:\d\d$", err, re.M)
    # reporting touches no random generator and no tensor: the same study as without progress
    out, quiet_summary = quiet_study
    assert summary == quiet_summary
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()


def test_progress_false_prints_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    study = {**STUDY, "cleanse": {**STUDY["cleanse"], "seeds": [0]}}
    gc.cleanse(Config.from_dict(study), tmp_path, report=False, progress=False)
    assert capsys.readouterr().err == ""


def test_pool_workers_report_their_steps_to_the_parent(tmp_path, capfd, monkeypatch, quiet_study, received):
    """What the parent receives from the spawned workers, recorded where the display reads it."""
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # the display runs here; the workers keep their interval
    summary = gc.cleanse(Config.from_dict(STUDY), tmp_path, report=False, progress=True, workers=2)
    steps = {(u.job, u.stage, u.done, u.total) for u in received if u.done is not None}
    assert {("seed 0", "train", TRAIN_STEPS, TRAIN_STEPS), ("seed 1", "train", TRAIN_STEPS, TRAIN_STEPS)} <= steps
    retrained = {job for job, stage, done, total in steps if stage == "retrain" and done == total == WINDOW_STEPS}
    assert {f"seed{s}_{name}" for s in (0, 1) for name in ("itd-loss_d_r0.1", "random-none_r0.1")} <= retrained
    err = capfd.readouterr().err  # the workers' trainings (seconds each) show part-way
    assert {r["job"] for r in step_lines(err) if r["stage"] == "train"} == {"seed 0", "seed 1"}
    assert re.search(rf"^cleanse: {JOBS}/{JOBS} jobs done", err, re.M)
    assert summary == quiet_study[1]


def test_a_job_reports_a_stage_its_first_and_last_steps_and_otherwise_at_most_every_interval(monkeypatch):
    sent: queue.SimpleQueue = queue.SimpleQueue()
    monkeypatch.setattr(progress, "SEND_INTERVAL", 3600.0)
    report = JobReport(sent, "seed 3")
    report.stage("train")
    for done in range(0, 11):
        report.step(done, 10)
    got = [sent.get_nowait() for _ in range(sent.qsize())]
    assert [(u.job, u.stage, u.done, u.total) for u in got] == [("seed 3", "train", None, None),
                                                              ("seed 3", "train", 0, 10), ("seed 3", "train", 10, 10)]
    JobReport(None, "silent").step(1, 10)  # no channel: nothing to send, nothing raised
    assert progress.current_job().channel is None  # outside a job


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_block_is_redrawn_in_place_and_erased_at_the_end(monkeypatch):
    monkeypatch.setattr(progress, "REDRAW_INTERVAL", 0.0)
    channel: queue.SimpleQueue = queue.SimpleQueue()
    stream = Terminal()
    with ProgressDisplay("retrain", 3, channel, stream) as display:
        channel.put(Update("a", "retrain", 0, 100, 1000.0))
        channel.put(Update("a", "retrain", 10, 100, 1001.0))
        channel.put(Update("a", "retrain", 30, 100, 1002.0))  # 20 step/s from the second report on
        deadline = 200
        while "step 30/100" not in stream.getvalue() and deadline:
            deadline -= 1
            display._stop.wait(0.01)
        display.job_done("a")
    text = stream.getvalue()
    assert "  a: retrain step 30/100, 20 step/s, ETA 0:04" in text
    assert "retrain: 0/3 jobs done" in text and "\x1b[2F\x1b[J" in text  # moved up over its 2 lines, cleared
    assert text.endswith("\x1b[J")  # erased at the end, not left behind


def test_the_rate_and_eta_follow_the_last_minute_not_the_mean_since_the_stage_began():
    """A job suspended for half an hour, then slowed down by other work: its line shows the current rate
    within RATE_WINDOW seconds of each change (the mean since the stage began says 2.5 step/s just after the
    pause, and 3.9 at the end: ETAs hours off)."""
    job = progress.JobState("train", 0.0)
    t, done = 0.0, 0

    def run(seconds: float, rate: float) -> None:  # reports every half second at ``rate`` steps per second
        nonlocal t, done
        for _ in range(int(seconds * 2)):
            t, done = t + 0.5, done + rate / 2
            job.update(Update("seed 0", "train", int(done), 100_000, t))

    job.update(Update("seed 0", "train", 0, 100_000, t))
    run(600, 10.0)
    assert job.describe(t) == "train step 6000/100000, 10 step/s, ETA 2:36:40"
    t += 1800.0  # suspended (SIGSTOP, a closed laptop): no reports
    run(1, 10.0)
    assert ", 10 step/s," in job.describe(t)  # from the first report after the pause on, not across it
    run(600, 10.0)
    run(2 * progress.RATE_WINDOW, 2.0)  # another job took half the machine
    assert job.describe(t) == "train step 12250/100000, 2 step/s, ETA 12:11:15"
    assert len(job.recent) <= 2 * progress.RATE_WINDOW * 2 + 2  # the reports kept: the window's, not the stage's


def test_steps_in_bursts_are_timed_since_the_first_not_over_the_window():
    """ITD reverses 100 steps at 1 step/s after replaying them forward for 90 s without a report (longer than the
    window: a busy machine): 100 steps per 190 s. Measured over the window its line would say 1 step/s (an ETA
    short by the replays) and, on the first step after a replay, 91 s/step (hours); in bursts it is the mean
    since the first step."""
    pause = 1.5 * progress.RATE_WINDOW

    def stage(in_bursts: bool) -> tuple[progress.JobState, list[str]]:
        job, t, done, lines = progress.JobState("ITD fid", 0.0), pause, 0, []
        for burst in range(5):
            for _ in range(100):
                t, done = t + 1.0, done + 1
                job.update(Update("seed 0", "ITD fid", done, 1000, t, in_bursts))
                if done % 100 == 1:  # the first step after a replay
                    lines.append(job.describe(t))
            t += pause  # the next stretch's forward replay
        return job, lines

    windowed, lines = stage(False)
    assert all(re.search(r", 91 s/step, ETA \d\d:\d\d:\d\d$", line) for line in lines[1:])  # 10 h and more
    assert ", 1 step/s, ETA 8:20" in windowed.describe(windowed.latest)
    bursts, lines = stage(True)
    assert all("91 s/step" not in line for line in lines)
    seconds = 500 + 4 * pause - 1  # from the first step's report to the 500th's
    assert bursts.describe(bursts.latest) == (f"ITD fid step 500/1000, {seconds / 499:.3g} s/step, "
                                              f"ETA {progress.clock(500 * seconds / 499)}")


def test_a_retrains_replay_to_its_fork_is_not_counted_in_its_rate():
    """A retrain reports step 0 before replaying the recorded steps up to its fork (30 s here), then steps at
    0.3 s: its first step's line shows no rate (not 30 s/step and an ETA of hours), the next ones 3.33 step/s."""
    job = progress.JobState("retrain", 0.0)
    job.update(Update("i5", "retrain", 0, 1000, 0.0))
    assert job.describe(0.0) == "retrain step 0/1000"
    job.update(Update("i5", "retrain", 1, 1000, 30.3))
    assert job.describe(30.3) == "retrain step 1/1000"
    job.update(Update("i5", "retrain", 2, 1000, 30.6))
    job.update(Update("i5", "retrain", 3, 1000, 30.9))
    assert job.describe(30.9) == "retrain step 3/1000, 3.33 step/s, ETA 4:59"


def test_a_job_reports_whether_its_steps_come_in_bursts():
    sent: queue.SimpleQueue = queue.SimpleQueue()
    report = JobReport(sent, "seed 0")
    report.stage("ITD fid")
    report.step(0, 10, in_bursts=True)
    report.stage("retrain")
    report.step(0, 10)
    got = [sent.get_nowait() for _ in range(sent.qsize())]
    assert [(u.stage, u.done, u.in_bursts) for u in got] == [("ITD fid", None, False), ("ITD fid", 0, True),
                                                            ("retrain", None, False), ("retrain", 0, False)]


def test_replay_and_retrains_report_their_steps_and_are_unchanged(tmp_path):
    run = gc.train(tiny_config(), tmp_path / "run", progress=False)
    seen: list[tuple[int, int]] = []
    weights = torch.ones(run.n_train, dtype=run.dtype)
    weights[[3, 7]] = 0.0
    state = replay(run, run.window_start, weights=weights, on_step=lambda d, t: seen.append((d, t)))
    n = run.final_step - run.window_start
    assert seen == [(k, n) for k in range(n + 1)]
    assert all(torch.equal(a, b) for a, b in zip(state["g"].values(),
                                                 replay(run, run.window_start, weights=weights)["g"].values()))
    rows = torch.ones(3, run.n_train, dtype=run.dtype)
    rows[0, 5], rows[1, 11] = 0.0, 0.0  # row 2 removes nothing: it never forks
    retrain_seen: list[tuple[int, int]] = []
    states = retrain_many(run, rows, run.window_start, vmap_steps=False,
                          on_step=lambda d, t: retrain_seen.append((d, t)))
    first_use = [min(s for s in range(run.window_start, run.final_step) if j in run.indices(s).tolist())
                 for j in (5, 11)]
    total = sum(run.final_step - s for s in first_use)
    assert retrain_seen[0] == (0, total) and retrain_seen[-1] == (total, total)
    assert [d for d, _ in retrain_seen] == sorted(d for d, _ in retrain_seen)
    plain = retrain_many(run, rows, run.window_start, vmap_steps=False)
    assert all(torch.equal(a, b) for s, p in zip(states, plain) for a, b in zip(s["d"].values(), p["d"].values()))


def test_a_study_on_ray_gives_the_numbers_of_one_in_process(tmp_path, quiet_study):
    """Ray runs the study's one stream too (trainings, then each seed's retrains and original as follow-ups),
    starting a local instance for it, with the same results as in process."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'gancleanse[ray]')")
    summary = gc.cleanse(Config.from_dict(STUDY), tmp_path, report=False, progress=False, executor="ray", workers=2)
    out, quiet_summary = quiet_study
    assert summary == quiet_summary
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()

"""Fast counterfactual retrains equal the plain ones: forked late starts bitwise, vmapped
batches to rounding in float64."""

from __future__ import annotations

import pytest
import torch

import gancleanse as gc
from gancleanse.state_files import flatten_state
from gancleanse.training.replay import replay
from gancleanse.training.retrain import first_use_steps, late_start, retrain_many


@pytest.fixture(scope="module", params=["sgd-simultaneous", "adam-alternating-ema"])
def run(request, tmp_path_factory):
    from conftest import tiny_config

    train = {"epochs": 3, "record_from_epoch": 1, "checkpoint_every": 3}
    if request.param != "sgd-simultaneous":
        train.update(optimizer="adam", update="alternating", ema_beta=0.9, lr_d=0.01, lr_g=0.01)
    return gc.train(tiny_config(train=train), tmp_path_factory.mktemp("retrain") / "run", progress=False)


def removal_weights(run) -> torch.Tensor:
    sets = [[0], [7], [59], [1, 2, 30], [], list(range(0, 60, 9)), [int(run.indices(run.final_step - 1)[0])]]
    w = torch.ones(len(sets), run.n_train, dtype=run.dtype)
    for k, s in enumerate(sets):
        w[k, s] = 0.0
    w[0, 5] = 0.5  # a fractional weight is a change too
    return w


def test_first_use_is_the_first_minibatch_holding_a_changed_instance(run):
    w = removal_weights(run)
    first = first_use_steps(run, w != 1, run.window_start)
    for k in range(w.shape[0]):
        changed = set(torch.nonzero(w[k] != 1).flatten().tolist())
        expected = next((s for s in range(run.window_start, run.final_step)
                         if changed & set(run.indices(s).tolist())), run.final_step)
        assert int(first[k]) == expected
        start = late_start(run, w[k], run.window_start)
        assert start in run.checkpoint_steps and run.window_start <= start <= expected


def test_forked_retrains_are_bitwise_the_plain_replays(run):
    w = removal_weights(run)
    for start in (run.window_start, run.window_start + run.steps_per_epoch):
        plain = [flatten_state(replay(run, start, weights=w[k])) for k in range(w.shape[0])]
        forked = [flatten_state(s) for s in retrain_many(run, w, start, vmap_steps=False)]
        for a, b in zip(plain, forked):
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        late = [flatten_state(replay(run, late_start(run, w[k], start), weights=w[k])) for k in range(w.shape[0])]
        for a, b in zip(plain, late):
            assert all(torch.equal(a[n], b[n]) for n in a)


def test_vmapped_retrains_equal_the_plain_ones_to_rounding(run):
    w = removal_weights(run)
    plain = [flatten_state(replay(run, run.window_start, weights=w[k])) for k in range(w.shape[0])]
    batched = [flatten_state(s) for s in retrain_many(run, w, run.window_start, vmap_steps=True)]
    moved = 0.0
    for a, b in zip(plain, batched):
        for n in a:
            assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), n
            moved = max(moved, float((a[n] - flatten_state(run.final_state())[n]).abs().max()))
    assert moved > 1e-6  # the retrains did change the state: the comparison is not vacuous


def test_counterfactuals_equal_one_at_a_time(run):
    removals = [[3], [11, 12], [40]]
    single = [gc.counterfactual(run, r, "all") for r in removals]
    assert gc.counterfactuals(run, removals, "all", batched=False) == single
    for a, b in zip(gc.counterfactuals(run, removals, "all", batched=True), single):
        assert a["delta"] == pytest.approx(b["delta"], rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("vmap_steps", [False, True])
def test_groups_share_one_replay_of_the_trajectory_and_change_nothing(run, monkeypatch, vmap_steps):
    """Retrains in small groups (sorted by fork step) give the same states as one group, and the
    unperturbed trajectory is stepped once in all: from the checkpoint before the first fork
    to the last fork."""
    import gancleanse.training.retrain as retrain

    w = removal_weights(run)
    whole = [flatten_state(s) for s in retrain_many(run, w, run.window_start, vmap_steps=vmap_steps)]
    base_steps = []
    real_check = retrain.check_finite

    def counting_check(state, stats, step, steps_per_epoch):
        base_steps.append(step)
        real_check(state, stats, step, steps_per_epoch)

    monkeypatch.setattr(retrain, "check_finite", counting_check)
    grouped = [flatten_state(s) for s in retrain_many(run, w, run.window_start, vmap_steps=vmap_steps, group=2)]
    for a, b in zip(whole, grouped):
        for n in a:
            if vmap_steps:  # other groupings batch other rows together: equal to rounding
                assert torch.allclose(a[n], b[n], rtol=1e-10, atol=1e-12), n
            else:
                assert torch.equal(a[n], b[n]), n
    first = first_use_steps(run, w != 1, run.window_start)
    forks = first[first < run.final_step]
    begin = retrain.checkpoint_before(run, int(forks.min()), run.window_start)
    if vmap_steps:  # only the trajectory's own steps are checked one at a time
        assert base_steps == list(range(begin, int(forks.max())))


def test_group_size_follows_the_memory_budget(run):
    from gancleanse.training.retrain import MAX_GROUP, group_size, retrain_bytes

    state = run.final_state()
    per = retrain_bytes(run, state, True)
    assert per > retrain_bytes(run, state, False) > 0
    assert group_size(run, state, True, budget=10 * per) == 10
    assert group_size(run, state, True, budget=per // 2) == 1
    assert group_size(run, state, True, budget=10**15) == MAX_GROUP

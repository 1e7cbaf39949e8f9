"""The capacity planner's model (benchmarks/capacity.py): the cases it must get exactly."""

from dataclasses import replace

import pytest

from benchmarks.capacity import SCHEDULES, Scenario, cores_for, predict

SEED = Scenario(
    num_envs=8, workers=8, step_ms=60, exec_len=25, chunk_len=25, base_ms=240, per_item_ms=7.5
)


def test_lock_step_busy_share_is_the_seed_analysis():
    # 300 ms of inference against 1,500 ms of chunk execution: the seed measured about 15%.
    p = predict(SEED, "lock-step")
    assert p["gpu_busy"] == pytest.approx(300 / (300 + 1500))
    assert p["decisions_per_s"] == pytest.approx(8 / 1.8)
    assert cores_for(SEED, "lock-step") is None  # no core count lifts lock-step to 90%


def test_stages_hide_the_smaller_side_and_more_cores_never_slow_a_schedule():
    s = replace(SEED, num_envs=512, workers=16, exec_len=20, lookahead=5)
    for schedule in SCHEDULES:
        rates = [predict(replace(s, workers=w), schedule)["env_steps_per_s"] for w in (16, 64, 256)]
        assert rates == sorted(rates), schedule
    # CPU-bound (few cores): two stages step while the other infers.
    assert predict(s, "2-stage")["decisions_per_s"] >= predict(s, "lock-step")["decisions_per_s"]


def test_lookahead_removes_the_wait_when_d_steps_cover_the_turn():
    s = Scenario(num_envs=1, workers=1, step_ms=1.0, exec_len=6, chunk_len=8,
                 base_ms=1.5, per_item_ms=0.0, lookahead=2)  # fmt: skip
    # Without lookahead a window is 6 ms of stepping plus the 1.5 ms call; with d=2 the
    # call runs during the last 2 ms of stepping.
    assert 1000 / predict(s, "lock-step")["decisions_per_s"] == pytest.approx(7.5)
    assert 1000 / predict(s, "lookahead")["decisions_per_s"] == pytest.approx(6.0)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule='fifo'"):
        predict(SEED, "fifo")


def test_shared_cores_bound_a_cycle_by_its_cpu():
    # 2 workers on 2 cores: 8 envs x 8 ms of physics per cycle; 2 stages' calls take 3 ms of
    # loop and transport CPU each on the same cores. Own cores: the workers' 32 ms bound it;
    # shared: (64 + 2 x 3) / 2 = 35 ms.
    s = Scenario(num_envs=8, workers=2, step_ms=1.0, exec_len=8, chunk_len=8,
                 base_ms=1.0, per_item_ms=0.0)  # fmt: skip
    shared = replace(s, shared_cores=2, loop_cpu_call_ms=3.0)
    assert 1000 / predict(s, "2-stage")["decisions_per_s"] * 8 == pytest.approx(32.0)
    assert 1000 / predict(shared, "2-stage")["decisions_per_s"] * 8 == pytest.approx(35.0)
    # Dynamic batching pays the call's CPU per batch: never faster than cores / (c + cpu/B).
    # (predict() is the planner's model: no clock is read, so load cannot move this.)
    dyn = predict(shared, "dynamic")
    assert dyn["decisions_per_s"] <= 1000 * 2 / (8 + 3.0 / dyn["batch"]) + 1e-9
    assert dyn["decisions_per_s"] < predict(s, "dynamic")["decisions_per_s"]

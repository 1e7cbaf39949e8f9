"""Faults: bad observations, start-up failures, profiles around errors, odd policy dtypes."""

import gc
import os
import signal

import numpy as np
import pytest
import torch
from factories import (
    always_crashes,
    always_fails,
    bad_obs_env,
    fails_in_worker_1,
    fails_once_at_start,
    flaky_env,
    sleeps_forever,
    slow_steps,
)
from helpers import TOY, DtypePolicy, assert_identical, latency_policy, make_engine

from pipeline import (
    EnvError,
    ObservationError,
    WorkerStuckError,
    schema,
)
from pipeline.policies import LatencyPolicy


def _engine(env, policy, **kw):
    return make_engine(policy, env=env, **{"num_envs": 4, **kw})


# -- bad observations -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,match",
    [
        ("shape", r"field 'state' is float32\[7\], expected float32\[8\]"),
        ("dtype", r"field 'image/cam' is float32\[8, 8, 3\], expected uint8\[8, 8, 3\]"),
        ("nan", r"field 'state' contains NaN or inf \(at flat index 2\)"),
        ("missing", r"missing \['image/cam'\]"),
    ],
)
def test_bad_observation_names_env_field_and_expectation(kind, match, backend):
    e = _engine(
        bad_obs_env,
        latency_policy(),
        env_kwargs=dict(TOY, kind=kind, episode_len=50),
        on_worker_failure="raise",
        **backend,
    )
    with pytest.raises(ObservationError, match=match) as info:
        e.rollout(4)
    msg = str(info.value)
    assert "worker 1" in msg and ("env 1" in msg or "env 3" in msg), msg
    assert isinstance(info.value, EnvError)
    assert e.closed


def test_the_observation_check_decides_by_values_not_by_their_sum():
    # The check's fast path tests a float field's float64 sum for finiteness; finite float64
    # values whose sum overflows must still pass, and inf or a wrong key must still fail.
    from pipeline.runtime.observations import BadObservation, check_observation

    fields = [("state", (2,), np.dtype(np.float64), True), ("n", (), np.dtype(np.int64), False)]
    ok = {"state": np.array([1e308, 1e308]), "n": np.array(3)}
    check_observation(0, ok, fields)
    with pytest.raises(BadObservation, match=r"'state' contains NaN or inf \(at flat index 1\)"):
        check_observation(0, {**ok, "state": np.array([1.0, -np.inf])}, fields)
    with pytest.raises(BadObservation, match=r"missing \['n'\], unexpected \['m'\]"):
        check_observation(0, {"state": ok["state"], "m": ok["n"]}, fields)


def test_bad_observation_is_not_written(tmp_path):
    """Caught before the copy: the slot keeps the last good observation."""
    from pipeline.runtime.layout import Layout, SharedBuffers
    from pipeline.runtime.observations import BadObservation
    from pipeline.runtime.worker import Worker, WorkerConfig

    make = lambda: bad_obs_env("nan", bad_env=0, **dict(TOY, episode_len=50))  # noqa: E731
    w = Worker(WorkerConfig(0, make, {}, [0], [(0,)], True, os.getpid()))
    w.create_envs()  # as worker 0, the env that turns bad
    env = w.envs[0]
    layout = Layout(env.spec, num_envs=1, chunk_len=4)
    shm = SharedBuffers.create(layout)
    try:
        w.bind(shm)
        obs, _ = env.reset(seed=1)
        w._write_obs(0, 0, obs, env.instruction)
        good = shm.arrays["obs/state"][0, 0].copy()
        env._observe()  # the second observation is still good; the third is not
        with pytest.raises(BadObservation, match="env 0: observation field 'state'"):
            w._write_obs(0, 0, env._observe(), env.instruction)
        np.testing.assert_array_equal(shm.arrays["obs/state"][0, 0], good)
    finally:
        w.close()


# -- start-up failure (bug: healthy workers were SIGKILLed, never seeing CLOSE) -------------------
def test_startup_failure_closes_the_healthy_workers_cleanly(tmp_path):
    with pytest.raises(EnvError, match="worker 1.*no robot on worker 1"):
        _engine(
            fails_in_worker_1,
            latency_policy(),
            env_kwargs=dict(TOY, marker_dir=str(tmp_path)),
            on_worker_failure="raise",
        )
    # Worker 0 read CLOSE during the hand-shake and closed its 2 envs: a SIGKILL would not.
    closed = os.listdir(tmp_path)
    assert len(closed) == 1 and closed[0].startswith("closed-"), closed


# -- policy dtypes --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_action_chunks_are_accepted(dtype, backend):
    with _engine("toy", DtypePolicy(dtype), **backend) as e:
        td = e.rollout(3)
    chunk = td[schema.ACTION_CHUNK]
    assert chunk.dtype == torch.float32 and td["mask"].all()
    # What was recorded (and executed) is the policy's chunk, converted to float32.
    state = td["observation", "state"].reshape(-1, 8)
    want = DtypePolicy(dtype)(
        __import__("tensordict").TensorDict({schema.STATE: state}, batch_size=[len(state)])
    )[schema.ACTION_CHUNK].float()
    torch.testing.assert_close(chunk.reshape(-1, 4, 7), want, rtol=0, atol=0)
    # Half-precision log-probs widen to float32 (numpy has no bfloat16); others keep theirs.
    widened = torch.float64 if dtype == torch.float64 else torch.float32
    assert td[schema.SAMPLE_LOG_PROB].dtype == widened


# -- CUDA-registered memory ------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropped_cuda_engine_unregisters_before_unmapping():
    policy = latency_policy().cuda()
    e = _engine("toy", policy)
    e.rollout(2)
    pids = e.worker_pids()
    assert e._cuda.registered
    del e
    gc.collect()
    torch.cuda.synchronize()
    import psutil

    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    # A stale registration of the unmapped range would make the next one fail.
    with _engine("toy", policy) as again:
        assert again._cuda.registered
        again.rollout(1)


# -- respawn --------------------------------------------------------------------------------------
def _rollout_pair(tmp_path, how, crashes, schedule="stages", backend=None):
    """The same calls without and with the fault (the faulted run on ``schedule``)."""
    kwargs = dict(TOY, episode_len=9)
    runs = {}
    for fault in (False, True):
        marker_dir = tmp_path / f"fault-{fault}"
        marker_dir.mkdir()
        env_kwargs = dict(kwargs, marker_dir=str(marker_dir), how=how, crashes=crashes * fault)
        sched = dict(schedule=schedule if fault else "stages")
        kw = dict(num_envs=8, env_kwargs=env_kwargs, **sched, **(backend or {}))
        with _engine(flaky_env, latency_policy(), **kw) as e:
            runs[fault] = (e.rollout(10), e.collect_episodes(2, 4), e.stats.restarts, e.failures)
    return runs


@pytest.mark.parametrize(
    "how,crashes,schedule",
    [
        ("kill", 1, "stages"),
        ("segfault", 1, "stages"),
        ("raise", 1, "stages"),
        ("kill", 2, "stages"),  # two replacements in one engine
        ("kill", 1, "dynamic"),  # compared with the fault-free run on fixed stages
    ],
)
def test_failed_worker_is_replaced_and_other_envs_are_bitwise_unchanged(
    tmp_path, how, crashes, schedule, process_backend
):
    _assert_replaced(
        _rollout_pair(tmp_path, how, crashes, schedule, process_backend), how, crashes, schedule
    )


@pytest.mark.parametrize("schedule", ["stages", "dynamic"])
def test_inline_worker_whose_env_raises_is_replaced_and_others_unchanged(tmp_path, schedule):
    runs = _rollout_pair(tmp_path, "raise", 1, schedule, dict(backend="inline"))
    _assert_replaced(runs, "raise", 1, schedule)


def _assert_replaced(runs: dict, how: str, crashes: int, schedule: str) -> None:
    clean, clean_eps, clean_restarts, _ = runs[False]
    td, eps, restarts, failures = runs[True]
    assert clean_restarts == 0 and restarts == crashes and len(failures) == crashes
    failure = failures[0]
    assert all(f.worker == 1 and f.env_ids == [1, 3, 5, 7] for f in failures)
    expect = {"kill": "SIGKILL", "segfault": "SIGSEGV", "raise": "lost its contact cache"}
    assert expect[how] in failure.error
    # Worker 0's envs never noticed: every field of their rows is bitwise the same.
    healthy = [0, 2, 4, 6]
    assert_identical(td[healthy], clean[healthy])
    # The failed worker's envs: the interrupted decisions are masked and flagged aborted...
    failed = [1, 3, 5, 7]
    assert td["aborted"][failed].any() and not clean["aborted"].any()
    assert not (td["mask"] & td["aborted"]).any()
    assert not td["next", "success"][td["aborted"]].any()
    # ...and every decision that is kept is the fault-free run's decision of the same
    # episode at the same step (the retries re-run their episodes from the same seeds).
    ref = {}
    for i in failed:
        for t in range(10):
            if clean["mask"][i, t]:
                ref[int(clean["episode_id"][i, t]), int(clean["sample_seed"][i, t])] = (i, t)
    kept = 0
    for i in failed:
        for t in range(10):
            if td["mask"][i, t]:
                key = (int(td["episode_id"][i, t]), int(td["sample_seed"][i, t]))
                assert key in ref, f"env {i}, decision {t}: {key} is no fault-free decision"
                j, u = ref[key]
                assert_identical(td[i, t], clean[j, u])
                kept += 1
    assert kept > 0
    # collect_episodes after the fault: complete groups, identical to the fault-free run
    # (with dynamic batching, which env ran an episode depends on timing).
    assert (eps["restarts"] == 0).all()
    if schedule == "dynamic":
        eps, clean_eps = eps.exclude("env_id"), clean_eps.exclude("env_id")
    assert_identical(eps, clean_eps)


def test_episode_groups_come_back_complete_after_a_fault(tmp_path, backend):
    """A fault inside collect_episodes: the aborted member re-runs with the same reset seed;
    every episode is bitwise the fault-free one except which env ran it."""
    how = "raise" if backend.get("backend") == "inline" else "kill"  # inline: no process
    eps = {}
    for fault in (False, True):
        marker_dir = tmp_path / f"fault-{fault}"
        marker_dir.mkdir()
        env_kwargs = dict(
            TOY, episode_len=9, marker_dir=str(marker_dir), how=how, crashes=int(fault)
        )
        with _engine(
            flaky_env, latency_policy(), num_envs=8, env_kwargs=env_kwargs, **backend
        ) as e:
            eps[fault] = e.collect_episodes(3, 4)
            assert e.stats.restarts == int(fault)
    clean, got = eps[False], eps[True]
    assert got["restarts"].sum() >= 1 and (clean["restarts"] == 0).all()
    assert (got["length"] > 0).all() and got["next", "done"][got["mask"]].any()
    for key in ("env_id", "restarts"):
        del got[key], clean[key]
    assert_identical(got, clean)


def test_factory_failing_once_at_start_up_is_replaced(tmp_path, backend):
    kw = dict(env_kwargs=dict(TOY, marker_dir=str(tmp_path)), **backend)
    with _engine(fails_once_at_start, latency_policy(), **kw) as e:
        assert e.rollout(2)["mask"].all()
        (failure,) = e.failures
    assert failure.worker == 1 and "license server unreachable" in failure.error


def test_factory_that_always_fails_does_not_loop_forever(backend):
    with pytest.raises(EnvError, match="no such robot") as info:
        _engine(always_fails, latency_policy(), max_restarts=50, **backend)
    assert any("in a row" in note for note in info.value.__notes__)


def test_restart_budget_is_finite(backend):
    e = _engine(always_crashes, latency_policy(), max_restarts=2, **backend)
    with pytest.raises(EnvError, match="diverged") as info:
        e.rollout(4)
    assert any("budget of 2 is spent" in note for note in info.value.__notes__)
    assert e.closed


# -- the spare ------------------------------------------------------------------------------------
def _kill_between_calls(spare: bool, wait: bool = True):
    """Two calls with worker 1 SIGKILLed between them, on a registered env (a spare builds
    its envs ahead for those); with ``wait``, once the spare is ready."""
    import psutil

    with make_engine(latency_policy(), spare_worker=spare) as e:
        first = e.rollout(5)
        # Ready before the kill, so that the replacement takes all four envs built ahead (one
        # assigned while preparing stops early and builds the rest itself: fine, but fewer).
        if wait:
            assert e._pool.wait_spare(120.0) is spare
        victim = e._pool.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        second = e.rollout(10)
        # Every command sent was answered, the lost worker's included: a count left over
        # would keep the loop from spinning for replies (or spin it with the cores taken).
        assert e._pool.owed == [0] * e.num_workers
        pool, spare_pid = e._pool, e._pool._spare.proc.pid if e._pool._spare else None
        used = (e.stats.restarts, pool.spares_used, pool.prebuilt_envs_used)
        assert e.stats.replace_ns > 0  # the loop's time inside the replacement is counted
    if spare_pid is not None:  # the next spare, started after the replacement: closed too
        assert not psutil.pid_exists(spare_pid) or psutil.Process(spare_pid).status() == "zombie"
    return first, second, used


def test_a_spare_replaces_a_killed_worker_with_its_envs_built_ahead_and_the_same_data():
    with_spare, without = _kill_between_calls(True), _kill_between_calls(False)
    assert with_spare[2] == (1, 1, 4)  # one replacement: the spare, its 4 envs built ahead
    assert without[2] == (1, 0, 0)  # a fresh process that built its own
    # Whichever process took over, every recorded byte is the same (aborted retries too).
    for a, b in zip(with_spare[:2], without[:2], strict=True):
        assert_identical(a, b)
    assert with_spare[1]["aborted"][[1, 3, 5, 7]].any()  # the kill did interrupt episodes
    # Assigned at once, perhaps still importing: it stops preparing, says READY first and
    # builds what it lacks; the data are the same whatever it had built.
    early = _kill_between_calls(True, wait=False)
    assert early[2][:2] == (1, 1) and 0 <= early[2][2] <= 4
    for a, b in zip(early[:2], without[:2], strict=True):
        assert_identical(a, b)


def test_a_spare_goes_idle_only_where_it_can_come_back():
    # Unprivileged, the kernel lets a process leave SCHED_IDLE only if RLIMIT_NICE allows
    # its nice value (0 by default: it does not); a spare stuck there would serve starved.
    # In a child process, so that this one's scheduling is never touched.
    import subprocess
    import sys

    code = (
        "import os; from pipeline.runtime.process import _idle_priority; "
        "_idle_priority(True); idle = os.sched_getscheduler(0) == os.SCHED_IDLE; "
        "_idle_priority(False); print(idle, os.sched_getscheduler(0) == os.SCHED_OTHER)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    went_idle, came_back = out.stdout.split()
    assert came_back == "True"
    if os.geteuid() == 0:
        assert went_idle == "True"  # root may always come back, so it does go idle


def test_spare_worker_needs_restarts_and_the_local_backend():
    with pytest.raises(ValueError, match="on_worker_failure='raise'"):
        make_engine(latency_policy(), spare_worker=True, on_worker_failure="raise")
    with pytest.raises(ValueError, match="spare_worker=True needs backend='local'"):
        make_engine(latency_policy(), spare_worker=True, backend="inline")


# -- the watchdog ---------------------------------------------------------------------------------
def test_stuck_worker_is_reported_with_its_stack(process_backend):
    import inspect

    line = (
        next(
            i
            for i, text in enumerate(inspect.getsource(sleeps_forever).splitlines())
            if "time.sleep(3600)" in text
        )
        + inspect.getsourcelines(sleeps_forever)[1]
    )
    e = _engine(
        sleeps_forever,
        latency_policy(),
        hang_timeout_s=2.0,
        on_worker_failure="raise",
        **process_backend,
    )
    with pytest.raises(WorkerStuckError) as info:
        e.rollout(2)
    msg = str(info.value)
    assert "is stuck: its progress counter stayed at" in msg
    assert f"factories.py:{line}" in msg, msg  # py-spy's frame of the env
    # The stack of the thread that found the hang, down to the watchdog. ("_collect" was
    # asserted here before, and passed only where Ray's gc_collect_manager thread was
    # running in the process, which depends on the tests run before.)
    assert "--- inference loop stack ---" in msg
    loop = msg.split("--- inference loop stack ---", 1)[1]
    assert ", in _watchdog\n" in loop and ", in _stuck\n" in loop, loop
    assert e.closed


def test_slow_worker_is_not_stuck():
    """Chunks far longer than hang_timeout_s, made of steps far shorter: no error."""
    policy = LatencyPolicy(state_dim=8, chunk_len=10)
    env_kwargs = dict(TOY, episode_len=50, step_sleep_s=0.2)  # 2 s a chunk, 0.2 s a step
    with _engine(
        slow_steps, policy, env_kwargs=env_kwargs, hang_timeout_s=1.0, on_worker_failure="raise"
    ) as e:
        td = e.rollout(1)
    assert td["mask"].all() and (td["next", "steps_executed"] == 10).all()

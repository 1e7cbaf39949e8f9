"""The engine's invariants: determinism, placement, errors not hangs, clean lifecycle."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import torch
from factories import failing_env
from helpers import TOY, assert_identical, latency_policy, make_engine, shm_segments

import envs
from pipeline import (
    EngineClosedError,
    EngineTimeout,
    EnvError,
    PolicyOutputError,
    RolloutEngine,
    WorkerDiedError,
    schema,
)
from pipeline.policies import LatencyPolicy, TinyVLA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- 1. determinism under any timing -------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [True, False])
def test_bitwise_identical_run_to_run_under_jitter(deterministic):
    jitter = dict(TOY, step_jitter_us=2000)
    runs = []
    for _ in range(2):
        with make_engine(latency_policy(deterministic=deterministic), env_kwargs=jitter) as e:
            runs.append((e.rollout(9), e.collect_episodes(2, 3)))
    assert_identical(runs[0][0], runs[1][0])
    assert_identical(runs[0][1], runs[1][1])


@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_sync_and_pipelined_are_bitwise_identical(num_stages):
    out = {}
    for mode in ("sync", "pipelined"):
        with make_engine(latency_policy(), mode=mode, num_stages=num_stages) as e:
            out[mode] = (e.rollout(6), e.rollout(3), e.collect_episodes(3, 2))
    for a, b in zip(out["sync"], out["pipelined"], strict=True):
        assert_identical(a, b)


def test_tinyvla_stochastic_sync_equals_pipelined():
    spec = envs.make("toy", **TOY).spec
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(spec, chunk_len=4).eval()
    out = {}
    for mode in ("sync", "pipelined"):
        with make_engine(policy, mode=mode, inference_threads=1) as e:
            out[mode] = e.rollout(5)
    assert_identical(out["sync"], out["pipelined"])
    assert out["sync"][schema.SAMPLE_LOG_PROB].shape == (8, 5)
    assert out["sync"][schema.ACTION_TOKENS].shape == (8, 5, 4, 7)


# -- 2. nothing misplaced ------------------------------------------------------------------------
def test_every_byte_lands_at_its_env_and_decision(backend):
    policy = latency_policy()
    with make_engine(policy, exec_len=3, **backend) as e:
        td = e.rollout(12)
    state = td["observation", "state"].numpy()
    image = td["observation", "image", "cam"].permute(0, 1, 3, 4, 2).numpy()
    chunk = td[schema.ACTION_CHUNK].numpy()
    assert td["mask"].all()
    resets = 0
    for i in range(8):
        assert (td["env_id"][i] == i).all()
        env = envs.make("toy", **TOY)
        for t in range(12):
            if td["is_init"][i, t]:
                obs, _ = env.reset(seed=int(td["reset_seed"][i, t]))
                resets += 1
            else:
                assert td["episode_id"][i, t] == td["episode_id"][i, t - 1]
            # The observation the policy saw is the env's, byte for byte.
            assert obs["state"].tobytes() == state[i, t].tobytes(), (i, t)
            assert obs["image/cam"].tobytes() == image[i, t].tobytes(), (i, t)
            # The recorded chunk is what the policy computes for that observation and seed.
            one = schema.make_batch([obs], [env.instruction], [int(td["sample_seed"][i, t])])
            np.testing.assert_array_equal(policy(one)[schema.ACTION_CHUNK][0].numpy(), chunk[i, t])
            res = env.step_chunk(chunk[i, t, :3])
            obs = res.obs
            assert td["next", "steps_executed"][i, t] == res.steps
            assert td["next", "reward"][i, t, 0] == np.float32(res.rewards.sum(dtype=np.float64))
            assert td["next", "terminated"][i, t, 0] == res.terminated
            assert td["next", "truncated"][i, t, 0] == res.truncated
            assert td["next", "done"][i, t, 0] == (res.terminated or res.truncated)
            pad = td[schema.ACTION_IS_PAD][i, t].numpy()
            assert not pad[: res.steps].any() and pad[res.steps :].all()
            if t + 1 < 12:
                assert td["is_init"][i, t + 1] == (res.terminated or res.truncated)
    assert resets > 8  # auto-resets happened mid-rollout


def test_episodes_grouped_and_complete(backend):
    with make_engine(latency_policy(), num_envs=4, num_stages=2, **backend) as e:
        eps = e.collect_episodes(num_groups=3, group_size=4)
    assert eps.batch_size == (12,)
    seeds = eps["reset_seed"][:, 0]
    for g in range(3):
        members = slice(4 * g, 4 * g + 4)
        assert (eps["group_id"][members] == g).all()
        assert (seeds[members] == seeds[4 * g]).all()  # same initial state per group
        assert len(set(eps["sample_seed"][members, 0].tolist())) == 4  # own sampling seeds
        first = eps["observation", "state"][members, 0]
        assert (first == first[0]).all()
    assert len(set(seeds.tolist())) == 3
    lengths = eps["length"]
    mask = eps["mask"]
    assert (mask.sum(1) == lengths).all()
    for k in range(12):
        n = int(lengths[k])
        assert eps["next", "done"][k, n - 1, 0] and not eps["next", "done"][k, : n - 1].any()
        assert eps["is_init"][k, 0] and not eps["is_init"][k, 1:n].any()
        assert eps["env_steps"][k] == eps["next", "steps_executed"][k, :n].sum()
    # 12 episodes on 4 envs: envs were reused, each picking up queued episodes.
    assert len(set(eps["env_id"][:, 0].tolist())) == 4


def test_rollout_without_auto_reset_masks_finished_envs(backend):
    with make_engine(latency_policy(), auto_reset=False, **backend) as e:
        td = e.rollout(6)  # toy episodes are at most 2 decisions of 4 steps (7 steps)
        assert not td["mask"][:, 2:].any() and td["mask"][:, 0].all()
        idle = ~td["mask"]  # entries without a decision read as zeros and -1 ids
        assert (td["observation", "state"][idle] == 0).all()
        assert (td["vla_action", "chunk"][idle] == 0).all()
        assert (td["episode_id"][idle] == -1).all() and (td["sample_seed"][idle] == -1).all()
        assert not td["next", "reward"][idle].any() and not td["is_init"][idle].any()
        td2 = e.rollout(2)  # ended envs restart at the next call
        assert td2["is_init"][:, 0].all() and td2["mask"][:, 0].all()


def test_policy_version_tracks_weight_updates(backend):
    policy = latency_policy()
    with make_engine(policy, **backend) as e:
        a = e.rollout(2)
        with torch.no_grad():
            policy.weight.add_(0.01)  # what an optimizer step does
        b = e.rollout(2)
        e.set_policy_version(7)
        c = e.rollout(1)
    assert (a["policy_version"] == 0).all()
    assert (b["policy_version"] == 1).all()
    assert (c["policy_version"] == 7).all()


# -- 3. errors, not hangs ------------------------------------------------------------------------
def test_env_exception_names_worker_env_and_traceback():
    before = shm_segments()
    e = RolloutEngine(
        failing_env,
        latency_policy(),
        num_envs=4,
        num_workers=2,
        num_stages=2,
        env_kwargs=dict(TOY, episode_len=50),
        on_worker_failure="raise",
    )
    pids = e.worker_pids()
    with pytest.raises(EnvError) as info:
        e.rollout(10)
    msg = str(info.value)
    assert "worker" in msg and "env" in msg and "the gripper fell off" in msg
    assert "Traceback" in msg and "in bad" in msg
    assert e.closed
    _assert_gone(pids, before)


def test_env_factory_exception_is_reported(backend):
    def factory():
        raise RuntimeError("no such robot")

    with pytest.raises(EnvError, match=r"worker \d, env \d .*create.*no such robot"):
        RolloutEngine(
            factory, latency_policy(), num_envs=2, num_workers=2, num_stages=1,
            on_worker_failure="raise", **backend,
        )  # fmt: skip


def test_sigkilled_worker_is_detected_within_the_timeout(process_backend):
    before = shm_segments()
    e = make_engine(
        latency_policy(base_ms=50), hang_timeout_s=20, on_worker_failure="raise", **process_backend
    )
    pids = e.worker_pids()
    e.rollout(1)
    os.kill(pids[1], signal.SIGKILL)
    # Noticed through the process sentinel: a WorkerDiedError, not the EngineTimeout that
    # waiting out hang_timeout_s would raise.
    with pytest.raises(WorkerDiedError, match="worker 1 .*SIGKILL"):
        e.rollout(50)
    _assert_gone(pids, before)


def test_stuck_env_times_out():
    before = shm_segments()
    slow = dict(TOY, step_cost_us=3_000_000)
    e = make_engine(
        latency_policy(), env_kwargs=slow, hang_timeout_s=1.0, on_worker_failure="raise"
    )
    pids = e.worker_pids()
    with pytest.raises(EngineTimeout, match=r"worker \d .* is stuck: its progress counter"):
        e.rollout(2)
    _assert_gone(pids, before)


class _BadPolicy(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.chunk_len = kind, 4

    def forward(self, td):
        b = td.batch_size[0]
        chunk = torch.zeros(b, 4, 7)
        if self.kind == "shape":
            chunk = torch.zeros(b, 3, 7)
        elif self.kind == "dtype":
            chunk = torch.zeros(b, 4, 7, dtype=torch.long)
        elif self.kind == "nan":
            chunk[0, 1, 2] = float("nan")
        elif self.kind == "inf":
            chunk[-1, 0, 0] = float("inf")
        td.set(schema.ACTION_CHUNK, chunk)
        return td


@pytest.mark.parametrize(
    "kind,match", [("shape", "shape"), ("dtype", "dtype"), ("nan", "NaN"), ("inf", "inf")]
)
def test_bad_policy_output_raises_before_the_physics(kind, match, backend):
    e = make_engine(_BadPolicy(kind), **backend)
    with pytest.raises(PolicyOutputError, match=match):
        e.rollout(1)  # an EnvError would mean the bad chunk reached an env
    assert e.closed


def test_use_after_close_raises(backend):
    e = make_engine(latency_policy(), **backend)
    e.close()
    e.close()  # idempotent
    with pytest.raises(EngineClosedError):
        e.rollout(1)
    with pytest.raises(EngineClosedError):
        e.collect_episodes(1, 1)


class _ThreadsSeen(LatencyPolicy):
    """Records torch's intra-op thread count at every policy call."""

    seen: list

    def forward(self, td):
        self.seen.append(torch.get_num_threads())
        return super().forward(td)


@pytest.mark.parametrize("option, expected", [("auto", 1), (1, 1), (None, 3)])
def test_inference_threads_apply_during_a_call_and_are_restored(option, expected):
    # 'auto' on this CPU: the cores not used by the 2 workers, at least 1; None leaves
    # the caller's setting (3 here) alone.
    policy = _ThreadsSeen(state_dim=TOY["state_dim"], chunk_len=4)
    policy.seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with make_engine(policy, inference_threads=option) as e:
            if option == "auto":
                cores = len(os.sched_getaffinity(0))
                expected = max(1, cores - 2)
            e.rollout(2)
            assert torch.get_num_threads() == 3
            e.collect_episodes(1, 2)
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert policy.seen and set(policy.seen) == {expected}


# -- 4. clean lifecycle --------------------------------------------------------------------------
def _assert_gone(pids, shm_before, within=10.0):
    deadline = time.monotonic() + within
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"workers still alive: {alive}"
    assert shm_segments() <= shm_before, shm_segments() - shm_before


def test_close_leaves_nothing_behind():
    before = shm_segments()
    with make_engine(latency_policy()) as e:
        pids = e.worker_pids()
        e.rollout(2)
        assert shm_segments() <= before  # unlinked as soon as the workers attached
    _assert_gone(pids, before)


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from pipeline import RolloutEngine
    from pipeline.policies import LatencyPolicy

    if __name__ == "__main__":
        policy = LatencyPolicy(state_dim=8, chunk_len=4, base_ms=20)
        engine = RolloutEngine("toy", policy, num_envs=4, num_workers=2, num_stages=2,
                               env_kwargs=dict(state_dim=8, step_cost_us=2000))
        with engine:
            print(" ".join(map(str, engine.worker_pids())), flush=True)
            while True:
                engine.rollout(5)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, signal.SIGTERM])
def test_parent_signals_leave_no_workers_or_segments(tmp_path, sig):
    before = shm_segments()
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(root=ROOT))
    # A shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: restore the default, as an interactive user's process has it.
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.5)  # mid-rollout
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say where it hangs
            stacks = subprocess.run(
                [
                    os.path.join(os.path.dirname(sys.executable), "py-spy"),
                    "dump",
                    "--pid",
                    str(proc.pid),
                ],
                capture_output=True,
                text=True,  # fmt: skip
            )
            pytest.fail(f"the script did not exit after {sig!r}:\n{stacks.stdout}{stacks.stderr}")
        _assert_gone(pids, before)
    finally:
        proc.kill()


def test_idle_workers_use_no_cpu_while_the_policy_is_slow(process_backend):
    policy = latency_policy(base_ms=200)
    with make_engine(policy, num_stages=1, num_envs=4, **process_backend) as e:
        e.rollout(1)
        procs = [psutil.Process(p) for p in e.worker_pids()]
        before = [sum(p.cpu_times()[:2]) for p in procs]
        e.rollout(6)  # at least 6 x 200 ms inside the policy, whatever the load
        used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
    # CPU seconds, not a share of wall time: a worker that spun or polled while waiting
    # would burn a good part of the 1.2 s; blocked in a pipe read it burns almost none.
    # (Load can only lower what a spinning worker gets, never raise what a blocked one uses.)
    waited = 6 * policy.latency_s(4)
    for u in used:
        assert u < 0.05 * waited, f"a worker used {u:.3f} CPU-s during {waited:.1f} s of waiting"


# -- real workload ------------------------------------------------------------------------------
def test_engine_runs_sapien_pick_place_with_the_expert(backend):
    """Real SAPIEN physics in the workers, images through shared memory, chunked expert."""
    from pipeline.policies import ExpertPolicy

    kwargs = dict(cameras=("head",), image_size=64)
    policy = ExpertPolicy("tabletop/pick-place", chunk_len=4)
    kw = dict(num_envs=4, num_workers=2, num_stages=2, env_kwargs=kwargs, **backend)
    with RolloutEngine("tabletop/pick-place", policy, **kw) as e:
        eps = e.collect_episodes(num_groups=2, group_size=2)
        td = e.rollout(3)
    assert eps["success"].float().mean() >= 0.75, eps["success"]
    images = eps["observation", "image", "head"]
    assert images.shape[2:] == (3, 64, 64) and images.dtype == torch.uint8
    first = images[:, 0].flatten(1).float()
    assert (first.std(1) > 5).all()  # real rendered scenes, not blank slots
    # The recorded first observation is the env's own reset observation, byte for byte.
    env = envs.make("tabletop/pick-place", **kwargs)
    obs, _ = env.reset(seed=int(eps["reset_seed"][0, 0]))
    assert eps["observation", "state"][0, 0].numpy().tobytes() == obs["state"].tobytes()
    assert images[0, 0].permute(1, 2, 0).numpy().tobytes() == obs["image/head"].tobytes()
    assert eps[schema.INSTRUCTION][0][0] == env.instruction
    assert td.batch_size == (4, 3) and td["mask"].all()

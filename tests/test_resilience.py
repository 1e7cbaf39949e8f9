"""Faults: bad observations, start-up failures, profiles around errors, odd policy dtypes."""

import gc
import os

import numpy as np
import pytest
import torch

from pipeline import EngineError, EnvError, ObservationError, RolloutEngine, schema
from pipeline.policies import LatencyPolicy

TOY = dict(state_dim=8, cameras=("cam",), image_size=8, episode_len=7)


def _latency(**kw):
    return LatencyPolicy(state_dim=TOY["state_dim"], chunk_len=4, **kw)


def _engine(env, policy, **kw):
    args = dict(num_envs=4, num_workers=2, num_stages=2, env_kwargs=TOY, seed=3, hang_timeout_s=30)
    args.update(kw)
    return RolloutEngine(env, policy, **args)


# -- bad observations -----------------------------------------------------------------------------
def _bad_obs_env(kind, bad_env=1, **kw):
    """A toy env that turns bad on its second chunk, in env ``bad_env`` only."""
    import multiprocess

    import envs as E

    env = E.make("toy", **kw)
    observe = env._observe
    calls = [0]
    name = multiprocess.current_process().name  # rollout-worker-W in a worker
    worker = int(name.rsplit("-", 1)[-1]) if name.startswith("rollout-worker-") else 0

    def bad():
        obs = observe()
        calls[0] += 1
        if calls[0] < 3 or worker != bad_env % 2:
            return obs
        if kind == "shape":
            obs["state"] = obs["state"][:-1]
        elif kind == "dtype":
            obs["image/cam"] = obs["image/cam"].astype(np.float32)
        elif kind == "nan":
            obs["state"] = obs["state"].copy()
            obs["state"][2] = np.nan
        elif kind == "missing":
            del obs["image/cam"]
        return obs

    env._observe = bad
    return env


@pytest.mark.parametrize(
    "kind,match",
    [
        ("shape", r"field 'state' is float32\[7\], expected float32\[8\]"),
        ("dtype", r"field 'image/cam' is float32\[8, 8, 3\], expected uint8\[8, 8, 3\]"),
        ("nan", r"field 'state' contains NaN or inf \(at flat index 2\)"),
        ("missing", r"missing \['image/cam'\]"),
    ],
)
def test_bad_observation_names_env_field_and_expectation(kind, match):
    e = _engine(
        _bad_obs_env,
        _latency(),
        env_kwargs=dict(TOY, kind=kind, episode_len=50),
        on_worker_failure="raise",
    )
    with pytest.raises(ObservationError, match=match) as info:
        e.rollout(4)
    msg = str(info.value)
    assert "worker 1" in msg and ("env 1" in msg or "env 3" in msg), msg
    assert isinstance(info.value, EnvError)
    assert e.closed


def test_bad_observation_is_not_written(tmp_path):
    """Caught before the copy: the slot keeps the last good observation."""
    from pipeline.layout import Layout, SharedBuffers
    from pipeline.worker import BadObservation, WorkerConfig, _Worker

    env = _bad_obs_env("nan", bad_env=0, **dict(TOY, episode_len=50))
    w = _Worker(WorkerConfig(0, None, {}, [0], [0], True, os.getpid()), conn=None)
    w.envs = {0: env}
    layout = Layout(env.spec, num_envs=1, chunk_len=4)
    shm = SharedBuffers.create(layout)
    try:
        w.a = shm.arrays
        w.obs_arrays = [(k, shm.arrays[f"obs/{k}"]) for k in layout.obs_keys]
        w.obs_fields = [(k, f.shape, f.dtype, f.dtype.kind == "f") for k, f in env.spec.obs.items()]
        w.written_text = {}
        obs, _ = env.reset(seed=1)
        w._write_obs(0, 0, obs, env.instruction)
        good = shm.arrays["obs/state"][0, 0].copy()
        env._observe()  # the second observation is still good; the third is not
        with pytest.raises(BadObservation, match="env 0: observation field 'state'"):
            w._write_obs(0, 0, env._observe(), env.instruction)
        np.testing.assert_array_equal(shm.arrays["obs/state"][0, 0], good)
    finally:
        w.a = w.obs_arrays = None
        shm.close()


# -- start-up failure (bug: healthy workers were SIGKILLed, never seeing CLOSE) -------------------
def _fails_in_worker_1(marker_dir, **kw):
    import multiprocess

    import envs as E

    if multiprocess.current_process().name.endswith("-1"):
        raise RuntimeError("no robot on worker 1")
    env = E.make("toy", **kw)
    close = env.close

    def closing():
        with open(os.path.join(marker_dir, f"closed-{os.getpid()}"), "w"):
            pass
        close()

    env.close = closing
    return env


def test_startup_failure_closes_the_healthy_workers_cleanly(tmp_path):
    with pytest.raises(EnvError, match="worker 1.*no robot on worker 1"):
        _engine(
            _fails_in_worker_1,
            _latency(),
            env_kwargs=dict(TOY, marker_dir=str(tmp_path)),
            on_worker_failure="raise",
        )
    # Worker 0 read CLOSE during the hand-shake and closed its 2 envs: a SIGKILL would not.
    closed = os.listdir(tmp_path)
    assert len(closed) == 1 and closed[0].startswith("closed-"), closed


# -- profiles --------------------------------------------------------------------------------------
def test_nested_profile_is_refused_and_the_outer_one_survives():
    with _engine("toy", _latency()) as e:
        with e.profile() as prof:
            assert e.profiler is prof
            with pytest.raises(EngineError, match="already running"):
                with e.profile():
                    pass
            e.rollout(2)
        assert e.profiler is None
        report = prof.report()
    assert report.summary["decisions"] == 2 * 4
    assert len(report.processes) == 3


def _failing_env(**kw):
    import envs as E

    env = E.make("toy", **kw)
    apply, count = env._apply, [0]

    def bad(action):
        count[0] += 1
        if count[0] > 5:
            raise ValueError("the gripper fell off")
        return apply(action)

    env._apply = bad
    return env


def test_engine_error_inside_profile_surfaces_as_itself():
    e = _engine(
        _failing_env, _latency(), env_kwargs=dict(TOY, episode_len=50), on_worker_failure="raise"
    )
    with pytest.raises(EnvError, match="the gripper fell off"):
        with e.profile() as prof:
            e.rollout(10)
    assert e.closed
    assert not prof.running and prof.report().summary["window_s"] > 0


# -- policy dtypes --------------------------------------------------------------------------------
class _HalfPolicy(torch.nn.Module):
    """A policy that computes in bfloat16 (as mixed-precision VLAs do)."""

    chunk_len = 4

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, td):
        state = td[schema.STATE].float()
        chunk = torch.tanh(state[:, :7, None].expand(-1, 7, 4).transpose(1, 2)).to(self.dtype)
        td.set(schema.ACTION_CHUNK, chunk)
        td.set(schema.SAMPLE_LOG_PROB, chunk.float().sum((1, 2)).to(self.dtype))
        return td


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_action_chunks_are_accepted(dtype):
    with _engine("toy", _HalfPolicy(dtype)) as e:
        td = e.rollout(3)
    chunk = td[schema.ACTION_CHUNK]
    assert chunk.dtype == torch.float32 and td["mask"].all()
    # What was recorded (and executed) is the policy's chunk, converted to float32.
    state = td["observation", "state"].reshape(-1, 8)
    want = _HalfPolicy(dtype)(
        __import__("tensordict").TensorDict({schema.STATE: state}, batch_size=[len(state)])
    )[schema.ACTION_CHUNK].float()
    torch.testing.assert_close(chunk.reshape(-1, 4, 7), want, rtol=0, atol=0)
    # Half-precision log-probs widen to float32 (numpy has no bfloat16); others keep theirs.
    widened = torch.float64 if dtype == torch.float64 else torch.float32
    assert td[schema.SAMPLE_LOG_PROB].dtype == widened


# -- CUDA-registered memory ------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropped_cuda_engine_unregisters_before_unmapping():
    policy = _latency().cuda()
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

"""Assertions shared by the test modules."""

import os

import torch
from tensordict import TensorDict

from pipeline import schema


def shm_segments() -> set[str]:
    """The engine's names in /dev/shm (there should never be any: it uses memfd)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("vlare_")}


def assert_identical(a: TensorDict, b: TensorDict) -> None:
    """Same keys, shapes, dtypes and bytes (instructions: same strings)."""
    assert a.batch_size == b.batch_size
    keys = set(a.keys(include_nested=True, leaves_only=True))
    assert keys == set(b.keys(include_nested=True, leaves_only=True))
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), key
        else:
            assert va.tolist() == vb.tolist(), key


BACKENDS = ["local", "inline", "ray"]
PROCESS_BACKENDS = ["local", "ray"]  # inline has no process to kill or watch


def backend_args(request) -> dict:
    """``RolloutEngine`` arguments for the backend a parametrized fixture's ``request``
    names: none for local; inline; Ray: one worker per node of the ``ray_cluster`` fixture."""
    if request.param == "local":
        return {}
    if request.param == "inline":
        return dict(backend="inline")
    request.getfixturevalue("ray_cluster")
    return dict(backend="ray", workers_per_node=1)


# A small toy env with one camera: cheap to step, and every field of the layout in use.
TOY = dict(state_dim=8, cameras=("cam",), image_size=8, episode_len=7)


def latency_policy(**kw):
    """A ``LatencyPolicy`` for :data:`TOY` with chunks of 4."""
    from pipeline.policies import LatencyPolicy

    return LatencyPolicy(state_dim=TOY["state_dim"], chunk_len=4, **kw)


def make_engine(policy=None, env="toy", **kw):
    """A small engine: 8 :data:`TOY` envs on 2 workers in 2 stages, seed 3; ``kw`` override
    (``schedule="dynamic"`` drops the stages and keeps to dynamic batches, see
    :func:`dynamic_batches_only`; ``backend="ray"`` puts a worker per node)."""
    from pipeline import RolloutEngine

    args = dict(num_envs=8, num_workers=2, num_stages=2, env_kwargs=TOY, seed=3, hang_timeout_s=30)
    args.update(kw)
    if args.get("schedule") == "dynamic":
        del args["num_stages"]
    if args.get("backend") == "ray":
        args.setdefault("workers_per_node", 1)
    engine = RolloutEngine(env, policy if policy is not None else latency_policy(), **args)
    return dynamic_batches_only(engine)


def dynamic_batches_only(engine):
    """Keep ``schedule="dynamic"``'s adaptive rule on dynamic batches: left alone it may
    choose its fixed stages from the second call on, and a test of dynamic batches would
    then test the stages (tests/test_dynamic.py tests the fallback itself)."""
    if getattr(engine.batching, "stages", None):
        engine.batching.stages = None
    return engine


class DtypePolicy(torch.nn.Module):
    """Chunks (and log-probs) computed from the state in ``dtype``, as mixed-precision VLAs
    compute in bfloat16; with ``nan_after`` calls, a NaN in the last row from then on."""

    chunk_len = 4

    def __init__(self, dtype, nan_after=None):
        super().__init__()
        self.dtype, self.nan_after, self.calls = dtype, nan_after, 0

    def chunk(self, state):
        return torch.tanh(state[:, :7, None].expand(-1, 7, 4).transpose(1, 2)).to(self.dtype)

    def forward(self, td):
        chunk = self.chunk(td[schema.STATE].float())
        self.calls += 1
        if self.nan_after is not None and self.calls > self.nan_after:
            chunk[-1, 0, 0] = float("nan")
        td.set(schema.ACTION_CHUNK, chunk)
        td.set(schema.SAMPLE_LOG_PROB, chunk.float().sum((1, 2)).to(self.dtype))
        return td

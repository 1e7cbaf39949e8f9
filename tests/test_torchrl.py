"""The engine as a TorchRL collector: TorchRL's own BaseCollector contract, checked on a real
RolloutCollector (toy envs, real worker processes), and TorchRL's own buffers on its output."""

import subprocess
import sys

import psutil
import pytest
import torch
from helpers import TOY, assert_identical, latency_policy

from pipeline import PolicyOutputError, schema

torchrl = pytest.importorskip("torchrl")  # the [torchrl] extra; make test installs it
from torchrl.collectors import BaseCollector  # noqa: E402

from pipeline.torchrl import RolloutCollector  # noqa: E402

ENGINE = dict(num_envs=4, num_workers=2, num_stages=2, env_kwargs=TOY, seed=3)


def _frames(**kw):
    args = dict(frames_per_batch=8, **ENGINE)
    return RolloutCollector("toy", latency_policy(), **{**args, **kw})


def _episodes(**kw):
    args = dict(episodes_per_batch=4, group_size=2, **ENGINE)
    return RolloutCollector("toy", latency_policy(), **{**args, **kw})


def test_it_is_a_base_collector_that_iterates_to_total_frames_and_has_a_length():
    c = _frames(total_frames=24)
    assert isinstance(c, BaseCollector) and isinstance(c, torch.utils.data.IterableDataset)
    assert len(c) == 3
    batches = list(c)
    assert [b.batch_size for b in batches] == [torch.Size([4, 2])] * 3
    assert c.frames == 24 and c.batches == 3
    ids = [b["episode_id"] for b in batches]
    assert torch.equal(batches[0][("collector", "traj_ids")], ids[0])
    # Episodes carry over from batch to batch, as a TorchRL collector's envs do.
    assert torch.equal(ids[0][:, -1], ids[1][:, 0]) or batches[0]["next", "done"][:, -1].any()
    for key in ("policy_version", "sample_seed", "mask", "aborted"):
        assert key in batches[0].keys(), key  # nothing the engine records is lost
    c.shutdown()
    episodes = _episodes(total_frames=10)
    with pytest.raises(RuntimeError, match="no length"):
        len(episodes)
    first = next(iter(episodes))
    assert first.batch_size[0] == 4 and torch.equal(first[("collector", "mask")], first["mask"])
    assert (first["group_id"] == torch.tensor([0, 0, 1, 1])).all()
    episodes.shutdown()


def test_bad_batch_sizes_are_named():
    with pytest.raises(ValueError, match="multiple of num_envs=4"):
        _frames(frames_per_batch=6)
    with pytest.raises(ValueError, match="multiple of group_size=2"):
        _episodes(episodes_per_batch=3)
    with pytest.raises(ValueError, match="exactly one of"):
        RolloutCollector("toy", latency_policy(), **ENGINE)
    with pytest.raises(ValueError, match="async_batches collects whole episodes"):
        _frames(async_batches=True)


def test_set_seed_makes_batches_reproducible_and_a_new_seed_changes_them():
    runs = []
    for seed in (7, 7, 8):
        c = _episodes(total_frames=-1)
        assert c.set_seed(seed) == seed
        it = iter(c)
        runs.append([next(it), next(it)])
        c.shutdown()
    assert_identical(runs[0][0], runs[1][0]) and assert_identical(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0]["reset_seed"], runs[2][0]["reset_seed"])


def test_state_dict_resumes_with_the_same_episodes():
    whole = _episodes()
    it = iter(whole)
    reference = [next(it) for _ in range(3)]
    whole.shutdown()
    first = _episodes()
    next(iter(first))
    state = first.state_dict()
    first.shutdown()
    resumed = _episodes()
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in reference[1:]:
        assert_identical(next(it), want)
    assert resumed.batches == 3
    resumed.shutdown()


def test_weight_updates_reach_the_policy_and_are_recorded_with_their_version():
    trainer = latency_policy()
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.25)
    c = _frames()
    it = iter(c)
    assert (next(it)["policy_version"] == 0).all()
    c.update_policy_weights_(trainer, version=5)
    batch = next(it)
    assert (batch["policy_version"] == 5).all()
    for a, b in zip(c.policy.state_dict().values(), trainer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    c.update_policy_weights_(weights=trainer.state_dict())  # next version: 6
    assert (next(it)["policy_version"] == 6).all()
    with pytest.raises(ValueError, match="worker_ids"):
        c.update_policy_weights_(trainer, worker_ids=[0])
    c.shutdown()


def test_async_batches_overlap_the_callers_step_with_the_next_collection():
    c = _episodes(async_batches=True, max_staleness=None)
    versions = []
    for i, batch in enumerate(c):
        versions.append(int(batch["policy_version"][batch["mask"]].min()))
        c.update_policy_weights_(latency_policy(), version=i + 1)
        if i == 2:
            break
    # Batch k was collected while the caller handled batch k - 1: with the weights of
    # version k - 1 for k >= 1 (the update lands between engine calls, never during one).
    assert versions == [0, 0, 1]
    c.shutdown()


def test_shutdown_is_idempotent_and_an_error_mid_iteration_shuts_down():
    c = _frames()
    next(iter(c))
    pids = c.engine.worker_pids()
    c.shutdown()
    c.shutdown()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)

    class Breaks(type(latency_policy())):
        calls = 0

        def forward(self, td):
            out = super().forward(td)
            type(self).calls += 1
            if type(self).calls > 4:  # the first batch is 4 calls: 2 decisions x 2 stages
                out.set(schema.ACTION_CHUNK, out[schema.ACTION_CHUNK] * float("nan"))
            return out

    broken = RolloutCollector(
        "toy", Breaks(state_dim=TOY["state_dim"], chunk_len=4), frames_per_batch=8, **ENGINE
    )
    it = iter(broken)
    next(it)
    pids = broken.engine.worker_pids()
    with pytest.raises(PolicyOutputError, match="NaN"):
        next(it)
    assert broken._engine is None  # BaseCollector.__iter__ shut it down
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_torchrl_buffers_and_schema_accept_the_batches():
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.data.vla import validate_vla_tensordict

    from pipeline.record.views import steps

    c = _episodes()
    batch = next(iter(c))
    c.shutdown()
    assert validate_vla_tensordict(batch, action_key=schema.ACTION_CHUNK) == []
    rb = ReplayBuffer(storage=LazyTensorStorage(64))
    flat = steps(batch)  # the valid steps, flat (pipeline.record.views)
    rb.extend(flat)
    sample = rb.sample(4)
    assert sample[schema.ACTION_CHUNK].shape == (4, 4, 7)


def test_the_core_runs_without_torchrl():
    code = (
        "import sys; sys.modules['torchrl'] = None\n"  # importing it would now fail
        "from pipeline import RolloutEngine\n"
        "from pipeline.policies import LatencyPolicy\n"
        "import pipeline.torchrl\n"  # the package itself is lazy
        "with RolloutEngine('toy', LatencyPolicy(state_dim=8, chunk_len=4), num_envs=2,\n"
        "                   num_workers=1, num_stages=1, env_kwargs={'state_dim': 8}) as e:\n"
        "    assert e.rollout(2)['mask'].all()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

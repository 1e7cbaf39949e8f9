"""Lookahead (latency-aware chunk execution): what runs, what is recorded, determinism."""

import numpy as np
import pytest
import torch
from helpers import assert_identical, make_engine
from tensordict import TensorDict

from pipeline import RolloutEngine, schema
from pipeline.policies import LatencyPolicy, TinyVLA
from pipeline.record.views import steps
from pipeline.schedule.lookahead import Lookahead

TIMER = dict(state_dim=8, cameras=(), episode_len=20)  # state[2]: sum of executed actions


def _engine(policy, **kw) -> RolloutEngine:
    return make_engine(policy, **{"env_kwargs": TIMER, "num_envs": 4, **kw})


def _assert_state_sums_the_executed_actions(td: TensorDict) -> None:
    """state[2] sums every action the env executed: each next observation must show exactly
    the recorded windows' executed actions (frozen prefix included)."""
    chunk, executed = td[schema.ACTION_CHUNK], td[schema.ACTION_IS_PAD].logical_not()
    asum = td[schema.STATE][..., 2].double()
    for i in range(td.shape[0]):
        total = 0.0
        for t in range(td.shape[1] - 1):
            if td["is_init"][i, t]:
                total = 0.0
            total += float(chunk[i, t][executed[i, t]].double().sum())
            if not td["next", "done"][i, t, 0]:
                assert asum[i, t + 1] == pytest.approx(total, abs=1e-3)


def test_windows_run_the_frozen_prefix_then_the_chunk_and_the_record_says_so(backend):
    policy = LatencyPolicy(state_dim=8, chunk_len=8)
    with _engine(policy, lookahead=2, mode="sync", num_stages=1, **backend) as engine:
        assert engine.exec_len == 6  # chunk_len - lookahead leaves room for the prefix
        td = engine.rollout(14)
    chunk, n = td[schema.ACTION_CHUNK], td[schema.PREFIX_LEN]
    prefix = td[schema.ACTION_PREFIX]
    assert set(n.unique().tolist()) == {0, 2}
    assert (n[td["is_init"]] == 0).all()  # an episode's first decision has no prefix
    for i in range(4):
        for t in range(1, 14):
            if n[i, t]:  # the prefix is the previous chunk's actions from this report on
                assert torch.equal(prefix[i, t, :2], chunk[i, t - 1, 6:8])
                assert torch.equal(chunk[i, t, :2], prefix[i, t, :2])  # and it is what ran
                assert (prefix[i, t, 2:] == 0).all()  # H - exec_len = 2 actions reach past
    _assert_state_sums_the_executed_actions(td)
    # Episodes of 20 steps in windows of 6 end inside a frozen prefix: that window ran the
    # prefix only, and the env restarted without one.
    ended_in_prefix = td["next", "done"][..., 0] & (td["next", "steps_executed"] <= n) & (n > 0)
    assert ended_in_prefix.any()
    assert not td[schema.PREFIX_CONDITIONED].any()  # LatencyPolicy ignores it: naive async


SCHEDULES = {
    "sync": dict(mode="sync", num_stages=1),
    "stages": dict(num_stages=2),
    "dynamic": dict(schedule="dynamic"),
}


def test_lookahead_is_bitwise_identical_across_schedules_with_a_conditioned_policy():
    torch.manual_seed(0)
    policy = TinyVLA(state_dim=8, cameras=(), chunk_len=8, prefix_conditioning=True)

    runs = {}
    for name, schedule in SCHEDULES.items():
        # one intra-op thread: the setting under which TinyVLA is bitwise batch-invariant
        with _engine(policy, lookahead=3, exec_len=5, inference_threads=1, **schedule) as e:
            runs[name] = (e.rollout(9), e.collect_episodes(2, 3))
    td = runs["sync"][0]
    assert td[schema.PREFIX_CONDITIONED][td[schema.PREFIX_LEN] > 0].all()
    for name in ("stages", "dynamic"):
        episodes, ref = runs[name][1], runs["sync"][1]
        assert_identical(runs["sync"][0], runs[name][0])
        # which env ran an episode depends on timing
        assert_identical(ref.exclude("env_id"), episodes.exclude("env_id"))


def test_token_head_log_probs_recompute_from_the_recorded_data_alone():
    torch.manual_seed(1)
    policy = TinyVLA(state_dim=8, cameras=(), chunk_len=8, prefix_conditioning=True)
    with _engine(policy, lookahead=2) as engine:
        eps = engine.collect_episodes(2, 2)
    batch = steps(eps)
    tokens, n = batch[schema.ACTION_TOKENS], batch[schema.PREFIX_LEN]
    assert (n > 0).any() and (n == 0).any()
    frozen = torch.arange(8) < n[:, None]
    prefix_tokens = ((batch[schema.ACTION_PREFIX] + 1) * 255 / 2).round().long()
    assert torch.equal(tokens[frozen], prefix_tokens[frozen])  # frozen tokens are the prefix
    # Only what the recorded TensorDict holds: observations, prefix, seeds, tokens.
    again = policy.log_prob(TensorDict(dict(batch.items()), batch.batch_size), tokens)
    torch.testing.assert_close(again, batch[schema.SAMPLE_LOG_PROB], atol=1e-4, rtol=1e-5)
    # The sampled part only: a frozen token's probability is not the policy's to answer for.
    full = policy.token_log_probs(batch, tokens).sum(dim=(1, 2))
    assert not torch.allclose(full[n > 0], again[n > 0])


def test_flow_head_log_probs_recompute_and_the_prefix_stands():
    torch.manual_seed(2)
    policy = TinyVLA(
        state_dim=8, cameras=(), chunk_len=8, head="flow", flow_steps=4,
        prefix_conditioning=True, flow_sigma=0.2,
    )  # fmt: skip
    # Lock-step: each decision's batch is one column of the output, so the recompute runs
    # the same batches (the flow head is not batch-invariant; see TinyVLA).
    with _engine(policy, lookahead=2, mode="sync", num_stages=1) as engine:
        td = engine.rollout(6)
    n = td[schema.PREFIX_LEN]
    assert (n > 0).any()
    frozen = torch.arange(8) < n[..., None]
    chunk = td[schema.ACTION_CHUNK]
    assert torch.equal(chunk[frozen], td[schema.ACTION_PREFIX][frozen])
    for t in range(td.shape[1]):
        again = policy.log_prob(td[:, t], chunk[:, t])
        torch.testing.assert_close(again, td[schema.SAMPLE_LOG_PROB][:, t], atol=1e-3, rtol=1e-5)
    # Under autograd too (a trainer differentiates it through the guidance).
    with torch.enable_grad():
        batch = steps(td)
        logp = policy.log_prob(batch[:4], batch[schema.ACTION_CHUNK][:4])
        logp.sum().backward()
    assert policy.velocity_out.weight.grad is not None


def test_flow_guidance_pulls_the_chunk_towards_the_previous_one():
    torch.manual_seed(3)
    kw = dict(state_dim=8, cameras=(), chunk_len=8, head="flow", flow_steps=5)
    guided = TinyVLA(**kw, prefix_conditioning=True)
    plain = TinyVLA(**kw)
    plain.load_state_dict(guided.state_dict())  # the same network, without conditioning
    b = 6
    td = TensorDict(
        {
            schema.STATE: torch.randn(b, 8),
            schema.SAMPLE_SEED: torch.arange(b),
            schema.ACTION_PREFIX: torch.cat(
                [torch.rand(b, 5, 7) * 2 - 1, torch.zeros(b, 3, 7)], dim=1
            ),
            schema.PREFIX_LEN: torch.full((b,), 2),
            schema.PREFIX_OVERLAP: torch.full((b,), 5),
        },
        batch_size=[b],
    )
    y = td[schema.ACTION_PREFIX]
    a = guided(td.clone())[schema.ACTION_CHUNK]
    u = plain(td.clone())[schema.ACTION_CHUNK]
    assert torch.equal(a[:, :2], y[:, :2])  # frozen: exactly the previous chunk
    soft = slice(2, 5)  # the rest of the previous chunk's reach: pulled towards it
    assert (a[:, soft] - y[:, soft]).abs().mean() < (u[:, soft] - y[:, soft]).abs().mean()


def test_auto_delay_is_the_longest_recent_latency_in_median_steps():
    la = Lookahead.check("auto", chunk_len=16, exec_len=None)
    assert (la.exec_len, la.max_d) == (8, 7)
    assert la.delay() == 7  # nothing measured yet: as much as the chunk allows
    ms = 1_000_000
    steps4 = np.full(4, 5)
    la.observe(int(2.5 * ms), np.full(4, 5 * ms), steps4)  # 1 ms a step
    assert la.delay() == 3  # 2.5 steps of latency: covered by 3
    la.observe(int(0.5 * ms), np.full(4, 5 * ms), steps4)
    assert la.delay() == 3  # the longest latency in the window counts, not the last
    la.observe(int(0.5 * ms), np.full(4, 20 * ms), steps4)
    la.observe(int(0.5 * ms), np.full(4, 20 * ms), steps4)
    assert la.delay() == 1  # the median step is now 4 ms: 2.5 ms is one step
    la.observe(int(100 * ms), np.full(4, 20 * ms), steps4)
    assert la.delay() == 7  # capped at what the chunk allows
    for _ in range(32):  # the window forgets: only the last 32 decisions count
        la.observe(int(6 * ms), np.full(4, 5 * ms), steps4)
    assert la.delay() == 6
    la.observe(int(6 * ms), np.zeros(4), np.zeros(4, int))  # nothing stepped: no step time
    assert la.delay() == 6
    fixed = Lookahead.check(2, chunk_len=8, exec_len=None)
    fixed.observe(int(100 * ms), np.full(4, ms), steps4)
    assert fixed.delay() == 2


def test_auto_lookahead_records_what_ran(backend):
    # The delay follows the machine (a loaded one steps slower), so what must hold is that
    # every recorded prefix is in range, is the previous chunk's actions, and is what ran.
    policy = LatencyPolicy(state_dim=8, chunk_len=8, base_ms=20)
    kw = dict(TIMER, episode_len=200, step_cost_us=1000)
    args = dict(lookahead="auto", env_kwargs=kw, mode="sync", num_stages=1, **backend)
    with _engine(policy, **args) as e:
        assert (e.exec_len, e.lookahead.max_d) == (4, 3)
        td = e.rollout(12)
    n = td[schema.PREFIX_LEN]
    assert (n[:, 0] == 0).all()  # the first decision has no prefix
    assert ((n[:, 1:] >= 1) & (n[:, 1:] <= 3)).all()  # any latency needs one step at least
    chunk, prefix = td[schema.ACTION_CHUNK], td[schema.ACTION_PREFIX]
    for i in range(4):
        for t in range(1, 12):
            k = int(n[i, t])
            assert torch.equal(prefix[i, t], torch.cat([chunk[i, t - 1, 4:], torch.zeros(4, 7)]))
            assert torch.equal(chunk[i, t, :k], prefix[i, t, :k])
    _assert_state_sums_the_executed_actions(td)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lookahead=-1), "int >= 0"),
        (dict(lookahead="later"), "int >= 0 or 'auto'"),
        (dict(lookahead=4, exec_len=4), "value < exec_len"),
        (dict(lookahead=3, exec_len=6), "exec_len \\+ lookahead <= chunk_len"),
        (dict(lookahead="auto", exec_len=8), "room for a prefix"),
    ],
)
def test_bad_lookahead_is_named(kw, match):
    policy = LatencyPolicy(state_dim=8, chunk_len=8)
    with pytest.raises(ValueError, match=match):
        _engine(policy, **kw)

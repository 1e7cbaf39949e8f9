"""First-ready dynamic batching: the batching rule, argument errors, bitwise identity with
synchronous rollouts under random step times and batch compositions, faults."""

import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from factories import stuck_env
from helpers import DtypePolicy, assert_identical, dynamic_batches_only

import envs
from pipeline import PolicyOutputError, RolloutEngine, WorkerStuckError, schema
from pipeline.policies import LatencyPolicy, TinyVLA
from pipeline.schedule.dynamic import (
    WAIT_FOR_REPLY,
    AdaptiveBatching,
    Batching,
    rule_candidates,
    simulate,
    simulate_stages,
)

# Step costs drawn per chunk with CV 1 (unseeded): which envs are ready together differs
# from run to run and from turn to turn; the results must not.
JITTERY = dict(
    state_dim=8, cameras=("head",), image_size=16, episode_len=9, step_cost_us=300,
    step_cost_cv=1.0,
)  # fmt: skip


def test_batching_rule():
    rule = Batching.check(num_envs=8, min_batch=2, max_batch=4, max_wait_us=100)
    assert rule.wait_ns(ready=0, oldest_ns=0, now_ns=0, more_coming=True) == WAIT_FOR_REPLY
    assert rule.wait_ns(ready=1, oldest_ns=0, now_ns=10**9, more_coming=True) == WAIT_FOR_REPLY
    assert rule.wait_ns(ready=1, oldest_ns=0, now_ns=0, more_coming=False) is None  # no more
    assert rule.wait_ns(ready=2, oldest_ns=0, now_ns=40_000, more_coming=True) == 60_000
    assert rule.wait_ns(ready=2, oldest_ns=0, now_ns=100_000, more_coming=True) is None
    assert rule.wait_ns(ready=4, oldest_ns=0, now_ns=0, more_coming=True) is None  # full
    default = Batching.check(8, None, None, None)
    assert (default.min_batch, default.max_batch, default.max_wait_ns) == (1, 8, 0)
    assert default.wait_ns(ready=1, oldest_ns=5, now_ns=5, more_coming=True) is None


def _fed(base_ms: float, per_item_ms: float, steps, rule=None, rounds: int = 8):
    """``rule`` (default: an adaptive rule for 16 envs on 2 workers) fed ``rounds`` of
    first-ready's mix of batch sizes, as the runner feeds it: calls of ``base_ms +
    per_item_ms * B`` and chunk times ``steps`` (ms, all equal; or a function of the batch
    size giving them in ns); then refitted on everything fed (observe refits at most every
    2 s)."""
    rule = AdaptiveBatching(num_envs=16, num_workers=2) if rule is None else rule
    chunks = steps if callable(steps) else lambda b: np.full(b, steps * 1e6)
    for b in (1, 3, 16, 2, 5) * rounds:
        rule.observe(b, int((base_ms + per_item_ms * b) * 1e6), chunks(b))
    rule.refit()
    return rule


def test_batching_simulation_matches_the_closed_forms():
    ms = 1e6
    steps = np.full(64, 4 * ms)
    # One batch of all 16: lock-step, L(16) + 8 chunks per worker per round.
    lock = simulate(16, 2, (ms, ms), steps, batch=16, wait_ns=10**12)
    assert lock.rate == pytest.approx(16 / (17 + 8 * 4) * 1e3, rel=1e-6) and lock.batch == 16
    # Batches of one: device-bound at 1 / L(1).
    one = simulate(16, 2, (ms, ms), steps, batch=1, wait_ns=0)
    assert one.rate == pytest.approx(500, rel=1e-6) and one.batch == 1
    # Two balanced stages (L(8) = 16 ms = 4 chunks of 4 ms per worker): the device never idles.
    two = simulate(16, 2, (0, 2 * ms), steps, 8, 0)
    assert two.rate == pytest.approx(16 / 32 * 1e3, rel=1e-6) and two.batch == 8


def test_stage_simulation_matches_the_closed_forms_and_bounds_the_scheduler_bench():
    from benchmarks.scheduler import ceiling

    ms = 1e6
    steps = np.full(64, 4 * ms)
    lock = simulate_stages(16, 2, (ms, ms), steps, stages=1)
    assert lock == pytest.approx(16 / (17 + 8 * 4) * 1e3, rel=1e-6)
    assert simulate_stages(16, 2, (0, 2 * ms), steps, stages=2) == pytest.approx(500, rel=1e-6)
    # Equal chunk times: nothing for dynamic batching to win; spread ones: stages wait.
    latency = dict(base_ms=8.4, per_item_ms=3.14)
    assert ceiling(0.0, 8.37, latency, 16, 2)["ratio"] == pytest.approx(1.0, abs=0.02)
    assert ceiling(1.0, 8.37, latency, 16, 2)["ratio"] > 1.05


def test_adaptive_batching_fits_the_latency_and_picks_from_the_simulation():
    # Before two batch sizes are seen: first-ready.
    rule = AdaptiveBatching(num_envs=16, num_workers=2)
    rule.observe(16, 5_000_000, np.full(16, 1_000_000))
    assert (rule.max_batch, rule.max_wait_ns, rule.fitted) == (16, 0, False)
    assert (
        rule.wait_ns(ready=1, oldest_ns=0, now_ns=time.perf_counter_ns(), more_coming=True) is None
    )
    # The scheduler bench's balanced case: L(B) = 1 + 0.375 B ms, 1 ms chunks.
    rule = _fed(1.0, 0.375, 1.0)
    a, b = rule.latency_model()
    assert a == pytest.approx(1e6) and b == pytest.approx(0.375e6)
    rule.fitted = False  # a first fit, with no choice in force
    rule.refit()
    assert rule.fitted and rule.max_wait_ns in (0, 1_000_000)
    steps = np.full(16, 1e6)
    rounds = AdaptiveBatching.SIM_ROUNDS
    sims = {
        (B, w): simulate(16, 2, (a, b), steps, B, w, rounds)
        for B, w in rule_candidates(16, 2, a, steps)
    }
    assert (rule.max_batch, rule.max_wait_ns) in sims
    chosen = sims[rule.max_batch, rule.max_wait_ns]
    # Within the rule's tie of the fastest candidate, and no tied one forms larger batches.
    tie = (1 - AdaptiveBatching.SIMULATION_TIE) * max(r.rate for r in sims.values())
    assert chosen.rate >= tie
    assert all(r.batch <= chosen.batch for r in sims.values() if r.rate >= tie)
    # A choice in force that still ties with the fastest is kept: no flipping between equals.
    now = (rule.max_batch, float(rule.max_wait_ns))
    tied = [c for c, r in sims.items() if r.rate >= tie and c != now]
    assert tied, "the balanced case has several equal candidates"
    rule.max_batch, rule.max_wait_ns = tied[0][0], int(tied[0][1])
    rule.refit()
    assert (rule.max_batch, rule.max_wait_ns) == (tied[0][0], int(tied[0][1]))
    # The wait runs from when the policy became free, or from when the first env became
    # ready after that.
    rule.max_batch, rule.max_wait_ns = 8, 1_000_000
    free = rule._free_ns
    assert rule.wait_ns(ready=0, oldest_ns=0, now_ns=free, more_coming=True) == WAIT_FOR_REPLY
    assert rule.wait_ns(ready=8, oldest_ns=0, now_ns=free, more_coming=True) is None  # full
    assert rule.wait_ns(ready=3, oldest_ns=0, now_ns=free, more_coming=False) is None  # no more
    assert rule.wait_ns(ready=3, oldest_ns=0, now_ns=free + 400_000, more_coming=True) == 600_000
    assert rule.wait_ns(ready=3, oldest_ns=0, now_ns=free + 10**6, more_coming=True) is None
    late = free + 500_000
    assert rule.wait_ns(ready=1, oldest_ns=late, now_ns=late + 10**5, more_coming=True) == 900_000
    # A per-call cost that dominates: large batches.
    assert _fed(20.0, 0.01, 1.0).max_batch >= 12


def test_adaptive_batching_infers_at_once_for_spread_step_times():
    # CV 1: the stages wait for stragglers (the simulation puts them 15% below), so the rule
    # infers at once, for the largest batch the simulation rates as equal to the fastest.
    rng = np.random.default_rng(2)
    rule = _fed(8.4, 3.14, lambda b: rng.gamma(1.0, 8.37e6, b))
    assert rule.max_wait_ns == 0 and rule.max_batch > 8


def test_adaptive_batching_waits_for_larger_batches_while_the_workers_have_envs_queued():
    # 256 envs on 2 workers, 1.6 ms chunks, a 2 ms device call: the device idles whatever
    # the rule does, and the workers have 128 envs each queued, so waiting costs the
    # simulation nothing. Of the tied candidates the rule takes the one forming the largest
    # batches (first-ready formed batches of 2.6, costing the loop 0.4 ms per decision).
    rule = _fed(2.0, 0.01, 1.6, AdaptiveBatching(num_envs=256, num_workers=2), rounds=60)
    assert rule.fitted and rule.max_wait_ns > 2e6
    a, b = rule.latency_model()
    m, k = AdaptiveBatching.SIM_ENVS, 256 / AdaptiveBatching.SIM_ENVS
    steps, rounds = np.full(64, 1.6e6 * k), AdaptiveBatching.SIM_ROUNDS
    at_once = simulate(m, 2, (a, b * k), steps, m, 0.0, rounds)
    chosen = simulate(m, 2, (a, b * k), steps, round(rule.max_batch / k), rule.max_wait_ns, rounds)
    assert chosen.rate >= (1 - AdaptiveBatching.SIMULATION_TIE) * at_once.rate
    assert chosen.batch >= 4 * at_once.batch


def test_the_loop_sleeps_only_while_no_reply_can_change_a_waiting_batch():
    from collections import Counter
    from types import SimpleNamespace

    from pipeline.schedule.runners import _quiet_ns

    ms = 1_000_000
    rule = SimpleNamespace(quickest_step_ns=ms, max_batch=16)
    flight = Counter({0: 5, 1: 3})
    # 14 more replies cannot come from 8 in flight: only the stepping's end counts, and
    # worker 0 steps its 5 one after another (the first may end at once).
    assert _quiet_ns(2, flight, rule) == 4 * ms
    # 4 more replies from 2 workers: the second of one worker's, 1 ms away at the earliest.
    rule.max_batch = 6
    assert _quiet_ns(2, flight, rule) == 1 * ms
    rule.max_batch = 4  # 2 more: the first of each worker's could come at once
    assert _quiet_ns(2, flight, rule) == 0
    assert _quiet_ns(2, Counter({0: 0, 1: 0}), rule) == 0  # nothing in flight
    assert _quiet_ns(2, flight, SimpleNamespace(quickest_step_ns=0.0, max_batch=16)) == 0
    # The adaptive rule's quickest chunk: unknown (0) until a fit, then lowered at once by
    # any quicker chunk, never raised between refits.
    rule = AdaptiveBatching(num_envs=16, num_workers=2)
    rule.observe(4, 5 * ms, np.full(4, 2.0 * ms))
    assert rule.quickest_step_ns == 0
    rule = _fed(8.4, 3.14, 8.37)
    assert rule.quickest_step_ns == pytest.approx(8.37 * ms)
    rule.observe(2, 15 * ms, np.array([3.0 * ms, 0.0]))
    rule.observe(2, 15 * ms, np.array([9.0 * ms, 20.0 * ms]))
    assert rule.quickest_step_ns == pytest.approx(3.0 * ms)


def test_the_dynamic_loop_looks_at_each_env_once_per_reply():
    # Its bookkeeping is per reply, never a scan of the fleet at every wake-up (which cost
    # 0.14 ms per decision at 256 envs): plan.wants runs about once per decision.
    from pipeline.record.plans import RolloutPlan

    calls = 0
    wants = RolloutPlan.wants

    def counted(plan, s):
        nonlocal calls
        calls += 1
        return wants(plan, s)

    policy = LatencyPolicy(state_dim=8, chunk_len=4, base_ms=1.0)
    with RolloutEngine(
        "toy", policy, num_envs=32, schedule="dynamic", env_kwargs=dict(state_dim=8)
    ) as engine:
        RolloutPlan.wants = counted
        try:
            engine.rollout(6)
        finally:
            RolloutPlan.wants = wants
    assert 32 * 6 <= calls <= 32 * 6 + 2 * 32, calls


def test_adaptive_batching_simulates_a_large_fleet_as_a_small_one():
    # A fleet of n envs stands for one of m = n / k with k times the chunk time and k times
    # the per-item cost: the same round time, k times fewer decisions.
    rng = np.random.default_rng(1)
    steps = rng.gamma(4.0, 0.5e6, 512)  # CV 0.5, mean 2 ms
    a, b = 2e6, 0.25e6
    for B, w in ((16, 0.0), (32, a), (48, 0.0)):
        full = simulate(64, 2, (a, b), steps, B, w, rounds=12).rate
        small = 4 * simulate(16, 2, (a, 4 * b), 4 * steps, B // 4, w, rounds=48).rate
        assert small == pytest.approx(full, rel=0.08), (B, w)
    rule = AdaptiveBatching(num_envs=1024, num_workers=2)
    for size in (64, 512, 1024, 128):
        rule.observe(size, int(a + b * size), steps[:size])
    rule.refit()
    assert rule.fitted and 1 <= rule.max_batch <= 1024


def test_adaptive_batching_falls_back_to_fixed_stages_where_they_are_as_fast():
    # Equal chunk times (CV 0): nothing for dynamic batching to win, so the fixed stages.
    equal = lambda b: np.full(b, 8.37e6)
    rule = _fed(8.4, 3.14, equal, AdaptiveBatching(num_envs=16, num_workers=2, stages=2))
    assert rule.fitted and rule.fixed_stages
    # Without a fallback (an odd fleet, say) it never chooses them.
    assert not _fed(8.4, 3.14, equal).fixed_stages
    # A small fleet too waits for FIRST_FIT_CHUNKS chunks before its first fit.
    small = AdaptiveBatching(num_envs=4, num_workers=2, stages=2)
    first = AdaptiveBatching.FIRST_FIT_CHUNKS
    for b in (1, 3) * (first // 4 - 1):
        small.observe(b, int((8.4 + 3.14 * b) * 1e6), equal(b))
    small.refit()
    assert not small.fitted  # 4 chunks short
    small.observe(4, int((8.4 + 3.14 * 4) * 1e6), equal(4))
    small.refit()
    assert small.fitted
    # CV 1: the stages wait for stragglers (15% below dynamic in the simulation).
    rng = np.random.default_rng(2)
    spread = lambda b: rng.gamma(1.0, 8.37e6, b)
    rule = _fed(8.4, 3.14, spread, AdaptiveBatching(num_envs=16, num_workers=2, stages=2))
    assert rule.fitted and not rule.fixed_stages
    # The choice follows the measurements: equal chunk times again bring the stages back
    # (the recent chunk times are what the refit simulates).
    for _ in range(8):
        rule.observe(8, int((8.4 + 3.14 * 8) * 1e6), equal(8))
    rule.refit()
    assert rule.fixed_stages
    # The stages in force hold within the simulation's tie below the margin: with a margin
    # that puts their simulated rate half a tie short, they are kept, not chosen afresh.
    a, b = rule.latency_model()
    steps = np.array(rule._env_ns)
    best = max(
        simulate(16, 2, (a, b), steps, B, w, rule.SIM_ROUNDS).rate
        for B, w in rule_candidates(16, 2, a, steps)
    )
    staged = simulate_stages(16, 2, (a, b), steps, 2, rule.SIM_ROUNDS)
    rule.STAGES_MARGIN = 1 - staged / best - rule.SIMULATION_TIE / 2
    rule.refit()
    assert rule.fixed_stages
    rule.fixed_stages = False
    rule.refit()
    assert not rule.fixed_stages


@pytest.mark.parametrize(
    "num_envs,num_workers,stages", [(16, 2, 2), (8, 4, 2), (9, 2, None), (8, 5, None)]
)
def test_the_fallback_stages_exist_where_every_worker_holds_envs_of_both(
    num_envs, num_workers, stages
):
    from pipeline.config import EngineConfig

    cfg = EngineConfig(num_envs=num_envs, num_workers=num_workers, schedule="dynamic")
    assert cfg.batching().stages == stages
    fixed = EngineConfig(num_envs=8, num_workers=2, schedule="dynamic", max_batch=4)
    assert not hasattr(fixed.batching(), "stages")  # a fixed rule has no fallback


def _calls(engine, calls, force: bool):
    """Each ``(fixed, n)`` of ``calls``: ``rollout(n)``, or ``collect_episodes(3, 3)`` for
    ``n=None``, with the rule's choice forced first (``fixed`` stages or not) if ``force``;
    the outputs and each call's batch sizes."""
    out, sizes = [], []
    for fixed, n in calls:
        if force:
            engine.batching.fixed_stages = fixed
        engine.stats.reset()
        out.append(engine.rollout(n) if n else engine.collect_episodes(3, 3))
        sizes.append((set(engine.stats.batch_sizes), engine.stats.fixed_stage_calls))
    return out, sizes


@pytest.mark.parametrize(
    "backend,lookahead", [("local", 0), ("local", 1), ("ray", 0)], indirect=["backend"]
)
def test_switching_to_the_fallback_stages_and_back_keeps_the_trajectories(backend, lookahead):
    # Envs carry their episodes from call to call, each single-env stage in its own slot:
    # after collect_episodes (9 episodes of 3 chunks on 8 envs: one env runs two, then parks
    # a chunk's parity away from the others) the fixed stages take over envs in both slots,
    # and a handover must carry the odd ones over first: parked envs (reset at the next
    # call), and, after the dynamic rollout that follows, envs in the middle of an episode
    # (with lookahead, their prefix and the actions they executed after their report).
    spec = envs.make("toy", **JITTERY).spec
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(spec, chunk_len=4, prefix_conditioning=lookahead > 0)
    calls = [(False, 3), (False, None), (True, 2), (False, 3), (False, None), (False, 4)]
    calls += [(True, 3), (True, 2), (False, 2), (True, None), (True, 3)]
    args = dict(
        num_envs=8, num_workers=2, env_kwargs=JITTERY, seed=11, inference_threads=1,
        lookahead=lookahead,
    )  # fmt: skip
    with RolloutEngine("toy", policy, mode="sync", num_stages=1, **args) as e:
        ref, _ = _calls(e, calls, force=False)
    with RolloutEngine("toy", policy, schedule="dynamic", **args, **backend) as e:
        out, sizes = _calls(e, calls, force=True)
        assert not e.failures
    for (fixed, _), (seen, on_fixed) in zip(calls, sizes, strict=True):
        assert on_fixed == fixed, (fixed, on_fixed)
        assert (seen == {4}) if fixed else (max(seen) > 4 or len(seen) > 1), (fixed, seen)
    for (_, n), got, want in zip(calls, out, ref, strict=True):
        # collect_episodes: which env ran an episode depends on timing; nothing else should
        assert_identical(got, want) if n else assert_identical(
            got.exclude("env_id"), want.exclude("env_id")
        )


def test_adaptive_batching_refits_less_often_while_its_choice_holds():
    rule = _fed(8.4, 3.14, 8.37)
    lo, hi = AdaptiveBatching.REFIT_NS
    everies = []
    for _ in range(7):
        rule._next_fit_ns = 0  # due now
        rule.observe(8, int(8.4e6 + 8 * 3.14e6), np.full(16, 8.37e6))
        rule.observe(8, int(8.4e6 + 8 * 3.14e6), np.full(16, 8.37e6))
        everies.append(rule._fit_every_ns)
    assert everies[-1] == hi and everies == sorted(everies) and everies[0] <= 4 * lo
    # A choice that waits holds too, though the waits it is chosen from (fractions of
    # measured times) are never the same twice.
    rng = np.random.default_rng(3)
    rule = _fed(2.0, 0.01, 1.6, AdaptiveBatching(num_envs=256, num_workers=2), rounds=60)
    waits = []
    for _ in range(6):
        rule._next_fit_ns = 0
        for _ in range(4):  # 256 decisions: a refit is due
            rule.observe(64, int(2.64e6), rng.normal(1.6e6, 0.05e6, 64))
        waits.append(rule.max_wait_ns)
    assert rule.max_wait_ns > 0 and len(set(waits)) == 1 and rule._fit_every_ns == hi, waits


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(min_batch=0), "min_batch=0"),
        (dict(min_batch=9), "min_batch=9"),
        (dict(min_batch=3, max_batch=2), r"max_batch=2 must be an int in \[min_batch=3"),
        (dict(max_wait_us=-1), "max_wait_us=-1"),
        (dict(max_wait_us=float("nan")), "max_wait_us=nan"),
    ],
)
def test_bad_batching_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        Batching.check(8, kw.get("min_batch"), kw.get("max_batch"), kw.get("max_wait_us"))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(schedule="dynamic", mode="sync"), "mode='sync'"),
        (dict(schedule="dynamic", num_stages=2), "num_stages applies to schedule='stages'"),
        (dict(min_batch=2), "apply to schedule='dynamic'"),
        (dict(schedule="greedy"), "schedule='greedy'"),
    ],
)
def test_schedule_arguments_are_checked_before_any_worker_starts(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutEngine("toy", LatencyPolicy(state_dim=16, chunk_len=4), num_envs=4, **kw)


def _rows(policy, idx, spec, generator_seed=0):
    from tensordict import NonTensorData, NonTensorStack, TensorDict

    g = torch.Generator().manual_seed(generator_seed)
    n = 12
    state = torch.randn(n, spec.obs["state"].shape[0], generator=g)
    image = torch.randint(0, 255, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    obs = TensorDict({"state": state[idx]}, [len(idx)])
    obs.set(("image", "head"), image[idx])
    # texts of 1 to 12 words: rows of every length share batches
    words = "pick up the red cube and place it on the blue plate".split()
    texts = NonTensorStack(*[NonTensorData(" ".join(words[: 1 + i % 12])) for i in idx])
    seeds = torch.arange(n)[idx] + 1000
    td = {"observation": obs, "sample_seed": seeds, "language_instruction": texts}
    return policy(TensorDict(td, [len(idx)]))


def check_batch_invariance(head: str, vision: str = "patches") -> None:
    """A row's outputs must not depend on which rows share its batch: random compositions
    and sizes (1 included), compared with the full batch, at one intra-op thread. Bit for
    bit with the token head; the flow head's action expert (torch's decoder layer: GEMMs of
    batch x chunk rows) is equal only up to float rounding, as documented."""
    torch.set_num_threads(1)
    spec = envs.make("toy", **JITTERY).spec
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(spec, chunk_len=4, head=head, vision=vision).eval()
    for data_seed in range(3):
        full = _rows(policy, list(range(12)), spec, data_seed)
        rng = random.Random(data_seed)
        for size in [1, 2, 3, *[rng.randint(1, 11) for _ in range(6)]]:
            idx = rng.sample(range(12), size)
            part = _rows(policy, idx, spec, data_seed)
            for key in part.keys(include_nested=True, leaves_only=True):
                got, want = part.get(key), full.get(key)
                if not isinstance(got, torch.Tensor):
                    continue
                if head == "tokens":
                    assert torch.equal(got, want[idx]), (key, idx)
                else:
                    torch.testing.assert_close(got, want[idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "head,isa,vision",
    [
        ("tokens", None, "patches"),
        ("flow", None, "patches"),
        ("tokens", "AVX2", "patches"),
        ("tokens", None, "keypoints"),
        ("tokens", None, "film"),
    ],
)
def test_tinyvla_rows_are_batch_invariant(head, isa, vision):
    # In a fresh process, so that torch's thread count and MKL's instruction set are this
    # test's. MKL picks GEMM kernels by instruction set: "AVX2" runs the kernels of CPUs
    # without AVX-512, on which torch's own transformer layers were not batch-invariant.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if isa is not None:
        env["MKL_ENABLE_INSTRUCTIONS"] = isa
    code = (
        "from test_dynamic import check_batch_invariance; "
        f"check_batch_invariance({head!r}, {vision!r})"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


def _run(policy, **kw):
    # One intra-op thread: the setting under which TinyVLA is bitwise batch-invariant.
    args = dict(num_envs=8, num_workers=2, env_kwargs=JITTERY, seed=11, inference_threads=1)
    with dynamic_batches_only(RolloutEngine("toy", policy, **{**args, **kw})) as engine:
        td = engine.rollout(7)
        eps = engine.collect_episodes(3, 4)
        return td, eps, list(engine.stats.batch_sizes)


@pytest.mark.slow
def test_dynamic_batches_give_bitwise_the_synchronous_trajectories():
    spec = envs.make("toy", **JITTERY).spec
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(spec, chunk_len=4)  # token head: log-probs recorded too

    sync_td, sync_eps, sync_sizes = _run(policy, mode="sync", num_stages=1)
    assert set(sync_sizes) == {8}
    seen = set()
    for kw in (
        dict(schedule="dynamic"),
        dict(schedule="dynamic", min_batch=2, max_batch=3, max_wait_us=300),
    ):
        td, eps, sizes = _run(policy, **kw)
        seen |= set(sizes)
        assert max(sizes) <= kw.get("max_batch", 8)
        # rollout(): rows are envs, and env ids match too. collect_episodes: which env ran
        # an episode depends on timing; nothing else should.
        assert_identical(td, sync_td)
        assert_identical(eps.exclude("env_id"), sync_eps.exclude("env_id"))
    assert len(seen) >= 3, f"batch sizes {sorted(seen)}: the compositions did not vary"


def test_a_stuck_worker_is_found_by_the_dynamic_loop_too():
    policy = LatencyPolicy(state_dim=8, chunk_len=4)
    e = RolloutEngine(
        stuck_env, policy, num_envs=4, schedule="dynamic", env_kwargs=dict(state_dim=8),
        hang_timeout_s=2.0, on_worker_failure="raise",
    )  # fmt: skip
    with pytest.raises(WorkerStuckError, match="is stuck: its progress counter stayed at"):
        e.rollout(2)
    assert e.closed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dynamic_batches_land_each_dtype_as_the_policy_computed_it(dtype):
    # float32 chunks land by numpy's scatter, the others by torch's conversion: both must
    # record (and execute) the policy's values, in float32, row by row.
    policy = DtypePolicy(dtype)
    with RolloutEngine(
        "toy", policy, num_envs=8, num_workers=2, schedule="dynamic", env_kwargs=JITTERY
    ) as e:
        td = e.rollout(4)
        sizes = set(e.stats.batch_sizes)
    assert max(sizes) > 1, f"batch sizes {sorted(sizes)}: no dynamic batch was landed"
    chunk = td[schema.ACTION_CHUNK]
    assert chunk.dtype == torch.float32 and td["mask"].all()
    want = policy.chunk(td["observation", "state"].reshape(-1, 8)).float()
    torch.testing.assert_close(chunk.reshape(-1, 4, 7), want, rtol=0, atol=0)


def test_a_nan_in_a_dynamic_batch_stops_it_before_the_physics():
    policy = DtypePolicy(torch.float32, nan_after=3)
    e = RolloutEngine(
        "toy", policy, num_envs=8, num_workers=2, schedule="dynamic", env_kwargs=JITTERY
    )
    with pytest.raises(PolicyOutputError, match="NaN or inf"):
        e.rollout(6)
    assert e.closed

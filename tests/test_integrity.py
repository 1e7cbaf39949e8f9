"""Input integrity: every decision is made from exactly the inputs lock-step gives it.

A :class:`probe.Probe` around TinyVLA records every row the policy is given (state, image,
instruction, lookahead prefix, sample seed), keyed by the row's sample seed, which names one
decision of one episode. Each run below is compared with the lock-step baseline
(``mode="sync"``, one stage) of the same lookahead: every row both made must be byte-equal,
and every recorded step must hold exactly what the policy saw for it. Instructions vary in
length (1 to 12 words), step costs jitter (CV 1), so batch compositions vary from run to run.
"""

import pytest
import torch
from factories import flaky_env
from probe import Probe, row_inputs

import envs
from pipeline import RolloutEngine, schema
from pipeline.policies import TinyVLA
from pipeline.record.views import steps

ENV = dict(
    state_dim=8, cameras=("head",), image_size=16, episode_len=16, step_cost_us=300,
    step_cost_cv=1.0, instruction_words=12,
)  # fmt: skip
LOOKAHEAD = 3

RUNS = {
    "stages": dict(num_stages=2),
    "dynamic": dict(schedule="dynamic", fixed_stages=False),
    "dynamic-window": dict(schedule="dynamic", min_batch=2, max_batch=3, max_wait_us=300),
    "stages-lookahead": dict(num_stages=2, lookahead=LOOKAHEAD),
    "dynamic-lookahead": dict(schedule="dynamic", lookahead=LOOKAHEAD, fixed_stages=False),
    "ray-stages": dict(num_stages=2, ray=True),
    "ray-dynamic-lookahead": dict(
        schedule="dynamic", lookahead=LOOKAHEAD, ray=True, fixed_stages=False
    ),
    "killed-stages": dict(num_stages=2, kill=True),
    "killed-dynamic": dict(schedule="dynamic", kill=True, fixed_stages=False),
    # the adaptive rule's fallback chosen from the first call: a worker replaced under it
    "killed-dynamic-on-fixed-stages": dict(schedule="dynamic", kill=True, fixed_stages=True),
    "ray-killed-stages": dict(num_stages=2, kill=True, ray=True),
    "inline-dynamic-lookahead": dict(
        schedule="dynamic", lookahead=LOOKAHEAD, inline=True, fixed_stages=False
    ),
    "inline-failed-stages": dict(num_stages=2, kill=True, inline=True),  # raises: no process
}


def _run(
    request, tmp_path, lookahead=0, ray=False, inline=False, kill=False, fixed_stages=None, **kw
):
    """Two calls (a rollout, then GRPO-style episodes) of 8 envs on 2 workers; returns what
    the probe saw, the outputs and the engine's failures. ``fixed_stages``: the adaptive
    rule of dynamic batching is made to choose its fixed stages (True) or dynamic batches
    (False) before each call, as a refit may choose either."""
    torch.manual_seed(0)
    spec = envs.make("toy", **ENV).spec
    probe = Probe(TinyVLA.from_spec(spec, chunk_len=8, prefix_conditioning=lookahead > 0))
    env, env_kwargs = "toy", ENV
    if kill:  # worker 1 SIGKILLs itself (inline: its env raises) in its third chunk, once
        marker = tmp_path / "crashes"
        marker.mkdir()
        how = "raise" if inline else "kill"
        env, env_kwargs = flaky_env, dict(ENV, marker_dir=str(marker), how=how)
    if inline:
        kw.update(backend="inline")
    if ray:
        request.getfixturevalue("ray_cluster")
        kw.update(backend="ray", workers_per_node=1)
    args = dict(num_envs=8, num_workers=2, seed=5, exec_len=5, inference_threads=1)
    with RolloutEngine(env, probe, env_kwargs=env_kwargs, lookahead=lookahead, **args, **kw) as e:
        outputs = []
        for call in (lambda: e.rollout(8), lambda: e.collect_episodes(3, 4)):
            if fixed_stages is not None:
                e.batching.fixed_stages = fixed_stages
            outputs.append(call())
        failures = e.failures
        if fixed_stages is not None:
            assert e.stats.fixed_stage_calls == (2 if fixed_stages else 0)
    return _decisions(probe.take(), outputs), outputs, failures


def _decisions(seen: dict, outputs) -> dict:
    """The probe's rows of the decisions the outputs record. A stage batch also carries the
    rows of its parked envs (no episode to run: their chunks are never executed nor
    recorded), which dynamic batching leaves out; those are not decisions."""
    recorded = {s for out in outputs for s in steps(out).get(schema.SAMPLE_SEED).tolist()}
    missing = recorded - seen.keys()
    assert not missing, f"recorded decisions the policy never saw: seeds {sorted(missing)[:5]}"
    return {seed: seen[seed] for seed in recorded}


@pytest.fixture(scope="module")
def lockstep():
    """The lock-step baselines, without and with lookahead, made once."""
    cache = {}

    def get(request, tmp_path, lookahead):
        if lookahead not in cache:
            cache[lookahead] = _run(request, tmp_path, lookahead, mode="sync", num_stages=1)
        return cache[lookahead]

    return get


def _assert_same_inputs(seen, ref, exact: bool) -> None:
    """Every row of ``seen`` equals lock-step's row of its seed, byte for byte."""
    assert all(len(rows) == 1 for rows in ref.values()), "lock-step made a decision twice"
    assert len(ref) >= 100, f"only {len(ref)} decisions: too few to compare"
    extra = seen.keys() - ref.keys()
    assert not extra, f"decisions lock-step never made: seeds {sorted(extra)[:5]}"
    if exact:
        assert seen.keys() == ref.keys(), f"missing: {sorted(ref.keys() - seen.keys())[:5]}"
    for seed, rows in seen.items():
        want = ref[seed][0]
        for row in rows:
            diff = [k for k in want.keys() | row.keys() if row.get(k) != want.get(k)]
            assert not diff, f"sample seed {seed}: {diff} differ from lock-step's"


def _assert_recorded_as_seen(outputs, seen) -> None:
    """Each recorded step holds what the policy was given for it (the last time: a retried
    decision's)."""
    for out in outputs:
        flat = steps(out)
        for i, seed in enumerate(flat.get(schema.SAMPLE_SEED).tolist()):
            policy_row = seen[seed][-1]
            keys = [k for k in policy_row if k != schema.INSTRUCTION]
            assert row_inputs(flat, i, keys) == policy_row, f"sample seed {seed}"


def test_lockstep_reference_is_consistent(request, tmp_path, lockstep):
    for lookahead in (0, LOOKAHEAD):
        seen, outputs, _ = lockstep(request, tmp_path, lookahead)
        _assert_recorded_as_seen(outputs, seen)
        texts = {row[schema.INSTRUCTION][1] for rows in seen.values() for row in rows}
        assert len({len(t.split()) for t in texts}) >= 6, "instruction lengths did not vary"
        prefixed = [r for rows in seen.values() for r in rows if schema.PREFIX_LEN in r]
        assert bool(prefixed) == (lookahead > 0)


@pytest.mark.parametrize("name", list(RUNS))
def test_every_policy_input_equals_lockstep(request, tmp_path, lockstep, name):
    kw = dict(RUNS[name])
    ref_seen, _, _ = lockstep(request, tmp_path / "ref", kw.get("lookahead", 0))
    seen, outputs, failures = _run(request, tmp_path, **kw)
    if kw.get("kill"):
        why = "lost its contact cache" if kw.get("inline") else "SIGKILL"
        assert len(failures) == 1 and why in failures[0].error, failures
        # A killed env's rollout() re-runs its episode, so it gets less far in that call.
        assert any(len(rows) > 1 for rows in seen.values()), "no decision was re-run"
    else:
        assert not failures
    _assert_same_inputs(seen, ref_seen, exact=not kw.get("kill"))
    _assert_recorded_as_seen(outputs, seen)

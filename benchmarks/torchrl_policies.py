"""TorchRL's own VLA (``torchrl.modules.vla.TinyVLA``, token head) in the engine: are its
rollouts the same under every schedule, and what does making them so cost?

    python bench.py torchrl                    # all parts, tabletop/reach with a 32x32 camera
    python bench.py torchrl --env toy --rounds 2

Parts:

- ``determinism``: for each way of running the policy (``per_row`` sampling in batches of a
  fixed size 8, ``per_row`` on the engine's batches as they come, and TorchRL's own sampler
  from torch's global RNG), ``--rounds`` seeds of ``collect_episodes(2, 8)`` on 16 envs under
  lock-step (``mode="sync"``), two stages, and dynamic batching (``min_batch=1``); against
  lock-step: how many rounds were bitwise identical, the share of decisions whose tokens
  match (episodes compared while they last in both), and the largest difference in
  ``sample_log_prob`` among matching decisions. ``torch.manual_seed`` is reset before each
  run, so TorchRL's sampler starts from the same RNG state every time.
- ``cost``: the policy's time per call (median of ``--calls``) on batches of 16, 8, 5 and 1
  real observations, with fixed batches of 8 and without.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

import envs
from benchmarks import parts
from pipeline import RolloutEngine, schema

WAYS = {
    "per_row, fixed_batch=8": dict(sampling="per_row", fixed_batch=8),
    "per_row, as batched": dict(sampling="per_row", fixed_batch=None),
    "torchrl sampler": dict(sampling="torchrl", fixed_batch=None),
}
SCHEDULES = {"stages": dict(num_stages=2), "dynamic": dict(schedule="dynamic", min_batch=1)}


def _env_kwargs(args) -> dict:
    if args.env == "toy":
        return {"task": "reach", "state_dim": 8, "cameras": ("head",), "image_size": 32}
    return {"cameras": ("head",), "image_size": 32}


def _policy(args, **way):
    from torchrl.modules.vla import TinyVLA

    from pipeline.torchrl import TorchRLPolicy

    spec = envs.make(args.env, **_env_kwargs(args)).spec
    torch.manual_seed(0)
    vla = TinyVLA(action_dim=spec.action_dim, chunk_size=8, action_head="tokens", vocab_size=64)
    return TorchRLPolicy(vla, **way).materialize(spec)


def _collect(args, policy, seed: int, **kw):
    torch.manual_seed(1234)
    engine_kw = dict(num_envs=16, num_workers=2, seed=seed, env_kwargs=_env_kwargs(args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with RolloutEngine(args.env, policy, **engine_kw, **kw) as e:
            return e.collect_episodes(2, 8)


def _compare(ref, out) -> tuple[bool, int, int, float]:
    """(bitwise, matching decisions, decisions compared, max |d logp| where tokens match)."""
    keys = (schema.ACTION_TOKENS, schema.SAMPLE_LOG_PROB, "mask", "length")
    bitwise = ref["mask"].shape == out["mask"].shape and all(
        torch.equal(ref.get(k), out.get(k)) for k in keys
    )
    t = min(ref["mask"].shape[1], out["mask"].shape[1])
    both = ref["mask"][:, :t] & out["mask"][:, :t]
    a, b = ref.get(schema.ACTION_TOKENS)[:, :t][both], out.get(schema.ACTION_TOKENS)[:, :t][both]
    same = (a == b).flatten(1).all(1)
    la = ref.get(schema.SAMPLE_LOG_PROB)[:, :t][both][same]
    lb = out.get(schema.SAMPLE_LOG_PROB)[:, :t][both][same]
    dlogp = float((la - lb).abs().max()) if len(la) else 0.0
    return bitwise, int(same.sum()), len(same), dlogp


def determinism(args) -> dict:
    results = {}
    for way_name, way in WAYS.items():
        policy = _policy(args, **way)
        for sched, kw in SCHEDULES.items():
            rows = []
            for r in range(args.rounds):
                ref = _collect(args, policy, seed=100 + r, mode="sync")
                rows.append(_compare(ref, _collect(args, policy, seed=100 + r, **kw)))
            bitwise = sum(x[0] for x in rows)
            match, total = sum(x[1] for x in rows), sum(x[2] for x in rows)
            dlogp = max(x[3] for x in rows)
            results[f"{way_name} / {sched}"] = dict(
                rounds=args.rounds, bitwise=bitwise, tokens_match=match / max(total, 1),
                decisions=total, max_dlogp=dlogp,
            )  # fmt: skip
            print(
                f"{way_name:24s} {sched:8s} bitwise {bitwise}/{args.rounds}  tokens match "
                f"{match}/{total} ({match / max(total, 1):.3f})  max |d logp| {dlogp:.1e}",
                flush=True,
            )
    return results


def cost(args) -> dict:
    policy = _policy(args, sampling="per_row", fixed_batch=None)
    engine_kw = dict(num_envs=16, num_workers=2, seed=0, env_kwargs=_env_kwargs(args))
    with RolloutEngine(args.env, policy, mode="sync", **engine_kw) as e:
        batch = e.rollout(1)[:, 0]  # 16 real observations
    results = {}
    for fixed in (8, None):
        policy.fixed_batch = fixed
        for rows in (16, 8, 5, 1):
            calls = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                policy(batch[:rows])
                calls.append(time.perf_counter() - t0)
            ms = 1e3 * float(np.median(calls))
            results[f"fixed_batch={fixed} / {rows} rows"] = ms
            print(f"fixed_batch={fixed!s:5s} a batch of {rows:2d} rows: {ms:.2f} ms", flush=True)
    return results


PARTS = {"determinism": determinism, "cost": cost}


def main(argv: list[str]) -> int:
    ap = parts.parser("bench.py torchrl", __doc__, PARTS)
    ap.add_argument("--env", default="tabletop/reach")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", default="bench_results/torchrl_policies.json")
    return parts.run(ap.parse_args(argv), PARTS)

"""Lookahead (latency-aware chunk execution): throughput, worker idle time, expert success and
the smoothness of chunk joins, against the delay ``d``, in one run.

    python bench.py lookahead                  # all parts
    python bench.py lookahead --part throughput --windows 5

Parts:

- ``throughput``: ``toy`` envs at ``--step-cost-us`` per control step, chunks of 12 executed
  8 at a time, one env per worker and stage (``--workers 1`` by default: on 2 cores, two
  workers that never idle leave the inference loop no core of its own, and its wake-ups then
  wait for a time slice), ``LatencyPolicy`` with a latency of 0.5, 1 and 2 times the
  duration of ``d`` control steps. Per cell, for ``d`` = 1, 2, 4 at 1 and 2 stages:
  decisions/s (median of ``--windows`` rollout() calls) against ``d=0`` at the same latency,
  and the workers' ``wait_actions`` share of wall time (one profiled call) for both.
- ``fleet``: every worker holding several envs: ``--fleet-envs`` envs on
  ``--fleet-workers`` workers, 1 stage, a latency L equal to what the workers' ``d = 4``
  frozen steps cover (``d`` x envs per worker x the step time). Decisions/s at ``d=0`` and
  ``d=4``, the two engines taking turns window by window, and their ratio against the ideal
  ``(L + W) / max(W, W - T + L)`` (``W``: a worker's time per decision, ``T``: its frozen
  steps' share of it).
- ``expert``: the scripted expert of ``tabletop/pick-place`` (state only), chunks of 12
  executed 8 at a time, with prefix conditioning (it plans from where the frozen actions
  leave the arm) and without ("naive async": its chunk runs from step ``d`` on), on the same
  ``--episodes`` reset seeds for every ``d``: success rate, and the call's env steps/s.
- ``join``: TinyVLA (token head, state only) cloned from ``--join-env`` expert
  demonstrations twice, with prefix conditioning trained on random delays and without;
  rolled out at ``d=2``: the jump at the join (the first new action against the last frozen
  one, L2 over the 7 action dims) against the steps within a chunk, and success.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import envs
from benchmarks import parts
from benchmarks.engine import calibrate_env_ms, measure
from pipeline import RolloutEngine, schema
from pipeline.policies import ExpertPolicy, LatencyPolicy, TinyVLA
from pipeline.record.views import steps

CHUNK, EXEC = 12, 8
DELAYS = (0, 1, 2, 4)
LATENCY_RATIOS = (0.5, 1.0, 2.0)  # inference latency over the duration of d control steps


def _wait_share(engine: RolloutEngine, decisions: int, calls: int) -> float:
    """The workers' mean ``wait_actions`` share of wall time over ``calls`` profiled
    rollout() calls."""
    with engine.profile() as prof:
        for _ in range(calls):
            engine.rollout(decisions)
    report = prof.report()
    workers = range(engine.num_workers)
    return float(np.mean([report.phase(f"worker {w}", "wait_actions")["share"] for w in workers]))


def _run_toy(args, stages: int, latency_ms: float, d: int | str) -> dict:
    toy = dict(state_dim=16, episode_len=10_000, step_cost_us=args.step_cost_us)
    policy = LatencyPolicy(state_dim=16, chunk_len=CHUNK, base_ms=latency_ms)
    with RolloutEngine(
        "toy",
        policy,
        num_envs=args.workers * stages,
        num_workers=args.workers,
        num_stages=stages,
        exec_len=EXEC,
        lookahead=d,
        env_kwargs=toy,
    ) as engine:
        m = measure(engine, args.decisions, args.windows)
        wait = _wait_share(engine, args.decisions, args.windows)
        n = engine.rollout(args.decisions).get(schema.PREFIX_LEN, None)
        chosen = 0 if n is None else int(n[:, 1:].median())
    return {"decisions_per_s": m["decisions_per_s"], "wait": wait, "d": chosen}


def throughput(args) -> dict:
    toy = dict(state_dim=16, episode_len=10_000, step_cost_us=args.step_cost_us)
    step_ms = calibrate_env_ms(toy, EXEC) / EXEC
    print(
        f"throughput: toy at {step_ms:.2f} ms per control step (measured), chunks of {CHUNK} "
        f"executed {EXEC} at a time, {args.workers} worker(s), one env per worker and stage; "
        f"LatencyPolicy latency L = ratio x the duration of d steps. Per cell: decisions/s "
        f"with lookahead d against d=0 at the same L, and the workers' wait_actions share of "
        f"wall time (d=0 -> d)"
    )
    out = {}
    for stages in (1, 2):
        for ratio in LATENCY_RATIOS:
            cells = []
            for d in DELAYS[1:]:
                latency_ms = ratio * d * step_ms
                base = _run_toy(args, stages, latency_ms, 0)
                ahead = _run_toy(args, stages, latency_ms, d)
                cells.append({"d": d, "latency_ms": latency_ms, "d0": base, "lookahead": ahead})
            key = f"{stages} stage{'s' if stages > 1 else ''}, L = {ratio:g} x d steps"
            out[key] = cells
            row = "  ".join(
                f"d={c['d']}: {c['lookahead']['decisions_per_s']:6.1f} "
                f"({c['lookahead']['decisions_per_s'] / c['d0']['decisions_per_s']:.2f}x, "
                f"wait {c['d0']['wait']:3.0%}->{c['lookahead']['wait']:3.0%})"
                for c in cells
            )
            print(f"  {key:<27} {row}", flush=True)
    print("  lookahead='auto' (d from the longest recent report-to-command delay), 1 stage:")
    for latency_ms in (2 * step_ms, 4 * step_ms):
        base = _run_toy(args, 1, latency_ms, 0)
        auto = _run_toy(args, 1, latency_ms, "auto")
        out[f"auto, L = {latency_ms:.1f} ms"] = {"d0": base, "auto": auto}
        print(
            f"    L = {latency_ms:.1f} ms: chose d = {auto['d']}, "
            f"{auto['decisions_per_s']:6.1f} decisions/s "
            f"({auto['decisions_per_s'] / base['decisions_per_s']:.2f}x d=0), "
            f"wait {base['wait']:3.0%}->{auto['wait']:3.0%}",
            flush=True,
        )
    return out


def fleet(args) -> dict:
    d, per_worker = 4, args.fleet_envs // args.fleet_workers
    toy = dict(state_dim=16, episode_len=10_000, step_cost_us=args.step_cost_us)
    step_ms = calibrate_env_ms(toy, EXEC) / EXEC
    latency_ms = d * per_worker * step_ms
    work, tails = per_worker * EXEC * step_ms, per_worker * d * step_ms
    ideal = (latency_ms + work) / max(work, work - tails + latency_ms)
    print(
        f"fleet: {args.fleet_envs} toy envs on {args.fleet_workers} workers, 1 stage, "
        f"{step_ms:.2f} ms per control step (measured), chunks of {CHUNK} executed {EXEC} at a "
        f"time, L = {latency_ms:.1f} ms (what d={d} covers); ideal d={d} / d=0: {ideal:.2f}x; "
        f"medians of {args.windows} windows of {args.decisions} decisions, the engines in turn"
    )
    engines, rates = {}, {}
    try:
        for delay in (0, d):
            policy = LatencyPolicy(state_dim=16, chunk_len=CHUNK, base_ms=latency_ms)
            e = engines[delay] = RolloutEngine(
                "toy", policy, num_envs=args.fleet_envs, num_workers=args.fleet_workers,
                num_stages=1, exec_len=EXEC, lookahead=delay, env_kwargs=toy,
            )  # fmt: skip
            e.rollout(max(2, args.decisions // 2))
            rates[delay] = []
        for _ in range(args.windows):  # interleaved: a noisy minute hits both engines alike
            for delay, e in engines.items():
                t0 = time.perf_counter()
                e.rollout(args.decisions)
                rates[delay].append(args.decisions / (time.perf_counter() - t0))
    finally:
        for e in engines.values():
            e.close()
    d0, dd = float(np.median(rates[0])), float(np.median(rates[d]))
    print(
        f"  d=0 {d0:6.1f}  d={d} {dd:6.1f} decisions/s: {dd / d0:.2f}x "
        f"({dd / d0 / ideal:.0%} of the ideal {ideal:.2f}x)",
        flush=True,
    )
    return {
        "step_ms": step_ms,
        "latency_ms": latency_ms,
        "ideal": ideal,
        "d0": d0,
        f"d{d}": dd,
        "ratio": dd / d0,
        "windows": {str(k): v for k, v in rates.items()},
    }


def expert(args) -> dict:
    env_kwargs = dict(cameras=())
    seeds = list(range(args.episodes))
    print(
        f"expert: tabletop/pick-place (state only), {args.episodes} episodes on seeds "
        f"0..{args.episodes - 1}, chunks of {CHUNK} executed {EXEC} at a time, 8 envs, 2 "
        f"workers, 1 stage: success rate (median control steps of the successful episodes, "
        f"env steps/s of the call)"
    )
    out = {}
    for conditioned in (True, False):
        cells = {}
        for d in DELAYS:
            policy = ExpertPolicy("tabletop/pick-place", CHUNK, condition_on_prefix=conditioned)
            with RolloutEngine(
                "tabletop/pick-place",
                policy,
                num_envs=8,
                num_workers=2,
                num_stages=1,
                exec_len=EXEC,
                lookahead=d,
                env_kwargs=env_kwargs,
            ) as engine:
                t0 = time.perf_counter()
                eps = engine.collect_episodes(len(seeds), 1, reset_seeds=seeds)
                wall = time.perf_counter() - t0
            ok = eps["success"]
            cells[d] = {
                "success": float(ok.float().mean()),
                "steps_to_success": float(eps["env_steps"][ok].float().median()),
                "env_steps_per_s": float(eps["env_steps"].sum()) / wall,
            }
        label = "prefix-conditioned" if conditioned else "naive async"
        out[label] = cells
        row = "  ".join(
            f"d={d}: {c['success']:5.1%} ({c['steps_to_success']:.0f} steps, "
            f"{c['env_steps_per_s']:.0f} env steps/s)"
            for d, c in cells.items()
        )
        print(f"  {label:<20} {row}", flush=True)
    return out


def _joins(td, d: int) -> tuple[float, float]:
    """Mean L2 jump from the last frozen action to the first new one, and mean L2 step
    between consecutive new actions within a chunk, over the arm's 6 motion dimensions (the
    gripper's open/close command is binary: its flips are not roughness)."""
    batch = steps(td)
    chunk, n = batch[schema.ACTION_CHUNK][..., :6].double(), batch[schema.PREFIX_LEN]
    sel = n == d
    c = chunk[sel]
    join = (c[:, d] - c[:, d - 1]).norm(dim=-1)
    within = (c[:, d + 1 : EXEC] - c[:, d : EXEC - 1]).norm(dim=-1)
    return float(join.mean()), float(within.mean())


def join(args) -> dict:
    from trainer import behaviour_clone, collect_demos

    env, env_kwargs, d = args.join_env, dict(cameras=()), 2
    spec = envs.make(env, **env_kwargs).spec
    demos, rate = collect_demos(env, env_kwargs, args.demos, CHUNK, seed=777)
    print(
        f"join: TinyVLA cloned from {args.demos} {env} expert episodes "
        f"({len(demos)} decisions, expert success {rate:.0%}), {args.bc_steps} BC steps each; "
        f"rolled out at d={d} on {args.episodes} seeds"
    )
    out = {}
    for conditioned in (True, False):
        torch.manual_seed(0)
        policy = TinyVLA.from_spec(
            spec, chunk_len=CHUNK, prefix_conditioning=conditioned, deterministic=True
        )
        behaviour_clone(policy, demos, args.bc_steps, max_delay=max(DELAYS) if conditioned else 0)
        with RolloutEngine(
            env, policy, num_envs=8, num_workers=2, exec_len=EXEC, lookahead=d,
            env_kwargs=env_kwargs,
        ) as engine:  # fmt: skip
            eps = engine.collect_episodes(args.episodes, 1, reset_seeds=range(args.episodes))
        jump, within = _joins(eps, d)
        label = "prefix-conditioned" if conditioned else "naive async"
        out[label] = {
            "join_jump": jump,
            "within_chunk_step": within,
            "success": float(eps["success"].float().mean()),
        }
        print(
            f"  {label:<20} jump at the join {jump:.3f}, step within a chunk {within:.3f} "
            f"(join / within {jump / within:.1f}x), success {out[label]['success']:.0%}",
            flush=True,
        )
    return out


PARTS = {"throughput": throughput, "fleet": fleet, "expert": expert, "join": join}


def main(argv: list[str] | None = None) -> int:
    ap = parts.parser("bench.py lookahead", __doc__, PARTS)
    ap.add_argument("--step-cost-us", type=float, default=1000.0)
    ap.add_argument(
        "--workers", type=int, default=1, help="throughput part (1 leaves the loop a core)"
    )
    ap.add_argument("--decisions", type=int, default=30, help="per window and env")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--fleet-envs", type=int, default=8)
    ap.add_argument("--fleet-workers", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--demos", type=int, default=256)
    ap.add_argument("--join-env", default="tabletop/pick-place")
    ap.add_argument("--bc-steps", type=int, default=1500)
    ap.add_argument("--json", default="bench_results/lookahead.json")
    return parts.run(ap.parse_args(argv), PARTS)

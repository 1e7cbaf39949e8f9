"""Transport: what moving observations costs, the engine against Gymnasium, in one run.

    python bench.py --compare gymnasium --transport
    python bench.py --transport              # the engine rows and floors only

A zero-cost env (``toy`` with ``static_images``: the same frames every step, no step cost),
``chunk_len=1``, a zero-latency policy (``LatencyPolicy``), 8 envs: every figure is the cost
of moving observations and actions and of recording them, nothing else. Rows:

- the engine with 2 workers, lock-step (sync, 1 stage) and 2-stage pipelined; it records
  every observation into the returned trajectory (Gymnasium returns only the latest); with
  images, also pipelined with ``record_obs=["state"]`` (frames moved once, into shared
  memory, and read there; only the state recorded);
- Gymnasium ``AsyncVectorEnv(shared_memory=True)`` with one process per env, as it always
  runs, for 8 envs and for 2 envs (2 processes, like the engine's 2 workers); its loop calls
  the same policy on the same canonical TensorDict, and its env returns no per-step info
  (Gymnasium merges infos in Python), so it pays for nothing the engine does not;
- the same ``AsyncVectorEnv`` for 8 envs *raw*: no policy, no TensorDict, the same zero
  actions every step, no recording (the rawest peer: stepping alone);
- floors measured in the same run: ``numpy.copyto`` of one step's bytes, cache-hot and into
  fresh memory; the IPC round trip of 2 spawned processes echoing a 16-byte frame, before
  and after each setup's engine rows (the ratio takes their mean), and once more with the
  echoes idle between rounds for as long as the lock-step policy call keeps the workers idle
  (their cores halt, as in the engine); the same round trip by socket pair (the engine's
  wake-up), pipe and eventfd, with forked echoes, to show whether another wake-up would be
  cheaper.

Per row: env steps/s (median of windows) and, for the engine, the overhead per decision
(round trip less policy and env time, median) against the IPC floor. Then where a lock-step
decision's time goes: the same engine under its own profiler (which adds a little to every
phase), each phase's wall and CPU time per decision, in the loop and in each worker.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

import envs
from benchmarks import ipc_floor
from benchmarks.engine import _copyto_us, measure
from pipeline import RolloutEngine
from pipeline.policies import LatencyPolicy

NUM_ENVS, WORKERS = 8, 2
SETUPS = {
    "state only (32 floats)": dict(state_dim=32, cameras=()),
    "3 cameras of 224x224x3": dict(state_dim=32, cameras=("a", "b", "c"), image_size=224),
}


def _engine(toy: dict, **schedule) -> RolloutEngine:
    """The engine every row runs: 8 toy envs on 2 workers, a zero-latency policy."""
    policy = LatencyPolicy(state_dim=toy["state_dim"], chunk_len=1)
    return RolloutEngine(
        "toy", policy, num_envs=NUM_ENVS, num_workers=WORKERS, env_kwargs=toy, **schedule
    )


def _engine_row(toy: dict, decisions: int, windows: int, **schedule) -> dict:
    with _engine(toy, **schedule) as engine:
        m = measure(engine, decisions, windows)
    turns = np.concatenate([w["turn_us"] for w in m["windows"]])
    policy_us = np.concatenate([w["turn_policy_us"] for w in m["windows"]])
    env_us = np.concatenate([w["turn_env_us"] for w in m["windows"]])
    return {
        "env_steps_per_s": m["env_steps_per_s"],
        "spread": [w["env_steps_per_s"] for w in m["windows"]],
        "overhead_us": float(np.median(turns - policy_us - env_us)),
        "policy_us": float(np.median(policy_us)),
        "record_us_per_step": sum(w["record_s"] for w in m["windows"])
        / sum(w["env_steps_per_s"] * w["wall_s"] for w in m["windows"])
        * 1e6,
    }


def _turn_profile(toy: dict, decisions: int) -> dict:
    """Per phase, wall and CPU us per decision of the lock-step engine (sync, 1 stage) under
    its profiler: ``{process: {phase: (wall_us, cpu_us)}}``."""
    with _engine(toy, mode="sync", num_stages=1) as engine:
        engine.rollout(decisions)  # the trajectory buffers of this length, allocated once
        with engine.profile() as prof:
            engine.rollout(decisions)
        report = prof.report().to_dict()
    return {
        p["name"]: {
            phase: (v["wall_s"] * 1e6 / decisions, v["cpu_s"] * 1e6 / decisions)
            for phase, v in p["phases"].items()
        }
        for p in report["processes"]
    }


def _print_turn_profile(profile: dict) -> None:
    print("  where a lock-step decision goes (profiled; wall / CPU us per decision):")
    for process, phases in profile.items():
        parts = ", ".join(f"{ph} {w:.0f}/{c:.0f}" for ph, (w, c) in phases.items())
        print(f"    {process}: {parts}")


def _gym_row(toy: dict, n: int, decisions: int, windows: int, raw: bool = False) -> dict:
    from benchmarks.gym_compare import run_gymnasium

    args = SimpleNamespace(
        env="toy", env_kwargs=json.dumps(toy), num_envs=n, chunk=1, exec=None,
        decisions=decisions, windows=windows,
    )  # fmt: skip
    policy = LatencyPolicy(state_dim=toy["state_dim"], chunk_len=1)
    r = run_gymnasium(args, None, policy, torch.device("cpu"), quiet=True, lean=True, raw=raw)
    return {"env_steps_per_s": r["env_steps_per_s"], "spread": r["env_steps_per_s_spread"]}


def run(compare_gymnasium: bool, decisions: int = 300, windows: int = 5) -> dict:
    torch.set_num_threads(1)
    print(
        f"transport: zero-cost toy env (static frames, no step cost), chunk_len=1, zero-latency "
        f"policy, {NUM_ENVS} envs; medians of {windows} windows x {decisions} decisions"
    )
    floor, floor_p99 = ipc_floor.round_trip_us(WORKERS)
    print(
        f"IPC floor: {WORKERS} spawned processes echoing one 16-byte frame: round trip median "
        f"{floor:.0f} us (p99 {floor_p99:.0f})\n"
    )
    wake = {kind: ipc_floor.wake_up_us(kind, WORKERS) for kind in ipc_floor.WAKE_UPS}
    print(
        "the same round trip by wake-up (forked echoes), median / p99: "
        + ", ".join(f"{k} {m:.0f} / {p:.0f} us" for k, (m, p) in wake.items())
        + "\n"
    )
    results: dict = {
        "ipc_floor_us": floor,
        "ipc_floor_p99_us": floor_p99,
        "wake_up_us": {k: {"median": m, "p99": p} for k, (m, p) in wake.items()},
        "rows": {},
    }
    for title, kw in SETUPS.items():
        toy = dict(kw, episode_len=1000, static_images=True)
        nbytes = sum(int(np.prod(fs.shape)) * fs.dtype.itemsize
                     for fs in envs.make("toy", **toy).spec.obs.values())  # fmt: skip
        # This machine's floor moves by 2x within an hour: the one taken at the start and one
        # right after this setup's engine rows bracket them, and the ratio takes their mean.
        floors = [floor if not results["rows"] else ipc_floor.round_trip_us(WORKERS)[0]]
        rows = {
            "engine, 2 workers, sync 1 stage": _engine_row(
                toy, decisions, windows, mode="sync", num_stages=1
            ),
            "engine, 2 workers, 2-stage pipelined": _engine_row(
                toy, decisions, windows, num_stages=2
            ),
        }
        if kw["cameras"]:  # frames reach the policy in place; only the state is recorded
            rows["engine, 2-stage, record_obs=['state']"] = _engine_row(
                toy, decisions, windows, num_stages=2, record_obs=["state"]
            )
        if compare_gymnasium:
            for n in (NUM_ENVS, 2):
                rows[f"gymnasium AsyncVectorEnv, n={n}"] = _gym_row(toy, n, decisions, windows)
            rows[f"gymnasium AsyncVectorEnv, n={NUM_ENVS}, raw"] = _gym_row(
                toy, NUM_ENVS, decisions, windows, raw=True
            )
        # one decision's frames (every env's), as one copy
        hot_us, cold_us = _copyto_us(nbytes * NUM_ENVS) if nbytes > 1 << 16 else (0.0, 0.0)
        print(f"{title}: {nbytes / 1e3:.1f} kB per env step")
        print(f"  {'':<40}{'env steps/s':>12}{'GB/s':>7}{'overhead/decision':>19}")
        for name, r in rows.items():
            gbs = r["env_steps_per_s"] * nbytes / 1e9
            over = f"{r['overhead_us']:.0f} us" if "overhead_us" in r else ""
            print(f"  {name:<40}{r['env_steps_per_s']:>12,.0f}{gbs:>7.2f}{over:>19}")
        if cold_us:
            copy_gbs = nbytes * NUM_ENVS / cold_us / 1e3
            print(
                f"  numpy.copyto of one decision's {nbytes * NUM_ENVS / 1e6:.1f} MB: "
                f"{nbytes * NUM_ENVS / hot_us / 1e3:.1f} GB/s cache-hot, {copy_gbs:.1f} GB/s "
                "into fresh memory"
            )
        best = max(
            (r for n, r in rows.items() if n.startswith("engine") and "record_obs" not in n),
            key=lambda r: r["env_steps_per_s"],
        )
        floors.append(ipc_floor.round_trip_us(WORKERS)[0])
        # The same wake-ups with the workers idle between rounds for as long as the lock-step
        # policy call keeps them idle: their cores have halted by then, as in the engine.
        sync = rows["engine, 2 workers, sync 1 stage"]
        idle_floor = ipc_floor.round_trip_us(WORKERS, busy_us=sync["policy_us"])[0]
        gym = rows.get(f"gymnasium AsyncVectorEnv, n={NUM_ENVS}")
        if gym:
            print(
                f"  -> engine (best, recording everything) / Gymnasium n={NUM_ENVS}: "
                f"{best['env_steps_per_s'] / gym['env_steps_per_s']:.2f}x"
            )
        if cold_us:
            for name, r in rows.items():
                if name.startswith("engine"):
                    share = r["env_steps_per_s"] * nbytes / 1e9 / copy_gbs
                    print(f"  -> {name}: {share:.0%} of fresh-memory copyto bandwidth")
        over = best["overhead_us"]
        print(
            f"  -> engine overhead per decision / IPC floor: {over / np.mean(floors):.1f}x "
            f"(floor before / after these rows: {floors[0]:.0f} / {floors[1]:.0f} us); "
            f"{over / idle_floor:.1f}x the floor with the workers idle "
            f"{sync['policy_us']:.0f} us between rounds ({idle_floor:.0f} us)",
            flush=True,
        )
        profile = _turn_profile(toy, decisions)
        _print_turn_profile(profile)
        print(flush=True)
        results["rows"][title] = {
            "bytes_per_step": nbytes,
            "ipc_floor_us": floors,
            "ipc_floor_idle_us": {"median": idle_floor, "busy_us": sync["policy_us"]},
            "copyto_hot_us": hot_us,
            "copyto_fresh_us": cold_us,
            "turn_profile_us": profile,
            **rows,
        }
    return results

"""Engine figures: overlap against the ideal bound, stage sweep, transport, real workload.

Overlap runs the ``toy`` env (real CPU step cost) with ``LatencyPolicy`` (latency without
CPU), so the GPU-side and CPU-side costs are known and the ideal bound can be computed. The
bound for a round (every env decides once) is the largest of: the total inference time, the
total worker step time divided by the number of workers, and one stage's inference plus its
stepping (the dependency chain). Worker step times are measured by the workers themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch

import envs
from benchmarks import ipc_floor
from pipeline import RolloutEngine
from pipeline.policies import LatencyPolicy, TinyVLA


@dataclass
class Setup:
    name: str
    mode: str
    stages: int
    per_item_ms: float
    base_ms: float = 0.0
    num_envs: int = 16


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def machine_cpu_s() -> float:
    """CPU seconds this machine's cores have been busy (every process: the loop, the
    workers, a backend's own processes such as Ray's raylets and actors)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def measure(engine: RolloutEngine, decisions: int, windows: int) -> dict:
    """Median figures over ``windows`` rollout() calls after one warm-up call;
    ``cpu_s``: the machine's busy CPU seconds in the window."""
    engine.rollout(max(2, decisions // 2))
    per = []
    for _ in range(windows):
        engine.stats.reset()
        cpu0 = machine_cpu_s()
        t0 = time.perf_counter()
        engine.rollout(decisions)
        wall = time.perf_counter() - t0
        cpu = machine_cpu_s() - cpu0
        st = engine.stats
        per.append(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "decisions_per_s": st.decisions / wall,
                "env_steps_per_s": st.env_steps / wall,
                "worker_busy_s": (st.worker_env_ns + st.worker_write_ns).tolist(),
                "policy_s": st.policy_ns / 1e9,
                "turn_us": [t / 1e3 for t in st.turn_ns],
                "turn_policy_us": [t / 1e3 for t in st.turn_policy_ns],
                "turn_env_us": [t / 1e3 for t in st.turn_env_ns],
                "record_s": st.record_ns / 1e9,
                "write_s": float(st.worker_write_ns.sum()) / 1e9,
                "fixed_stages": st.fixed_stage_calls > 0,  # dynamic's rule chose them
            }
        )
    out = {
        k: _median([w[k] for w in per])
        for k in ("wall_s", "cpu_s", "decisions_per_s", "env_steps_per_s")
    }
    out["spread_decisions_per_s"] = [
        min(w["decisions_per_s"] for w in per),
        max(w["decisions_per_s"] for w in per),
    ]
    out["windows"] = per
    return out


def bound(policy: LatencyPolicy, engine: RolloutEngine, m: dict, decisions: int) -> dict:
    """The ideal time per round for this configuration, from the measured windows."""
    w = engine.num_workers
    stage_batch = engine.num_envs // engine.num_stages
    infer_stage = policy.latency_s(stage_batch)
    infer_total = infer_stage * engine.num_stages
    busy = np.array([win["worker_busy_s"] for win in m["windows"]]).sum(1) / 1e9  # [windows]
    cpu_round = float(np.median(busy)) / decisions  # summed over workers, per round
    chain = infer_stage + cpu_round / w / engine.num_stages
    if engine.mode == "sync":
        ideal = engine.num_stages * infer_stage + cpu_round / w
    else:
        ideal = max(infer_total, cpu_round / w, chain)
    actual = m["wall_s"] / decisions
    return {
        "infer_total_ms": infer_total * 1e3,
        "cpu_per_worker_ms": cpu_round / w * 1e3,
        "chain_ms": chain * 1e3,
        "ideal_round_ms": ideal * 1e3,
        "round_ms": actual * 1e3,
        "efficiency": ideal / actual,
    }


def calibrate_env_ms(env_kwargs: dict, exec_len: int, reps: int = 200) -> float:
    """Median wall time of one env decision (``exec_len`` control steps) in this process."""
    env = envs.make("toy", **env_kwargs)
    env.reset(seed=0)
    acts = np.zeros((exec_len, 7), np.float32)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        res = env.step_chunk(acts)
        times.append(time.perf_counter() - t0)
        if res.terminated or res.truncated:
            env.reset(seed=i)
    return _median(times) * 1e3


def run_toy(
    setup: Setup, toy: dict, chunk: int, decisions: int, windows: int, workers: int
) -> dict:
    spec = envs.make("toy", **toy).spec
    policy = LatencyPolicy(
        state_dim=spec.state_dim,
        chunk_len=chunk,
        base_ms=setup.base_ms,
        per_item_ms=setup.per_item_ms,
    )
    with RolloutEngine(
        "toy",
        policy,
        num_envs=setup.num_envs,
        num_workers=workers,
        num_stages=setup.stages,
        mode=setup.mode,
        env_kwargs=toy,
    ) as engine:
        m = measure(engine, decisions, windows)
        m["bound"] = bound(policy, engine, m, decisions)
    m["setup"] = setup.__dict__
    return m


def _row(label: str, m: dict, base: float | None) -> str:
    b = m["bound"]
    speed = m["decisions_per_s"] / base if base else 1.0
    lo, hi = m["spread_decisions_per_s"]
    return (
        f"{label:<34}{m['decisions_per_s']:>8.1f} [{lo:6.1f}-{hi:6.1f}]{m['env_steps_per_s']:>9.0f}"
        f"{speed:>7.2f}x{b['round_ms']:>8.1f}{b['ideal_round_ms']:>8.1f}{b['efficiency']:>7.0%}"
    )


HEADER = (
    f"{'configuration':<34}{'dec/s':>8} {'[spread]':>15}{'steps/s':>9}{'speed':>8}"
    f"{'round':>8}{'ideal':>8}{'eff':>7}"
)


def overlap(args, results: dict) -> None:
    toy = dict(state_dim=32, episode_len=400, step_cost_us=args.step_cost_us)
    env_ms = calibrate_env_ms(toy, args.chunk)
    w, n = args.workers, 16
    stage_step_ms = env_ms * (n // 2) / w  # one of two stages, spread over the workers
    per_item = stage_step_ms / (n // 2)  # balanced: L(stage batch) == stage step time
    results["calibration"] = {"env_decision_ms": env_ms, "stage_step_ms": stage_step_ms}
    print(
        f"\ncalibration: one env decision ({args.chunk} steps x {args.step_cost_us} us CPU) = "
        f"{env_ms:.2f} ms; one stage of {n // 2} envs on {w} workers = {stage_step_ms:.1f} ms\n"
    )
    cases = {
        "per-item latency (GPU at large batch)": dict(per_item_ms=per_item),
        "fixed latency": dict(per_item_ms=0.0, base_ms=stage_step_ms),
    }
    results["overlap"] = {}
    for title, lat in cases.items():
        print(f"{title}: L(B) = {lat.get('base_ms', 0):.2f} + {lat['per_item_ms']:.3f} ms x B")
        print(HEADER)
        rows = {}
        for label, setup in (
            ("sync, 1 stage (lock-step baseline)", Setup("sync1", "sync", 1, **lat)),
            ("sync, 2 stages", Setup("sync2", "sync", 2, **lat)),
            ("pipelined, 2 stages", Setup("pipe2", "pipelined", 2, **lat)),
        ):
            rows[setup.name] = m = run_toy(setup, toy, args.chunk, args.decisions, args.windows, w)
            print(_row(label, m, rows["sync1"]["decisions_per_s"]), flush=True)
        ideal = rows["sync1"]["bound"]["round_ms"] / rows["pipe2"]["bound"]["ideal_round_ms"]
        got = rows["pipe2"]["decisions_per_s"] / rows["sync1"]["decisions_per_s"]
        print(f"-> pipelined/sync speed-up {got:.2f}x (ideal from the bound: {ideal:.2f}x)\n")
        results["overlap"][title] = {"rows": rows, "speedup": got, "ideal_speedup": ideal}

    print("latency/step ratio sweep (per-item latency; stage inference / stage step time)")
    print(HEADER)
    results["ratio_sweep"] = {}
    for ratio in (0.25, 0.5, 1.0, 2.0, 4.0):
        lat = dict(per_item_ms=per_item * ratio)
        sync = run_toy(
            Setup("s", "sync", 1, **lat), toy, args.chunk, args.decisions, args.windows, w
        )
        pipe = run_toy(
            Setup("p", "pipelined", 2, **lat), toy, args.chunk, args.decisions, args.windows, w
        )
        print(_row(f"ratio {ratio:<5} sync 1 stage", sync, sync["decisions_per_s"]))
        print(
            _row(f"ratio {ratio:<5} pipelined 2 stages", pipe, sync["decisions_per_s"]), flush=True
        )
        results["ratio_sweep"][ratio] = {"sync": sync, "pipelined": pipe}

    print("\nthroughput against num_stages (pipelined, 24 envs, same per-item latency)")
    print(HEADER)
    results["stages"] = {}
    base = None
    for g in (1, 2, 3, 4):
        m = run_toy(
            Setup(f"g{g}", "pipelined", g, per_item, num_envs=24),
            toy,
            args.chunk,
            args.decisions,
            args.windows,
            w,
        )
        base = base or m["decisions_per_s"]
        print(_row(f"pipelined, {g} stage(s)", m, base), flush=True)
        results["stages"][g] = m


def transport(args, results: dict) -> None:
    """Zero-cost env, zero-latency policy, chunk_len=1: what the engine itself costs."""
    print("\ntransport: zero-cost toy env, zero-latency policy, chunk_len=1, sync, 1 stage, 8 envs")
    results["transport"] = {}
    floor, floor_p99 = ipc_floor.round_trip_us(args.workers)
    results["transport"]["ipc_floor_us"] = {"median": floor, "p99": floor_p99}
    print(
        f"{'IPC floor':<14} {args.workers} spawned processes echoing one 16-byte frame (no work): "
        f"round trip median {floor:.0f} us (p99 {floor_p99:.0f}): two process wake-ups"
    )
    setups = (
        ("state-only", (), 32, False),
        ("state-only, pinned", (), 32, True),
        ("3x224 images", ("a", "b", "c"), 224, False),
    )
    for label, cams, size, pin in setups:
        toy = dict(state_dim=32, cameras=cams, image_size=size, episode_len=1000)
        policy = LatencyPolicy(state_dim=32, chunk_len=1)
        with RolloutEngine(
            "toy",
            policy,
            num_envs=8,
            num_workers=args.workers,
            num_stages=1,
            mode="sync",
            env_kwargs=toy,
            pin_workers=pin,
        ) as engine:
            m = measure(engine, args.transport_decisions, args.windows)
        turns = np.concatenate([w["turn_us"] for w in m["windows"]])
        pol = np.concatenate([w["turn_policy_us"] for w in m["windows"]])
        envt = np.concatenate([w["turn_env_us"] for w in m["windows"]])
        overhead = turns - pol - envt
        nbytes = 8 * sum(3 * size * size for _ in cams)
        row = {
            "env_steps_per_s": m["env_steps_per_s"],
            "round_trip_us": {
                "median": float(np.median(turns)),
                "p99": float(np.percentile(turns, 99)),
            },
            "overhead_us": {
                "median": float(np.median(overhead)),
                "p99": float(np.percentile(overhead, 99)),
            },
            "policy_us_median": float(np.median(pol)),
            "env_us_median": float(np.median(envt)),
        }
        print(
            f"{label:<14} {m['env_steps_per_s']:>8.0f} env steps/s; round trip median "
            f"{row['round_trip_us']['median']:.0f} us (p99 {row['round_trip_us']['p99']:.0f}); "
            f"engine overhead (round trip - policy - slowest worker's env time) median "
            f"{row['overhead_us']['median']:.0f} us, p99 {row['overhead_us']['p99']:.0f} us"
        )
        if nbytes:
            hot_us, cold_us = _copyto_us(nbytes)
            turns_n = sum(len(w["turn_us"]) for w in m["windows"])
            write_us = sum(w["write_s"] for w in m["windows"]) / turns_n * 1e6
            record_us = sum(w["record_s"] for w in m["windows"]) / turns_n * 1e6
            row.update(
                bytes_per_batch=nbytes,
                copyto_hot_us=hot_us,
                copyto_cold_us=cold_us,
                worker_write_us=write_us,
                record_us=record_us,
            )

            def rate(us, nbytes=nbytes):
                return f"{us:.0f} us ({nbytes / us / 1e3:.1f} GB/s)"

            print(
                f"{'':<14} {nbytes / 1e6:.1f} MB per batch. numpy.copyto of the same bytes: "
                f"{rate(hot_us)} cache-hot, {rate(cold_us)} into fresh memory.\n"
                f"{'':<14} The engine's two copies: workers writing observations into shared "
                f"memory {rate(write_us)} (summed over workers), recording {rate(record_us)}"
            )
        results["transport"][label] = row
    # The same wake-ups after the workers have idled as long as in the state-only run.
    busy = results["transport"]["state-only"]["policy_us_median"]
    median, p99 = ipc_floor.round_trip_us(args.workers, busy_us=busy)
    results["transport"]["ipc_floor_after_policy_us"] = {
        "median": median,
        "p99": p99,
        "busy_us": busy,
    }
    print(
        f"{'IPC floor':<14} the same, the parent busy {busy:.0f} us (the state-only policy's "
        f"median) before each round: round trip median {median:.0f} us (p99 {p99:.0f})"
    )


def _copyto_us(nbytes: int, reps: int = 40) -> tuple[float, float]:
    """Median ``numpy.copyto`` time for ``nbytes``: the same buffers again and again (cache
    hot), and a rotation of buffers larger than the last-level cache (what a stream of fresh
    observations costs)."""
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    hot = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        hot.append(time.perf_counter() - t0)
    k = max(2, (256 << 20) // (2 * nbytes))  # >= 256 MB in rotation
    srcs = [np.full(nbytes, i, np.uint8) for i in range(k)]
    dsts = [np.ones(nbytes, np.uint8) for _ in range(k)]
    cold = []
    for i in range(reps):
        t0 = time.perf_counter()
        np.copyto(dsts[i % k], srcs[(i * 7 + 3) % k])
        cold.append(time.perf_counter() - t0)
    return _median(hot) * 1e6, _median(cold) * 1e6


def real(args, results: dict) -> None:
    """tabletop/pick-place, one 128x128 camera, TinyVLA-tiny on the CPU: sync vs pipelined."""
    print(
        "\nreal workload: tabletop/pick-place, 1x128 camera, TinyVLA-tiny (CPU), 16 envs, 2 workers"
    )
    kwargs = dict(cameras=("head",), image_size=128)
    spec = envs.make("tabletop/pick-place", **kwargs).spec
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(spec, chunk_len=8).eval()
    print(HEADER.replace("ideal", "     ").replace("eff", "   "))
    results["real"] = {}
    base = None
    for label, mode, g in (("sync, 1 stage", "sync", 1), ("pipelined, 2 stages", "pipelined", 2)):
        with RolloutEngine(
            "tabletop/pick-place",
            policy,
            num_envs=16,
            num_workers=args.workers,
            num_stages=g,
            mode=mode,
            env_kwargs=kwargs,
        ) as engine:
            m = measure(engine, max(4, args.decisions // 4), args.windows)
        base = base or m["decisions_per_s"]
        lo, hi = m["spread_decisions_per_s"]
        busy = np.median([sum(w["worker_busy_s"]) for w in m["windows"]]) / 1e9
        pol = np.median([w["policy_s"] for w in m["windows"]])
        rate = f"{m['decisions_per_s']:>8.1f} [{lo:6.1f}-{hi:6.1f}]{m['env_steps_per_s']:>9.0f}"
        print(
            f"{label:<34}{rate}"
            f"{m['decisions_per_s'] / base:>7.2f}x   policy {pol / m['wall_s']:.0%} of wall, "
            f"workers busy {busy / m['wall_s'] / args.workers:.0%}",
            flush=True,
        )
        results["real"][label] = m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=8, help="chunk_len (= exec_len) for the toy runs")
    ap.add_argument(
        "--step-cost-us", type=float, default=500.0, help="toy CPU cost per control step"
    )
    ap.add_argument("--decisions", type=int, default=24, help="decisions per measurement window")
    ap.add_argument("--transport-decisions", type=int, default=300)
    ap.add_argument("--windows", type=int, default=3, help="measurement windows (median reported)")
    ap.add_argument("--only", choices=("overlap", "transport", "real"), action="append")
    ap.add_argument("--out", default=None, help="write every figure as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the parent's CPU share is part of what is measured
    results: dict = {"cpus": os.cpu_count(), "args": vars(args)}
    parts = args.only or ["overlap", "transport", "real"]
    print(f"engine bench: {os.cpu_count()} cores, {args.workers} workers, {args.windows} windows")
    if "overlap" in parts:
        overlap(args, results)
    if "transport" in parts:
        transport(args, results)
    if "real" in parts:
        real(args, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)
        print(f"\nwrote {args.out}")
    return 0

"""``python bench.py scale``: the engine from 8 to 1024 envs on one machine.

    python bench.py scale                        # 8, 32, 128, 512, 1024 envs on 2 workers
    python bench.py scale --num-envs 32,256 --out scale.json
    python bench.py scale --plot docs/scale.png  # the sweep as a figure
    python bench.py scale --schedule dynamic     # dynamic batching instead of 2 stages

Toy env at 0.2 ms of CPU per control step, state plus one 64x64 camera, chunks of 8;
``LatencyPolicy`` (1 ms base, 0.02 ms per item: latency without CPU), 2 stages (or dynamic
batching, its adaptive rule). Per point: decisions/s; the loop's own CPU (the parent
process's CPU time, the policy burning little) per policy call and per env decision; the
parent's and each worker's RSS; the shared segment's size; the engine's start-up time. The
figure the seed scenario needs is the loop's CPU per env decision staying flat as envs grow
(256 or more envs per accelerator).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import psutil
import torch

from pipeline import RolloutEngine
from pipeline.policies import LatencyPolicy

TOY = {"state_dim": 8, "cameras": ("head",), "image_size": 64, "step_cost_us": 200,
       "episode_len": 10_000}  # fmt: skip
CHUNK, WORKERS = 8, 2


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


SCHEDULES = {"stages": dict(num_stages=2), "dynamic": dict(schedule="dynamic")}


def point(num_envs: int, windows: int, seconds: float, schedule: str = "stages") -> dict:
    """One ``num_envs``: start the engine, size the windows from a warm-up, measure."""
    policy = LatencyPolicy(TOY["state_dim"], chunk_len=CHUNK, base_ms=1.0, per_item_ms=0.02)
    t0 = time.perf_counter()
    engine = RolloutEngine(
        "toy", policy, num_envs=num_envs, num_workers=WORKERS, env_kwargs=TOY, seed=0,
        **SCHEDULES[schedule],
    )  # fmt: skip
    me = psutil.Process()
    with engine:
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.rollout(2)
        per_round = (time.perf_counter() - t0) / 2
        rounds = max(3, min(400, int(seconds / windows / per_round)))
        per = []
        for _ in range(windows):
            engine.stats.reset()
            cpu0, t0 = _cpu_s(me), time.perf_counter()
            engine.rollout(rounds)
            wall, cpu = time.perf_counter() - t0, _cpu_s(me) - cpu0
            st = engine.stats
            per.append(
                {
                    "decisions_per_s": st.decisions / wall,
                    "loop_cpu_us_per_turn": cpu / max(1, len(st.batch_sizes)) * 1e6,
                    "loop_cpu_us_per_env_decision": cpu / st.decisions * 1e6,
                    "on_fixed_stages": st.fixed_stage_calls > 0,  # dynamic's fallback
                }
            )
        workers = [psutil.Process(p) for p in engine.local_worker_pids() if p is not None]
        res = {
            "num_envs": num_envs,
            "rounds_per_window": rounds,
            "startup_s": startup,
            "parent_rss_mb": me.memory_info().rss / 2**20,
            "worker_rss_mb": [w.memory_info().rss / 2**20 for w in workers],
            "shared_mb": engine.layout.nbytes / 2**20,
        }
    for key in ("decisions_per_s", "loop_cpu_us_per_turn", "loop_cpu_us_per_env_decision"):
        res[key] = statistics.median(w[key] for w in per)
    res["windows_on_fixed_stages"] = sum(w["on_fixed_stages"] for w in per)
    res["windows"] = per
    return res


def plot(points: list[dict], path: str) -> None:
    """Decisions/s and the loop's CPU per env decision (and per turn) against envs, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p["num_envs"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(n, [p["decisions_per_s"] for p in points], "o-")
    left.set(xscale="log", xlabel="envs (2 workers)", ylabel="env decisions / s", ylim=(0, None))
    left.set_title("throughput")
    right.plot(n, [p["loop_cpu_us_per_env_decision"] for p in points], "o-", label="per env")
    right.plot(n, [p["loop_cpu_us_per_turn"] for p in points], "s--", label="per policy call")
    right.set(xscale="log", yscale="log", xlabel="envs (2 workers)", ylabel="loop CPU (us)")
    right.set_title("the loop's own CPU")
    right.legend()
    for ax in (left, right):
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(n, [str(x) for x in n])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--num-envs", default="8,32,128,512,1024")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=12.0, help="measured seconds per point")
    ap.add_argument("--out", default=None, help="write the points as JSON here")
    ap.add_argument("--plot", default=None, help="write the sweep as a PNG here")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="stages")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [int(n) for n in args.num_envs.split(",")]
    print(
        f"scale: toy env, {TOY['step_cost_us']} us/step, state + one 64x64 camera, chunks of "
        f"{CHUNK}, LatencyPolicy 1 ms + 0.02 ms/item, {WORKERS} workers, {args.schedule}; "
        f"medians of {args.windows} windows; {os.cpu_count()} cores",
        flush=True,
    )
    head = (
        f"{'envs':>6}{'decisions/s':>13}{'loop CPU/call':>15}{'loop CPU/env':>14}"
        f"{'parent RSS':>12}{'worker RSS':>12}{'shared':>10}{'start-up':>10}"
    )
    print(head, flush=True)
    points, dynamic = [], args.schedule == "dynamic"
    for n in sizes:
        p = point(n, args.windows, args.seconds, args.schedule)
        points.append(p)
        print(
            f"{n:>6}{p['decisions_per_s']:>13,.0f}{p['loop_cpu_us_per_turn']:>12,.0f} us"
            f"{p['loop_cpu_us_per_env_decision']:>11,.1f} us{p['parent_rss_mb']:>9,.0f} MB"
            f"{max(p['worker_rss_mb'], default=0):>9,.0f} MB{p['shared_mb']:>7,.1f} MB"
            f"{p['startup_s']:>8.1f} s"
            + (f"  ({p['windows_on_fixed_stages']} on fixed stages)" if dynamic else ""),
            flush=True,
        )
    per_env = {p["num_envs"]: p["loop_cpu_us_per_env_decision"] for p in points}
    span = [n for n in per_env if n >= 32]
    if len(span) >= 2:
        lo, hi = min(span), max(span)
        print(
            f"-> loop CPU per env decision, {hi} envs / {lo} envs: {per_env[hi] / per_env[lo]:.2f}x"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"toy": TOY, "schedule": args.schedule, "points": points}, f, indent=1,
                default=float,
            )  # fmt: skip
        print(f"wrote {args.out}")
    if args.plot:
        plot(points, args.plot)
        print(f"wrote {args.plot}")
    return 0

"""Workload figures: the envs and policies alone, in one process (no engine)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import envs
from pipeline import schema
from pipeline.policies import TinyVLA

CAMERA_SETUPS = {
    "state-only": ((), 128),
    "1x128": (("head",), 128),
    "3x224": (("head", "wrist", "side"), 224),
}


def step_rate(name: str, cameras, size: int, steps: int, chunk: int = 8) -> float:
    """Control steps/s executing random chunks (images rendered once per chunk)."""
    env = envs.make(name, cameras=cameras, image_size=size)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    done_steps, t0 = 0, time.perf_counter()
    while done_steps < steps:
        res = env.step_chunk(rng.uniform(-1, 1, (chunk, 7)).astype(np.float32))
        done_steps += res.steps
        if res.terminated or res.truncated:
            env.reset(seed=done_steps)
    rate = done_steps / (time.perf_counter() - t0)
    env.close()
    return rate


def memory_per_env(name: str, n: int = 16) -> float:
    """RSS growth per env (one 128x128 camera), measured in a fresh interpreter."""
    code = (
        "import envs, psutil, sys\n"
        f"first = envs.make({name!r}, cameras=('head',), image_size=128); first.reset(seed=0)\n"
        "before = psutil.Process().memory_info().rss\n"
        f"keep = [envs.make({name!r}, cameras=('head',), image_size=128) for _ in range({n})]\n"
        "[e.reset(seed=0) for e in keep]\n"
        f"print((psutil.Process().memory_info().rss - before) / {n} / 2**20)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def reset_time_ms(name: str, n: int = 50) -> float:
    env = envs.make(name, cameras=("head",), image_size=128)
    times = []
    for s in range(n):
        t0 = time.perf_counter()
        env.reset(seed=s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def expert_success(name: str, seeds: int) -> float:
    from envs.tabletop.experts import run_episode

    env, expert = envs.make(name, cameras=()), envs.expert(name)
    return sum(run_episode(env, expert, seed)["success"] for seed in range(seeds)) / seeds


TINYVLA_BATCHES = [("tiny", 1), ("tiny", 16), ("tiny", 64), ("base", 1), ("base", 16)]


def tinyvla_latency(size: str, batch: int, repeats: int) -> tuple[int, float]:
    env = envs.make("tabletop/pick-place", cameras=("head",), image_size=128)
    obs, _ = env.reset(seed=0)
    td = schema.make_batch([obs] * batch, [env.instruction] * batch, sample_seeds=range(batch))
    torch.manual_seed(0)
    policy = TinyVLA.from_spec(env.spec, size=size, chunk_len=8).eval()
    params = sum(p.numel() for p in policy.parameters())
    policy(td.clone())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy(td.clone())
        times.append(time.perf_counter() - t0)
    return params, statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py workloads",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer steps and seeds (smoke run)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument(
        "--only", choices=("tasks", "policies"), default=None, help="one of the two tables"
    )
    args = ap.parse_args(argv)
    steps = 200 if args.quick else 1500
    seeds = 10 if args.quick else 50
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "tasks": {},
    }
    tasks = [n for n in envs.names() if n.startswith("tabletop/") and args.only != "policies"]
    print(
        f"workloads on {os.cpu_count()} cores, one process (median of runs where noted)\n",
        flush=True,
    )
    header = (
        f"{'task':<22}{'state-only':>12}{'1x128':>10}{'3x224':>10}"
        f"{'MiB/env':>9}{'reset ms':>10}{'expert':>8}"
    )
    if tasks:
        print(header + "\n" + "-" * len(header), flush=True)
    for name in tasks:
        row = {k: step_rate(name, cams, size, steps) for k, (cams, size) in CAMERA_SETUPS.items()}
        row["mib_per_env"] = memory_per_env(name, 8 if args.quick else 16)
        row["reset_ms"] = reset_time_ms(name)
        row["expert_success"] = expert_success(name, seeds)
        results["tasks"][name] = row
        print(
            f"{name:<22}{row['state-only']:>12.0f}{row['1x128']:>10.0f}{row['3x224']:>10.0f}"
            f"{row['mib_per_env']:>9.2f}{row['reset_ms']:>10.3f}{row['expert_success']:>8.0%}",
            flush=True,
        )
    if tasks:
        print(f"\n(control steps/s; experts over {seeds} seeds)\n")
    results["tinyvla"] = {}
    for size, batch in [] if args.only == "tasks" else TINYVLA_BATCHES:
        reps = 3 if (size == "base" and batch == 16) else (3 if args.quick else 10)
        params, ms = tinyvla_latency(size, batch, reps)
        results["tinyvla"][f"{size}/b{batch}"] = {"params": params, "cpu_ms": ms}
        print(
            f"TinyVLA-{size:<5} {params / 1e6:7.2f} M params  batch {batch:>2}: "
            f"{ms:9.1f} ms (CPU, median)",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0

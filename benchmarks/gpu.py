"""``python bench.py gpu``: everything that needs a GPU, in one command of at most 8 minutes.

    python bench.py gpu                 # tests, copy overlap, GPU utilisation; JSON + table
    python bench.py gpu --seconds 10    # shorter windows

1. the CUDA tests (``pytest -m cuda``) and the ManiSkill3 tests, each in a subprocess with
   its own time limit;
2. the CUDA copy path with TinyVLA-base on the device: the share of host-to-device copy time
   that ran while another stage's inference ran (pinned shared memory, side stream, events);
3. GPU utilisation from the profiler's CUDA events, lock-step against pipelined, in a
   GPU-bound configuration (zero-cost toy env, three 224x224 cameras) and in the seed-like
   one (``tabletop/pick-place``, one 128x128 camera, the CPU physics on this machine's cores).

On a machine without a CUDA device it stops at once and says so. Results go to
``bench_results/gpu/results.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

WORKLOADS = {
    # name: (env, env_kwargs, num_envs, policy)
    "gpu-bound": (
        "toy",
        {
            "state_dim": 8,
            "cameras": ["head", "wrist", "side"],
            "image_size": 224,
            "static_images": True,
        },
        64,
        "tiny-vla-base",
    ),
    "seed-like": (
        "tabletop/pick-place",
        {"cameras": ["head"], "image_size": 128},
        16,
        "tiny-vla-base",
    ),
}


def no_gpu_message() -> str | None:
    """Why this machine cannot run the GPU bench, or None when it can."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"bench.py gpu needs a CUDA device: torch {torch.__version__} ({build}) sees none "
        "(torch.cuda.is_available() is False). Run it on a machine with a GPU; nothing was run."
    )


def pytest_part(label: str, args: list[str], timeout_s: float) -> dict:
    """Run pytest in a subprocess; its counts from the summary line."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = partial + f"\n(stopped after its {timeout_s:.0f} s limit)", -1
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out)}
    print(f"  {label}: {counts or 'no summary'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "counts": counts, "tail": out[-2000:]}


def overlap_share(intervals: np.ndarray, kinds: list[str], of: str, under: str) -> float | None:
    """The share of ``of`` intervals' device time that ran while an ``under`` interval ran."""
    kinds_arr = np.array(kinds)
    a, b = intervals[kinds_arr == of], intervals[kinds_arr == under]
    total = float((a[:, 1] - a[:, 0]).sum()) if len(a) else 0.0
    if not total or not len(b):
        return None
    covered = 0.0
    for s, e in a:
        lo, hi = np.maximum(b[:, 0], s), np.minimum(b[:, 1], e)
        covered += float(np.clip(hi - lo, 0, None).sum())
    return min(1.0, covered / total)


def workload_part(name: str, seconds: float, windows: int) -> list[dict]:
    """Lock-step and 2-stage pipelined on one workload: decisions/s, GPU utilisation from the
    CUDA events, and the copy overlap of the pipelined run."""
    import envs
    from benchmarks.main import make_policy, run_mode

    env, kwargs, num_envs, policy_name = WORKLOADS[name]
    probe = envs.make(env, **kwargs)
    spec = probe.spec
    probe.close()
    args = argparse.Namespace(
        env=env, env_kwargs=json.dumps(kwargs), num_envs=num_envs, workers=2, chunk=8,
        exec=None, device="cuda", pin_workers=False, decisions=8, seconds=seconds,
        windows=windows, profile=True,
    )  # fmt: skip
    rows = []
    for mode, stages, label in (("sync", 1, "lock-step"), ("pipelined", 2, "pipelined, 2 stages")):
        policy = make_policy(policy_name, spec, 8, torch.device("cuda"))
        res = run_mode(args, spec, policy, mode, stages, f"{name} {label}", None)
        s = res["summary"]
        row = {
            "workload": name,
            "mode": label,
            "decisions_per_s": res["decisions_per_s"],
            "gpu_utilization": s.get("gpu_utilization"),
            "gpu_busy_s_by_phase": s.get("gpu_busy_s_by_phase"),
            "nvml_gpu_utilization_mean": s.get("nvml_gpu_utilization_mean"),
            "cpu_utilization": s.get("cpu_utilization"),
        }
        rows.append(row)
        print(f"  {name} {label}: {row['decisions_per_s']:.1f} decisions/s", flush=True)
    return rows


def copy_overlap_part(seconds: float) -> dict:
    """Pipelined, 2 stages, TinyVLA-base on the GPU-bound workload: how much of the H2D copy
    time ran under inference (the side stream at work), and the copies' median length."""
    import envs
    from benchmarks.main import make_policy
    from pipeline import RolloutEngine

    env, kwargs, num_envs, policy_name = WORKLOADS["gpu-bound"]
    spec = envs.make(env, **kwargs).spec
    policy = make_policy(policy_name, spec, 8, torch.device("cuda"))
    with RolloutEngine(
        env, policy, num_envs=num_envs, num_workers=2, num_stages=2, env_kwargs=kwargs, seed=0
    ) as e:
        e.rollout(4)
        t0 = time.perf_counter()
        with e.profile() as prof:
            while time.perf_counter() - t0 < seconds:
                e.rollout(4)
        registered = e._cuda.registered
    rep = prof.report()
    iv, kinds = rep.device_intervals, list(rep.device_kinds)
    h2d = iv[np.array(kinds) == "h2d"] if len(kinds) else iv[:0]
    res = {
        "registered_memory": registered,
        "h2d_copies": len(h2d),
        "h2d_median_ms": statistics.median((h2d[:, 1] - h2d[:, 0]) / 1e6) if len(h2d) else None,
        "h2d_under_inference": overlap_share(iv, kinds, "h2d", "inference"),
        "gpu_utilization": rep.summary["gpu_utilization"],
    }
    share = res["h2d_under_inference"]
    print(
        f"  copy overlap: {len(h2d)} copies, registered={registered}, "
        f"{'n/a' if share is None else f'{share:.0%}'} of H2D time under inference",
        flush=True,
    )
    return res


def table(results: dict) -> str:
    lines = [f"GPU bench on {results['device']} (torch {results['torch']}, CUDA {results['cuda']})"]
    for key in ("cuda_tests", "maniskill_tests"):
        r = results.get(key)
        if r:
            lines.append(f"{key:16s} rc {r['rc']}: {r['counts']}")
    c = results.get("copy_overlap")
    if c:
        share = c["h2d_under_inference"]
        lines.append(
            f"copy overlap     registered={c['registered_memory']}, {c['h2d_copies']} H2D copies "
            f"(median {c['h2d_median_ms'] or 0:.2f} ms), "
            f"{'n/a' if share is None else f'{share:.0%}'} of H2D time under inference"
        )
    lines.append(
        f"{'workload':10s} {'mode':22s} {'decisions/s':>12s} {'GPU util':>9s} {'NVML':>6s}"
    )
    for r in results.get("utilization", []):
        gpu, nvml = r["gpu_utilization"], r["nvml_gpu_utilization_mean"]
        gpu_txt = "-" if gpu is None else f"{gpu:.1%}"
        nvml_txt = "-" if nvml is None else f"{nvml:.0%}"
        lines.append(
            f"{r['workload']:10s} {r['mode']:22s} {r['decisions_per_s']:12.1f} "
            f"{gpu_txt:>9s} {nvml_txt:>6s}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=os.path.join("bench_results", "gpu"))
    args = ap.parse_args(argv)
    why = no_gpu_message()
    if why:
        print(why, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
    }
    if not args.skip_tests:
        print("tests", flush=True)
        results["cuda_tests"] = pytest_part("CUDA tests", ["-m", "cuda", "tests"], 150)
        results["maniskill_tests"] = pytest_part(
            "ManiSkill3 tests", ["tests/test_suites.py", "-k", "maniskill"], 120
        )
    print("copy path", flush=True)
    results["copy_overlap"] = copy_overlap_part(args.seconds)
    print("utilisation", flush=True)
    results["utilization"] = [
        row for name in WORKLOADS for row in workload_part(name, args.seconds, args.windows)
    ]
    results["wall_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    print("\n" + table(results) + f"\n\n{results['wall_s']:.0f} s; wrote {args.out}/results.json")
    return 0 if all(results.get(k, {}).get("rc", 0) == 0 for k in ("cuda_tests",)) else 1

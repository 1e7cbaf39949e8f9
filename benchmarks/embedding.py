"""The engine embedded in a trainer-shaped script: what its workers cost, and its threads.

    python bench.py embedding [--only rss|threads] [--windows N]

Memory. A trainer script imports torch (and more) at its top. Spawned workers used to re-run
that script, so each held torch's memory. This runs such a script in a fresh interpreter
three ways and prints each worker's RSS: a registered env name, a factory importable from a
module, and a factory defined in the script itself (which must re-run it to unpickle).

Threads. A trainer runs with torch's default intra-op threads (one per core). This process
does not change them, so it runs as a trainer does, and compares in one run, with windows
interleaved, the engine leaving torch's threads alone (``inference_threads=None``) against
its default (``"auto"``): sync and pipelined throughput and the pipelined speed-up. Setup as
measured in issue 9: toy env, 2.5 ms steps, chunk 4, 8 envs, 2 workers, ``LatencyPolicy``
5 ms per item.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch  # what a trainer imports first
    import psutil
    from pipeline import RolloutEngine
    from pipeline.policies import LatencyPolicy

    def my_factory():
        import envs
        return envs.make("toy", state_dim=16)

    if __name__ == "__main__":
        how = sys.argv[1]
        env = {{"name": "toy", "module": {factory!r}, "main": my_factory}}[how]
        if how == "module":
            import importlib
            mod, fn = env.rsplit(".", 1)
            env = getattr(importlib.import_module(mod), fn)
        policy = LatencyPolicy(state_dim=16, chunk_len=4)
        with RolloutEngine(env, policy, num_envs=4, num_workers=2, num_stages=2) as e:
            e.rollout(2)
            rss = [psutil.Process(p).memory_info().rss for p in e.worker_pids()]
        print(json.dumps({{"worker_rss": rss, "parent_rss": psutil.Process().memory_info().rss}}))
    """
)


def measure(how: str) -> dict:
    script = _SCRIPT.format(factory="benchmarks.embedding.toy_factory")
    with tempfile.NamedTemporaryFile("w", suffix="_trainer.py", delete=False) as f:
        f.write(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, f.name, how], capture_output=True, text=True, timeout=300, env=env
    )
    os.unlink(f.name)
    if out.returncode != 0:
        raise SystemExit(f"{how}: the trainer script failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def toy_factory():
    """An env factory in an importable module (not the script)."""
    import envs

    return envs.make("toy", state_dim=16)


def threads(windows: int) -> None:
    import numpy as np
    import torch

    from pipeline import RolloutEngine
    from pipeline.policies import LatencyPolicy

    print(f"torch intra-op threads in this process: {torch.get_num_threads()} (default)")
    engines = {}
    for threads_opt in (None, "auto"):
        for mode, stages in (("sync", 1), ("pipelined", 2)):
            policy = LatencyPolicy(state_dim=16, chunk_len=4, per_item_ms=5)
            engines[threads_opt, mode] = RolloutEngine(
                "toy",
                policy,
                num_envs=8,
                num_workers=2,
                num_stages=stages,
                mode=mode,
                env_kwargs={"step_cost_us": 2500},
                inference_threads=threads_opt,
            )
    rates: dict = {k: [] for k in engines}
    try:
        for e in engines.values():
            e.rollout(4)  # warm-up
        decisions = 10
        for _ in range(windows):
            for k, e in engines.items():
                t0 = time.perf_counter()
                e.rollout(decisions)
                rates[k].append(e.num_envs * decisions / (time.perf_counter() - t0))
    finally:
        for e in engines.values():
            e.close()
    med = {k: float(np.median(v)) for k, v in rates.items()}
    print(f"decisions/s, medians of {windows} interleaved windows of 10 decisions per env:")
    print(f"  {'inference_threads':<24}{'sync':>8}{'pipelined':>11}{'speed-up':>10}")
    for opt in (None, "auto"):
        sync, pipe = med[opt, "sync"], med[opt, "pipelined"]
        label = "None (torch default)" if opt is None else f"{opt!r} (engine default)"
        print(f"  {label:<24}{sync:8.1f}{pipe:11.1f}{pipe / sync:9.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py embedding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--only", choices=("rss", "threads"))
    ap.add_argument("--windows", type=int, default=7)
    args = ap.parse_args(argv)
    if args.only != "rss":
        threads(args.windows)
    if args.only == "threads":
        return 0
    print("worker RSS with a trainer-shaped main script (imports torch at its top):")
    for how, label in (
        ("name", "registered env name ('toy')"),
        ("module", "factory importable from a module"),
        ("main", "factory defined in the script (re-runs it)"),
    ):
        r = measure(how)
        rss = ", ".join(f"{v / 2**20:.0f}" for v in r["worker_rss"])
        print(
            f"  {label:<45} workers {rss} MiB (parent {r['parent_rss'] / 2**20:.0f} MiB)",
            flush=True,
        )
    return 0

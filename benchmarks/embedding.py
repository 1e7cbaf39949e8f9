"""The engine embedded in a trainer-shaped script: what its workers cost.

    python bench.py embedding

A trainer script imports torch (and more) at its top. Spawned workers used to re-run that
script, so each held torch's memory. This runs such a script in a fresh interpreter three
ways and prints each worker's RSS: a registered env name, a factory importable from a
module, and a factory defined in the script itself (which must re-run it to unpickle).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py embedding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.parse_args(argv)
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

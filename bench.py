"""Benchmark entry point.

    python bench.py                 # the main job: lock-step baseline vs pipelined, profiled
    python bench.py --help          # its flags (workload, policy, modes, sweep, compare, ...)
    python bench.py --compare gymnasium --transport   # moving observations: vs Gymnasium
    python bench.py workloads       # envs and policies alone (no engine)
    python bench.py engine          # engine suite: overlap vs bound, sweeps, transport
    python bench.py scheduler       # dynamic batching vs fixed stages vs lock-step, by step CV
    python bench.py lookahead       # latency-aware chunk execution: throughput, idle, success
    python bench.py capacity        # capacity planner: cores per GPU, validated here
    python bench.py ray             # the Ray backend against local; 1 vs 2 simulated nodes
    python bench.py soak            # soak and chaos: RSS, descriptors, /dev/shm, restarts
    python bench.py embedding       # worker RSS and threads when embedded in a trainer script
    python bench.py training        # GRPO demo; synchronous vs async (overlapped) training
    python bench.py torchrl         # TorchRL's TinyVLA in the engine: determinism, its cost
    python bench.py scale           # 8 to 1024 envs: throughput, the loop's CPU, RSS, start-up
    python bench.py gpu             # with a GPU: CUDA tests, copy overlap, GPU utilisation

Every figure is a median over repeated windows after a warm-up, measured in one run, so
ratios are comparable even on a noisy shared machine.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to find system libvulkan")

SUITES = {
    "workloads": "benchmarks.workloads",
    "engine": "benchmarks.engine",
    "scheduler": "benchmarks.scheduler",
    "lookahead": "benchmarks.lookahead",
    "capacity": "benchmarks.capacity",
    "ray": "benchmarks.scaleout",
    "soak": "benchmarks.soak",
    "embedding": "benchmarks.embedding",
    "training": "benchmarks.training",
    "torchrl": "benchmarks.torchrl_policies",
    "scale": "benchmarks.scale",
    "gpu": "benchmarks.gpu",
}


def main(argv: list[str]) -> int:
    suite = "main"
    if argv and argv[0] in SUITES:
        suite, argv = argv[0], argv[1:]
    import importlib

    return importlib.import_module(SUITES.get(suite, "benchmarks.main")).main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

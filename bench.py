"""Benchmark entry point.

    python bench.py                 # workload figures (envs and policies, no engine)
    python bench.py workloads       # the same, with --quick / --out
    python bench.py engine          # the engine: overlap, stage sweep, transport, real workload

Every figure is a median over repeated windows after a warm-up, measured in one run, so
ratios are comparable even on a noisy shared machine.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to find system libvulkan")

SUITES = {"workloads": "benchmarks.workloads", "engine": "benchmarks.engine"}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    suite = "workloads"
    if argv and argv[0] in SUITES:
        suite, argv = argv[0], argv[1:]
    import importlib

    return importlib.import_module(SUITES[suite]).main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

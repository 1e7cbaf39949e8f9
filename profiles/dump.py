"""Print the live Python stacks of a running engine: the inference process and its workers.

    python profiles/dump.py                # find running engines automatically
    python profiles/dump.py --pid 12345    # an engine's parent process (its workers follow)
    python profiles/dump.py --pid 12345 --native

This is how to read a hang: the parent in ``_collect`` (waiting for observations) with a
worker stuck inside ``step_chunk`` points at the env; every worker in ``recv`` (waiting for
actions) with the parent elsewhere points at the policy or the caller. Engine workers are
found as the parent's children running multiprocess's ``spawn_main``.
"""

from __future__ import annotations

import argparse
import os
import sys

import psutil

from pipeline.runtime.stacks import dump_stacks, pyspy_path


def _workers_of(p: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in p.children():
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def engine_processes(pid: int | None) -> list[tuple[psutil.Process, list[psutil.Process]]]:
    """``(parent, workers)`` for every Python process with spawned worker children."""
    if pid is not None:
        parent = psutil.Process(pid)
        return [(parent, _workers_of(parent))]
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.pid != os.getpid() and "python" in (p.info["name"] or ""):
                workers = _workers_of(p)
                if workers:
                    found.append((p, workers))
        except psutil.Error:
            pass
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pid", type=int, default=None, help="the engine's parent process")
    ap.add_argument("--native", action="store_true", help="include native (C/C++) frames")
    args = ap.parse_args(argv)
    if pyspy_path() is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    engines = engine_processes(args.pid)
    if not engines:
        raise SystemExit("no running engine found (a Python process with spawned workers)")
    for parent, workers in engines:
        procs = [("inference loop", parent)] + [("worker", w) for w in workers]
        for role, proc in procs:
            print(f"=== {role}: pid {proc.pid} ===", flush=True)
            print(dump_stacks(proc.pid, native=args.native), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a command while busy-loop processes hog every core (the suite must pass on a loaded
machine). Example: ``python tests/under_load.py --hogs 2 --runs 3 -- make test``."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import time


def _spin() -> None:
    while True:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes (default 2)")
    ap.add_argument("--runs", type=int, default=1, help="run the command this many times")
    ap.add_argument("command", nargs="+", help="the command, after --")
    args = ap.parse_args()
    hogs = [mp.Process(target=_spin, daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    codes = []
    try:
        for r in range(args.runs):
            t0 = time.monotonic()
            code = subprocess.call(args.command)
            codes.append(code)
            print(
                f"under_load: run {r + 1}/{args.runs} exit {code} in {time.monotonic() - t0:.0f} s "
                f"with {args.hogs} hogs",
                flush=True,
            )
    finally:
        for h in hogs:
            h.kill()
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())

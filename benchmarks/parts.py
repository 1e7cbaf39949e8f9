"""The shape every multi-part benchmark shares: ``--part`` (repeatable; all by default),
then one JSON file with every part's figures."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable


def parser(prog: str, doc: str | None, parts: dict[str, Callable]) -> argparse.ArgumentParser:
    """An argument parser with the module docstring as help and a ``--part`` choice.

    Example:
        >>> ap = parser("bench.py capacity", __doc__, PARTS)
        >>> ap.add_argument("--json", default="bench_results/plan.json")
    """
    ap = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--part", choices=sorted(parts), action="append")
    return ap


def run(args: argparse.Namespace, parts: dict[str, Callable]) -> int:
    """Run the chosen parts in order and write their figures to ``args.json``."""
    results: dict = {"args": vars(args)}
    for name in args.part or list(parts):
        results[name] = parts[name](args)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {args.json}")
    return 0

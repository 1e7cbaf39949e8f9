"""Record a py-spy wall-clock profile of a bench run, across every worker process.

    python profiles/record.py                          # the default bench
    python profiles/record.py --rate 200 -- --policy latency:5,1 --windows 2
    python profiles/record.py --out bench_results/spy -- engine --only transport

Everything after ``--`` goes to ``bench.py``. py-spy follows the spawned workers (``-s``) and
keeps the time they spend blocked (``--idle``), so waiting shows up as well as work. One
recording is written as:

* ``pyspy.speedscope.json``: open it at https://www.speedscope.app (one profile per process);
* ``pyspy.svg``: a flame graph of every process, each process its own tower;
* ``pyspy.collapsed.txt``: the same samples as collapsed stacks (``process;frame;... count``).

py-spy runs as root on the project's machines; elsewhere it may need ``sudo`` or
``kernel.yama.ptrace_scope=0``.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collapse_speedscope(doc: dict) -> dict[str, int]:
    """Speedscope's sampled profiles as collapsed stacks (sample counts), one root frame per
    process."""
    frames = []
    for f in doc["shared"]["frames"]:
        where = f" ({f['file']}:{f.get('line', '?')})" if f.get("file") else ""
        frames.append((f["name"] + where).replace(";", ","))
    stacks: dict[str, int] = defaultdict(int)
    for prof in doc["profiles"]:
        root = prof["name"].replace(";", ",")
        for sample in prof["samples"]:
            stacks[";".join([root, *(frames[i] for i in sample)])] += 1
    return stacks


def to_flamegraph_svg(stacks: dict[str, int], width: int = 1400, row: int = 16) -> str:
    """A plain flame graph (root at the bottom) of the collapsed stacks."""
    tree: dict = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for name in stack.split(";"):
            node = node["kids"].setdefault(name, {"n": 0, "kids": {}})
            node["n"] += count

    def depth(node) -> int:
        return 1 + max((depth(k) for k in node["kids"].values()), default=0)

    levels = depth(tree)
    height = levels * row + 40
    total = max(tree["n"], 1)
    rects = []

    def draw(node, name, x, level):
        w = node["n"] / total * width
        if w < 0.5:
            return
        y = height - 20 - level * row
        hue = hash(name.split(" (")[0]) % 60
        label = html.escape(name)
        text = html.escape(name[: int(w / 7)]) if w > 40 else ""
        rects.append(
            f"<g><title>{label} ({node['n'] / total:.1%})</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
            f'fill="hsl({hue},80%,60%)"/>'
            f'<text x="{x + 3:.1f}" y="{y + row - 4}" font-size="11" '
            f'clip-path="inset(0 {max(0, w - 3):.0f}px 0 0)">{text}</text></g>'
        )
        cx = x
        for kid_name, kid in sorted(node["kids"].items()):
            draw(kid, kid_name, cx, level + 1)
            cx += kid["n"] / total * width

    cx = 0.0
    for name, kid in sorted(tree["kids"].items()):
        draw(kid, name, cx, 0)
        cx += kid["n"] / total * width
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace"><text x="4" y="14">py-spy flame graph, {total} samples, '
        f"all processes (hover for names)</text>{''.join(rects)}</svg>"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=None, help="default: bench_results/<timestamp>-pyspy/")
    ap.add_argument("--rate", type=int, default=100, help="samples per second")
    ap.add_argument("--native", action="store_true", help="include native frames (costly)")
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        raise SystemExit("py-spy not found: pip install py-spy")
    out = args.out or os.path.join(
        "bench_results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-pyspy"
    )
    os.makedirs(out, exist_ok=True)
    speedscope = os.path.join(out, "pyspy.speedscope.json")
    collapsed = os.path.join(out, "pyspy.collapsed.txt")
    if not any(a == "--out" for a in bench_args) and (
        not bench_args or bench_args[0] not in ("workloads", "engine")
    ):
        bench_args += ["--out", out]
    # speedscope keeps one profile per process (py-spy's raw format merges subprocesses away)
    cmd = [
        pyspy,
        "record",
        "-s",
        "--idle",
        "-r",
        str(args.rate),
        "-f",
        "speedscope",
        "-o",
        speedscope,
    ]
    if args.native:
        cmd.append("--native")
    cmd += ["--", sys.executable, os.path.join(ROOT, "bench.py"), *bench_args]
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if not os.path.exists(speedscope):
        raise SystemExit(f"py-spy wrote nothing (exit code {rc})")
    with open(speedscope) as f:
        stacks = collapse_speedscope(json.load(f))
    with open(collapsed, "w") as f:
        f.writelines(f"{stack} {count}\n" for stack, count in stacks.items())
    with open(os.path.join(out, "pyspy.svg"), "w") as f:
        f.write(to_flamegraph_svg(stacks))
    processes = len({k.split(";", 1)[0] for k in stacks})
    print(f"wrote {speedscope}, {out}/pyspy.svg, {collapsed} ({processes} processes)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

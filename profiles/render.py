"""Render a saved profile again, or compare two runs side by side.

    python profiles/render.py RUN/trace.json                 # table, and PNG + HTML next to it
    python profiles/render.py RUN/trace.json --out OTHER_DIR
    python profiles/render.py BEFORE/trace.json AFTER/trace.json   # compare (before -> after)

``RUN`` is a folder written by ``bench.py`` (one per mode, e.g. ``pipelined_2stage``) or by
``ProfileReport.save``. A ``summary.json`` works for comparisons; the timeline needs the
trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.profiler.report import ProfileReport  # noqa: E402

METRICS = (
    ("decisions_per_s", "decisions/s", "{:.1f}"),
    ("env_steps_per_s", "env steps/s", "{:.0f}"),
    ("cpu_utilization", "CPU utilization", "{:.1%}"),
    ("gpu_utilization", "GPU utilization", "{:.1%}"),
    ("overlap_efficiency", "overlap efficiency", "{:.1%}"),
    ("min_coverage", "min phase coverage", "{:.1%}"),
)


def load(path: str) -> dict:
    """Summary and per-process phase shares from a trace.json or a summary.json."""
    with open(path) as f:
        doc = json.load(f)
    if "traceEvents" in doc:
        report = ProfileReport.from_trace(doc)
        return {"report": report, **report.to_dict()}
    return doc


def compare(a: dict, b: dict, names: tuple[str, str]) -> str:
    lines = [f"{'':<34}{names[0][-28:]:>30}{names[1][-28:]:>30}{'change':>10}"]
    for key, label, fmt in METRICS:
        va, vb = a["summary"].get(key), b["summary"].get(key)
        if va is None and vb is None:
            continue
        ta = fmt.format(va) if va is not None else "n/a"
        tb = fmt.format(vb) if vb is not None else "n/a"
        change = f"{vb / va - 1:+.1%}" if va and vb is not None else ""
        lines.append(f"{label:<34}{ta:>30}{tb:>30}{change:>10}")
    lines.append("")
    lines.append(f"{'process / phase (share of wall)':<34}{'':>30}{'':>30}")
    procs_b = {p["name"]: p for p in b["processes"]}
    for pa in a["processes"]:
        pb = procs_b.get(pa["name"], {"phases": {}})
        for phase in sorted(set(pa["phases"]) | set(pb["phases"])):
            sa = pa["phases"].get(phase, {}).get("share", 0.0)
            sb = pb["phases"].get(phase, {}).get("share", 0.0)
            lines.append(
                f"{pa['name'] + ' / ' + phase:<34}{sa:>30.1%}{sb:>30.1%}{(sb - sa) * 100:>+9.1f}p"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", help="one trace.json to render, or two files to compare")
    ap.add_argument("--out", default=None, help="where to write the PNG and HTML (rendering)")
    args = ap.parse_args(argv)
    if len(args.runs) == 1:
        doc = load(args.runs[0])
        report = doc.get("report")
        if report is None:
            raise SystemExit("rendering needs a trace.json (a summary.json has no spans)")
        print(report.table())
        out = args.out or os.path.dirname(os.path.abspath(args.runs[0]))
        paths = report.save(out) if args.out else _render_next_to(report, out)
        print("wrote", ", ".join(paths.values()))
        return 0
    if len(args.runs) != 2:
        raise SystemExit("give one run to render or two to compare")
    a, b = load(args.runs[0]), load(args.runs[1])
    print(compare(a, b, (args.runs[0], args.runs[1])))
    return 0


def _render_next_to(report: ProfileReport, out: str) -> dict[str, str]:
    from pipeline.profiler import export

    paths = {
        "png": os.path.join(out, "timeline.rendered.png"),
        "html": os.path.join(out, "report.rendered.html"),
    }
    export.timeline_png(report, paths["png"])
    export.html_report(report, paths["png"], paths["html"])
    return paths


if __name__ == "__main__":
    sys.exit(main())

"""A profile as files: Chrome Trace Event JSON (opens in Perfetto), a timeline PNG, an HTML page."""

from __future__ import annotations

import base64
import html
import json
import os

import numpy as np

from pipeline.runtime.spans import PHASE_ID, PHASES, SPAN_DTYPE, union_ns

GPU_PID = 0  # no real process has pid 0: the device's row in the trace
COLOURS = {
    "env_init": "#7f7f7f",
    "reset": "#bcbd22",
    "physics": "#1f77b4",
    "render": "#17becf",
    "obs_write": "#9467bd",
    "wait_actions": "#e8e8e8",
    "signal": "#8c564b",
    "wait_obs": "#e8e8e8",
    "preprocess": "#ff7f0e",
    "inference": "#d62728",
    "sample": "#ff9896",
    "dispatch": "#e377c2",
    "record": "#2ca02c",
    "bookkeeping": "#c5b0d5",
    "outside": "#f7f7f7",
    "gpu": "#d62728",
}


def _rows(processes) -> list[int]:
    """Each process's row id in the trace: its pid, or, for a second one with the same pid
    (the inline backend's workers run in the loop's process), ``-i``, which no process has."""
    seen: set[int] = set()
    rows = []
    for i, p in enumerate(processes):
        rows.append(p.pid if p.pid not in seen else -i)
        seen.add(p.pid)
    return rows


def chrome_trace(report, path: str) -> dict:
    """Write the trace: one row per process, one for the device, CPU/GPU counters."""
    base = report.t0
    gpu_name = f"GPU: {report.device_source}"
    rows = _rows(report.processes)
    events = [
        {"ph": "M", "name": "process_name", "pid": row, "tid": row, "args": {"name": p.name}}
        for p, row in zip(report.processes, rows, strict=True)
    ]
    events.append(
        {"ph": "M", "name": "process_name", "pid": GPU_PID, "tid": 0, "args": {"name": gpu_name}}
    )
    for i, row in enumerate(rows):
        events.append(
            {
                "ph": "M",
                "name": "process_sort_index",
                "pid": row,
                "tid": row,
                "args": {"sort_index": i + 1},
            }
        )
    timed = []
    for p, row in zip(report.processes, rows, strict=True):
        for span in p.spans:
            t0, t1 = max(int(span["t0"]), report.t0), min(int(span["t1"]), report.t1)
            if t1 <= t0:
                continue
            timed.append(
                {
                    "ph": "X",
                    "name": PHASES[span["phase"]],
                    "cat": "phase",
                    "pid": row,
                    "tid": row,
                    "ts": (t0 - base) / 1e3,
                    "dur": (t1 - t0) / 1e3,
                    "args": {"cpu_ms": round(int(span["cpu"]) / 1e6, 4)},
                }
            )
    for a, b in np.clip(report.device_intervals, report.t0, report.t1):
        if b > a:
            timed.append(
                {
                    "ph": "X",
                    "name": "busy",
                    "cat": "device",
                    "pid": GPU_PID,
                    "tid": 0,
                    "ts": (int(a) - base) / 1e3,
                    "dur": (int(b) - int(a)) / 1e3,
                }
            )
    names = {p.pid: p.name for p in report.processes}
    for t, per, total, gpu in report.cpu_samples:
        ts = (t - base) / 1e3
        args = {names.get(pid, str(pid)): round(v, 1) for pid, v in per.items()}
        args["machine"] = round(total, 1)
        timed.append(
            {
                "ph": "C",
                "name": "CPU %",
                "pid": report.processes[0].pid,
                "tid": 0,
                "ts": ts,
                "args": args,
            }
        )
        if gpu is not None:
            timed.append(
                {
                    "ph": "C",
                    "name": "GPU % (NVML)",
                    "pid": GPU_PID,
                    "tid": 0,
                    "ts": ts,
                    "args": {"gpu": gpu},
                }
            )
    timed += _device_counter(report)
    timed.sort(key=lambda e: e["ts"])
    other = {
        "summary": report.summary,
        "config": report.config,
        "t0_ns": report.t0,
        "cores": report.cores,
    }
    trace = {"traceEvents": events + timed, "displayTimeUnit": "ms", "otherData": other}
    with open(path, "w") as f:
        json.dump(trace, f, default=float)
    return trace


def read_trace(trace: dict) -> dict:
    """The parts of a trace written by :func:`chrome_trace`: per-process spans (as
    ``SPAN_DTYPE`` arrays), process names, device intervals, the window and the metadata."""
    other = trace.get("otherData", {})
    t0 = int(other.get("t0_ns", 0))
    events = trace["traceEvents"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e["name"] == "process_name"
    }
    spans: dict[int, list] = {}
    device = []
    t_end = t0
    for e in events:
        if e.get("ph") != "X":
            continue
        a = t0 + int(round(e["ts"] * 1e3))
        b = a + int(round(e["dur"] * 1e3))
        t_end = max(t_end, b)
        if e.get("cat") == "device":
            device.append((a, b))
        else:
            cpu = int(round(e.get("args", {}).get("cpu_ms", 0) * 1e6))
            spans.setdefault(e["pid"], []).append((PHASE_ID[e["name"]], a, b, cpu))
    summary = other.get("summary", {})
    return {
        "t0": t0,
        "t1": t_end,
        "config": other.get("config", {}),
        "cores": int(other.get("cores", os.cpu_count() or 1)),
        "names": {pid: n for pid, n in names.items() if pid != GPU_PID},
        "spans": {pid: np.array(rows, dtype=SPAN_DTYPE) for pid, rows in spans.items()},
        "device_source": names.get(GPU_PID, "GPU: none").split(": ", 1)[-1],
        "device_intervals": np.array(device, np.int64).reshape(-1, 2),
        "decisions": int(summary.get("decisions", 0)),
        "env_steps": int(summary.get("env_steps", 0)),
    }


def _device_counter(report, buckets: int = 100) -> list[dict]:
    """Device busy fraction per time bucket, as a counter track."""

    if len(report.device_intervals) == 0:
        return []
    edges = np.linspace(report.t0, report.t1, buckets + 1).astype(np.int64)
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        busy = union_ns(report.device_intervals, int(a), int(b)) / max(1, int(b - a))
        out.append(
            {
                "ph": "C",
                "name": "GPU busy %",
                "pid": GPU_PID,
                "tid": 0,
                "ts": (int(a) - report.t0) / 1e3,
                "args": {"busy": round(100 * busy, 1)},
            }
        )
    return out


def timeline_png(report, path: str, max_seconds: float | None = None) -> None:
    """One row per process plus the device; colour = phase. Overlap (or its lack) at a glance.

    Args:
        report: the :class:`~pipeline.profiler.report.ProfileReport` to draw.
        path: where the PNG is written (matplotlib, Agg backend).
        max_seconds: show at most this many seconds from the profile's start; None: all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [(p.name, p.spans) for p in report.processes]
    fig_h = 1.2 + 0.55 * (len(rows) + 1)
    fig, ax = plt.subplots(figsize=(13, fig_h), dpi=110)
    t_end = (report.t1 - report.t0) / 1e9
    if max_seconds is not None:
        t_end = min(t_end, max_seconds)
    labels, used = [], set()
    for i, (name, spans) in enumerate(rows):
        y = len(rows) - i
        labels.append((y, name))
        for phase_id in np.unique(spans["phase"]) if len(spans) else []:
            sel = spans[spans["phase"] == phase_id]
            a = (np.clip(sel["t0"], report.t0, report.t1) - report.t0) / 1e9
            b = (np.clip(sel["t1"], report.t0, report.t1) - report.t0) / 1e9
            keep = b > a
            phase = PHASES[phase_id]
            ax.broken_barh(
                list(zip(a[keep], (b - a)[keep], strict=True)),
                (y - 0.4, 0.8),
                color=COLOURS[phase],
                linewidth=0,
            )
            used.add(phase)
    iv = np.clip(report.device_intervals, report.t0, report.t1)
    if len(iv):
        a = (iv[:, 0] - report.t0) / 1e9
        w = (iv[:, 1] - iv[:, 0]) / 1e9
        ax.broken_barh(
            list(zip(a, w, strict=True)), (-0.4 + 0, 0.8), color=COLOURS["gpu"], linewidth=0
        )
    labels.append((0, "GPU" + (" (simulated)" if "simulated" in report.device_source else "")))
    ax.set_yticks([y for y, _ in labels], [n for _, n in labels])
    ax.set_xlim(0, t_end)
    ax.set_xlabel("seconds since the start of the profile")
    s = report.summary
    gpu = s["gpu_utilization"]
    title = (
        f"{report.config.get('mode')} / {report.config.get('num_stages')} stages: "
        f"{s['decisions_per_s']:.0f} decisions/s, CPU {s['cpu_utilization']:.0%}"
        + (f", GPU {gpu:.0%}" if gpu is not None else "")
        + (f", overlap efficiency {s['overlap_efficiency']:.0%}" if s["overlap_efficiency"] else "")
    )
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=COLOURS[p], label=p) for p in PHASES if p in used]
    if len(iv):
        handles.append(Patch(color=COLOURS["gpu"], label="device busy"))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25),
        ncol=min(8, len(handles)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def html_report(report, png_path: str, path: str) -> None:
    """One self-contained page: the table, the timeline and the summary.

    Args:
        report: the :class:`~pipeline.profiler.report.ProfileReport` to show.
        png_path: an existing timeline PNG (:func:`timeline_png`'s), embedded as base64.
        path: where the HTML page is written.
    """
    with open(png_path, "rb") as f:
        png = base64.b64encode(f.read()).decode("ascii")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rollout profile</title>
<style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>Rollout profile</h1>
<p>{html.escape(json.dumps(report.config))}</p>
<img alt="timeline" style="max-width:100%" src="data:image/png;base64,{png}">
<h2>Per process and phase</h2>
<pre>{html.escape(report.table())}</pre>
<h2>Summary</h2>
<pre>{html.escape(json.dumps(report.summary, indent=1, default=float))}</pre>
</body></html>
"""
    with open(path, "w") as f:
        f.write(page)

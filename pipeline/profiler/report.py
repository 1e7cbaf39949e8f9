"""The numbers of a profile: per process and phase, wall and CPU time; utilisation; overlap.

Worker time before a worker's first span and after its last one in the window is attributed
to ``wait_actions`` (or ``env_init`` when profiling from creation): between engine calls every
worker is blocked waiting for a command, by construction. Such time is marked as inferred.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.runtime.spans import (
    LOOP_PHASES,
    PHASE_ID,
    PHASES,
    STEPPING_PHASES,
    WORKER_PHASES,
    union_ns,
)


@dataclass
class ProcessProfile:
    name: str
    pid: int
    window_ns: int
    phases: dict[str, dict[str, float]]  # phase -> wall_ns, cpu_ns, inferred_ns
    spans: np.ndarray = field(repr=False)
    sampled_cpu_pct: float = float("nan")

    @property
    def attributed_ns(self) -> int:
        return int(sum(p["wall_ns"] for p in self.phases.values()))

    @property
    def coverage(self) -> float:
        return self.attributed_ns / self.window_ns if self.window_ns else 0.0

    @property
    def cpu_ns(self) -> int:
        return int(sum(p["cpu_ns"] for p in self.phases.values()))


def _process(name, pid, spans, t0, t1, idle_phase, names) -> ProcessProfile:
    spans = spans[(spans["t1"] > t0) & (spans["t0"] < t1)]
    inferred = 0
    if idle_phase is not None:  # the worker's edges of the window, blocked in recv
        first = int(spans["t0"].min()) if len(spans) else t1
        last = int(spans["t1"].max()) if len(spans) else t1
        edges = [(PHASE_ID[idle_phase], t0, first, 0)] if first > t0 else []
        if len(spans) and last < t1:
            edges.append((PHASE_ID[idle_phase], last, t1, 0))
        inferred = sum(b - a for _, a, b, _ in edges)
        spans = np.concatenate([spans, np.array(edges, dtype=spans.dtype)])
        spans = spans[np.argsort(spans["t0"], kind="stable")]
    a = np.clip(spans["t0"], t0, t1)
    b = np.clip(spans["t1"], t0, t1)
    phases = {}
    for phase in names:
        sel = spans["phase"] == PHASE_ID[phase]
        wall = int((b[sel] - a[sel]).sum())
        full = spans["t1"][sel] - spans["t0"][sel]
        frac = np.where(full > 0, (b[sel] - a[sel]) / np.maximum(full, 1), 0.0)
        cpu = int((spans["cpu"][sel] * frac).sum())
        phases[phase] = {"wall_ns": wall, "cpu_ns": cpu, "inferred_ns": 0}
    if idle_phase is not None:
        phases[idle_phase]["inferred_ns"] = inferred
    return ProcessProfile(name, pid, t1 - t0, phases, spans)


@dataclass
class ProfileReport:
    """Everything a profile measured. ``print(report.table())``; ``report.save(dir)``."""

    config: dict
    t0: int
    t1: int
    processes: list[ProcessProfile]
    cores: int
    device_source: str
    device_intervals: np.ndarray
    decisions: int
    env_steps: int
    cpu_samples: list = field(default_factory=list, repr=False)
    dropped_spans: int = 0
    device_kinds: list = field(default_factory=list, repr=False)  # phase of each interval
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_session(cls, s) -> ProfileReport:
        t0, t1 = s.t0, s.t1
        idle = "env_init" if s.since is not None else "wait_actions"
        procs = [
            _process(
                "inference loop", s.pids[0], s.loop_spans, t0, t1, None, LOOP_PHASES + ("env_init",)
            )
        ]
        # On the Ray backend each worker is named with its node ("node 1 worker 3").
        nodes = s.config.get("worker_nodes") if s.config.get("backend") == "ray" else None
        for w, spans in enumerate(s.worker_spans):
            name = f"node {nodes[w]} worker {w}" if nodes else f"worker {w}"
            procs.append(_process(name, s.pids[w + 1], spans, t0, t1, idle, WORKER_PHASES))
        for p, pid in zip(procs, s.local_pids, strict=True):
            vals = [per[pid] for _, per, _, _ in s.sampler.samples if pid in per]
            if vals:
                p.sampled_cpu_pct = float(np.nanmean(vals))
        report = cls(
            config=s.config,
            t0=t0,
            t1=t1,
            processes=procs,
            cores=len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            device_source=s.device_source,
            device_intervals=s.device_intervals,
            decisions=s.decisions,
            env_steps=s.env_steps,
            cpu_samples=s.sampler.samples,
            dropped_spans=int(sum(s.dropped)),
            device_kinds=list(getattr(s, "device_kinds", [])),
        )
        report.summary = report._summarise()
        return report

    @classmethod
    def from_trace(cls, trace: dict) -> ProfileReport:
        """Rebuild a report from a saved Chrome trace (as written by :meth:`save`)."""
        from pipeline.profiler import export

        t = export.read_trace(trace)
        procs = []
        for pid, spans in t["spans"].items():
            name = t["names"].get(pid, str(pid))
            phases = LOOP_PHASES + ("env_init",) if name.startswith("inference") else WORKER_PHASES
            procs.append(_process(name, pid, spans, t["t0"], t["t1"], None, phases))
        procs.sort(key=lambda p: (not p.name.startswith("inference"), p.name))
        report = cls(
            config=t["config"],
            t0=t["t0"],
            t1=t["t1"],
            processes=procs,
            cores=t["cores"],
            device_source=t["device_source"],
            device_intervals=t["device_intervals"],
            decisions=t["decisions"],
            env_steps=t["env_steps"],
        )
        report.summary = report._summarise()
        return report

    # -- numbers -----------------------------------------------------------------------------
    def _summarise(self) -> dict:
        window = self.t1 - self.t0
        loop = self.processes[0]
        workers = self.processes[1:]
        in_calls = window - loop.phases["outside"]["wall_ns"] - loop.phases["env_init"]["wall_ns"]
        gpu_busy = union_ns(self.device_intervals, self.t0, self.t1)
        has_device = len(self.device_intervals) > 0
        inference = gpu_busy if has_device else loop.phases["inference"]["wall_ns"]
        worker_busy = sum(sum(p.phases[ph]["wall_ns"] for ph in STEPPING_PHASES) for p in workers)
        w, g = max(1, len(workers)), max(1, self.config.get("num_stages", 1))
        if self.config.get("mode") == "sync":
            bound = inference + worker_busy / w
        else:
            bound = max(inference, worker_busy / w, inference / g + worker_busy / (w * g))
        nvml = [gpu for *_, gpu in self.cpu_samples if gpu is not None]
        kinds = (
            np.array(self.device_kinds)
            if len(self.device_kinds) == len(self.device_intervals)
            else None
        )
        by_phase = {
            k: union_ns(self.device_intervals[kinds == k], self.t0, self.t1) / 1e9
            for k in (sorted(set(self.device_kinds)) if kinds is not None else [])
        }
        return {
            "window_s": window / 1e9,
            "in_engine_calls_s": in_calls / 1e9,
            "decisions": self.decisions,
            "env_steps": self.env_steps,
            "decisions_per_s": self.decisions / (in_calls / 1e9) if in_calls > 0 else 0.0,
            "env_steps_per_s": self.env_steps / (in_calls / 1e9) if in_calls > 0 else 0.0,
            "cores": self.cores,
            "cpu_utilization": sum(p.cpu_ns for p in self.processes) / (window * self.cores),
            "gpu_source": self.device_source,
            "gpu_utilization": gpu_busy / window if has_device else None,
            "gpu_utilization_in_calls": gpu_busy / in_calls
            if has_device and in_calls > 0
            else None,
            "nvml_gpu_utilization_mean": float(np.mean(nvml)) / 100 if nvml else None,
            "gpu_busy_s_by_phase": by_phase,
            "ideal_bound_s": bound / 1e9,
            "overlap_efficiency": bound / in_calls if in_calls > 0 else None,
            "min_coverage": min(p.coverage for p in self.processes),
            "dropped_spans": self.dropped_spans,
        }

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "summary": self.summary,
            "processes": [
                {
                    "name": p.name,
                    "pid": p.pid,
                    "window_s": p.window_ns / 1e9,
                    "coverage": p.coverage,
                    "unattributed_s": (p.window_ns - p.attributed_ns) / 1e9,
                    "sampled_cpu_pct": p.sampled_cpu_pct,
                    "phases": {
                        ph: {
                            "wall_s": v["wall_ns"] / 1e9,
                            "cpu_s": v["cpu_ns"] / 1e9,
                            "cpu_per_wall": v["cpu_ns"] / v["wall_ns"] if v["wall_ns"] else None,
                            "share": v["wall_ns"] / p.window_ns if p.window_ns else 0.0,
                            "inferred_s": v["inferred_ns"] / 1e9,
                        }
                        for ph, v in p.phases.items()
                        if v["wall_ns"] > 0
                    },
                }
                for p in self.processes
            ],
        }

    def phase(self, process: str, phase: str) -> dict:
        """One row of the table, e.g. ``report.phase("worker 0", "physics")["cpu_per_wall"]``."""
        for p in self.to_dict()["processes"]:
            if p["name"] == process:
                return p["phases"].get(
                    phase, {"wall_s": 0.0, "cpu_s": 0.0, "cpu_per_wall": None, "share": 0.0}
                )
        raise KeyError(process)

    def table(self) -> str:
        s = self.summary
        lines = [
            f"profile: {self.config.get('env')} {self.config.get('mode')}, "
            f"{self.config.get('num_envs')} envs, {self.config.get('num_workers')} workers, "
            f"{self.config.get('num_stages')} stages, policy {self.config.get('policy')} on "
            f"{self.config.get('device')}; window {s['window_s']:.2f} s "
            f"({s['in_engine_calls_s']:.2f} s in engine calls)",
            f"{'process':<16}{'phase':<14}{'wall ms':>10}{'cpu ms':>10}{'cpu/wall':>9}{'share':>8}",
        ]
        for p in self.processes:
            for ph, v in p.phases.items():
                if v["wall_ns"] <= 0:
                    continue
                ratio = f"{v['cpu_ns'] / v['wall_ns']:.2f}" if v["wall_ns"] else "-"
                mark = " *" if v["inferred_ns"] else ""
                lines.append(
                    f"{p.name:<16}{ph:<14}{v['wall_ns'] / 1e6:>10.1f}{v['cpu_ns'] / 1e6:>10.1f}"
                    f"{ratio:>9}{v['wall_ns'] / p.window_ns:>8.1%}{mark}"
                )
            rest = p.window_ns - p.attributed_ns
            lines.append(
                f"{p.name:<16}{'(unattributed)':<14}{rest / 1e6:>10.1f}{'':>10}{'':>9}"
                f"{rest / p.window_ns:>8.1%}   coverage {p.coverage:.1%}, sampled CPU "
                f"{p.sampled_cpu_pct:.0f}%"
            )
        gpu = s["gpu_utilization"]
        gpu_txt = f"{gpu:.1%} busy ({s['gpu_source']})" if gpu is not None else s["gpu_source"]
        if s["gpu_busy_s_by_phase"]:
            parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in s["gpu_busy_s_by_phase"].items())
            gpu_txt += f"; busy by phase: {parts}"
        if s["nvml_gpu_utilization_mean"] is not None:
            gpu_txt += f"; NVML {s['nvml_gpu_utilization_mean']:.0%}"
        eff = s["overlap_efficiency"]
        lines += [
            "(* includes time at the window's edges inferred from the protocol)",
            f"throughput: {s['decisions_per_s']:.1f} decisions/s, "
            f"{s['env_steps_per_s']:.0f} env steps/s",
            f"CPU: {s['cpu_utilization']:.1%} of {s['cores']} cores busy; GPU: {gpu_txt}",
            f"overlap: ideal bound {s['ideal_bound_s']:.2f} s vs {s['in_engine_calls_s']:.2f} s in "
            f"engine calls -> efficiency {eff:.0%}"
            if eff is not None
            else "overlap: n/a",
        ]
        return "\n".join(lines)

    def save(self, out_dir: str) -> dict[str, str]:
        """Write summary.json, trace.json (Chrome/Perfetto), timeline.png and report.html."""
        from pipeline.profiler import export

        os.makedirs(out_dir, exist_ok=True)
        paths = {
            "summary": os.path.join(out_dir, "summary.json"),
            "trace": os.path.join(out_dir, "trace.json"),
            "png": os.path.join(out_dir, "timeline.png"),
            "html": os.path.join(out_dir, "report.html"),
        }
        with open(paths["summary"], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        export.chrome_trace(self, paths["trace"])
        export.timeline_png(self, paths["png"])
        export.html_report(self, paths["png"], paths["html"])
        return paths


__all__ = ["PHASES", "ProfileReport"]

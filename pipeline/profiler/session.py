"""A profiling window over a running engine: switches every process's phase clock on, samples
CPU with psutil, collects device-busy intervals, and builds the :class:`ProfileReport`."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import psutil

from pipeline.runtime.spans import PHASE_ID, PhaseClock, SpanRing, set_active


class CpuSampler(threading.Thread):
    """Per-process CPU utilisation at a low rate (psutil costs ~17 us a call)."""

    def __init__(self, pids: list[int], period_s: float = 0.5) -> None:
        super().__init__(name="profiler-cpu-sampler", daemon=True)
        self.period_s = period_s
        self.procs = {}
        for pid in pids:
            try:
                p = psutil.Process(pid)
                p.cpu_percent(None)  # the first call only sets the baseline
                self.procs[pid] = p
            except psutil.Error:
                pass
        psutil.cpu_percent(None)
        self.samples: list[tuple[int, dict[int, float], float, float | None]] = []
        self._halt = threading.Event()
        self._nvml = _nvml_handle()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            per = {}
            for pid, p in self.procs.items():
                try:
                    per[pid] = p.cpu_percent(None)
                except psutil.Error:
                    per[pid] = float("nan")
            gpu = None
            if self._nvml is not None:
                import pynvml

                gpu = float(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu)
            self.samples.append((time.perf_counter_ns(), per, psutil.cpu_percent(None), gpu))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2 * self.period_s + 1)


def _nvml_handle():
    """NVML device 0 when nvidia-ml-py and a GPU are present (a cross-check only)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:
        return None


class Profiled(Protocol):
    """What a profile needs from the engine it watches, and nothing more."""

    policy: Any
    device: Any
    stats: Any  # .decisions, .env_steps

    def worker_pids(self) -> list[int]: ...

    def local_worker_pids(self) -> list[int | None]: ...

    def worker_rings(self) -> list[SpanRing]: ...

    def set_profiling(self, clock: PhaseClock | None) -> None: ...

    def describe(self) -> dict: ...


class ProfileSession:
    """One profiling window. Use ``engine.profile()`` or ``RolloutEngine(..., profile=True)``.

    Example:
        >>> with engine.profile() as session:
        ...     engine.rollout(8)
        >>> print(session.report().table())
    """

    def __init__(self, engine: Profiled, since: int | None = None) -> None:
        self.engine, self.since = engine, since
        self.running = False
        self._report = None
        self.cuda_events: list[tuple[str, object, object]] = []
        self._anchor = None
        self.ring = SpanRing.local()  # the inference loop's spans

    # -- window ------------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def window(cls, engine) -> Iterator[ProfileSession]:
        """``engine.profile()``: a session for the block, registered as ``engine.profiler``.

        Raises:
            EngineError: a profile is already running on the engine.
        """
        from pipeline.errors import EngineError

        if engine.profiler is not None and engine.profiler.running:
            raise EngineError("a profile is already running (profile=True or a nested profile())")
        session = engine.profiler = cls(engine)
        session.start()
        try:
            yield session
        finally:
            session.stop()  # a no-op when close() already stopped it (an error in the block)
            engine.profiler = None

    def start(self) -> None:
        e = self.engine
        rings = e.worker_rings()
        if self.since is None:  # keep env_init spans when profiling from creation
            for ring in rings:
                ring.clear()
        self.t0 = self.since if self.since is not None else time.perf_counter_ns()
        self.clock = PhaseClock(self.ring)
        if self.since is not None:  # start-up: the loop waited for the workers' envs
            self.ring.add(PHASE_ID["env_init"], self.since, time.perf_counter_ns(), 0)
        self.clock.switch("outside")
        e.set_profiling(self.clock)
        set_active(self.clock)
        self.stats0 = (e.stats.decisions, e.stats.env_steps)
        policy = e.policy
        self.simulated = hasattr(policy, "device_intervals")
        self.sim_start = len(policy.device_intervals) if self.simulated else 0
        # psutil sees this machine only: workers on other machines (Ray) are not sampled,
        # their CPU per phase comes from their own clocks.
        self.local_pids = [os.getpid(), *e.local_worker_pids()]
        self.sampler = CpuSampler([pid for pid in self.local_pids if pid is not None])
        self.sampler.start()
        if getattr(e.device, "type", None) == "cuda":
            import torch

            self._anchor = torch.cuda.Event(enable_timing=True)
            self._anchor.record()
            self._anchor.synchronize()
            self._anchor_ns = time.perf_counter_ns()
        self.running = True

    def stop(self) -> None:
        """End the window and read every process's spans. Idempotent; the engine calls it
        from ``close()`` while its memory is still mapped."""
        if not self.running:
            return
        self.running = False
        e = self.engine
        self.clock.stop()
        set_active(None)
        e.set_profiling(None)
        self.t1 = time.perf_counter_ns()
        self.sampler.stop()
        self.loop_spans = self.ring.spans()
        rings = e.worker_rings()
        self.worker_spans = [r.spans() for r in rings]
        self.dropped = [r.dropped for r in rings] + [self.ring.dropped]
        self.decisions = e.stats.decisions - self.stats0[0]
        self.env_steps = e.stats.env_steps - self.stats0[1]
        self.device_intervals, self.device_source = self._device_intervals()
        self.pids = [os.getpid(), *e.worker_pids()]
        self.config = e.describe()

    # -- device time -------------------------------------------------------------------------
    def cuda_mark(self):
        """A timed event on the current stream (the copy stream inside ``to_device``)."""
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def cuda_interval(self, kind: str, start, end) -> None:
        self.cuda_events.append((kind, start, end))

    def _device_intervals(self) -> tuple[np.ndarray, str]:
        """``[n, 2]`` host-clock intervals when the device was busy, and where they come from."""
        if self.simulated:
            iv = list(self.engine.policy.device_intervals)[self.sim_start :]
            self.device_kinds = ["inference"] * len(iv)
            return np.array(iv, np.int64).reshape(-1, 2), "simulated (LatencyPolicy model)"
        if self.cuda_events and self._anchor is not None:
            import torch

            torch.cuda.synchronize()
            out, self.device_kinds = [], []
            for kind, start, end in self.cuda_events:
                a = self._anchor_ns + int(self._anchor.elapsed_time(start) * 1e6)
                b = self._anchor_ns + int(self._anchor.elapsed_time(end) * 1e6)
                out.append((a, b))
                self.device_kinds.append(kind)
            return np.array(out, np.int64).reshape(
                -1, 2
            ), "CUDA events (inference and copy streams)"
        self.device_kinds = []
        return np.zeros((0, 2), np.int64), "none (CPU inference)"

    def report(self):
        if self.running:
            raise RuntimeError("the profile is still running; leave the `with` block first")
        if self._report is None:
            from pipeline.profiler.report import ProfileReport

            self._report = ProfileReport.from_session(self)
        return self._report

"""Where time goes: phase spans recorded by every process into fixed-size rings.

A process is always in exactly one phase. :class:`PhaseClock` switches phases: each switch
closes the current span (wall time from ``perf_counter_ns``, CPU from ``thread_time_ns``) and
opens the next, so the spans of a process tile its profiled time with no gaps. Worker rings
live in the engine's shared memory; the inference loop's ring is local. ``perf_counter`` is
CLOCK_MONOTONIC, shared by every process, so all spans sit on one timeline.
"""

from __future__ import annotations

import time

import numpy as np

WORKER_PHASES = ("env_init", "reset", "physics", "render", "obs_write", "wait_actions", "signal")
LOOP_PHASES = (
    "wait_obs",
    "preprocess",
    "inference",
    "sample",
    "dispatch",
    "record",
    "bookkeeping",
    "outside",
)
PHASES = WORKER_PHASES + LOOP_PHASES
PHASE_ID = {name: i for i, name in enumerate(PHASES)}
STEPPING_PHASES = ("reset", "physics", "render", "obs_write")  # a worker serving commands

SPAN_DTYPE = np.dtype(
    [("phase", np.uint8), ("t0", np.int64), ("t1", np.int64), ("cpu", np.int64)], align=True
)
RING_CAPACITY = 1 << 15


def union_ns(intervals: np.ndarray, lo: int, hi: int) -> int:
    """Total length of the union of ``[n, 2]`` intervals, clipped to ``[lo, hi]``."""
    if len(intervals) == 0:
        return 0
    iv = np.clip(intervals, lo, hi)
    iv = iv[np.argsort(iv[:, 0])]
    total, cur_a, cur_b = 0, int(iv[0, 0]), int(iv[0, 1])
    for a, b in iv[1:]:
        if a > cur_b:
            total += cur_b - cur_a
            cur_a, cur_b = int(a), int(b)
        else:
            cur_b = max(cur_b, int(b))
    return total + cur_b - cur_a


class SpanRing:
    """The last ``len(buf)`` spans, over a numpy array (local or in shared memory).

    ``head`` counts every span ever added (a one-element int64 array, so a reader in another
    process sees it).
    """

    def __init__(self, buf: np.ndarray, head: np.ndarray) -> None:
        self.buf, self.head = buf, head

    @classmethod
    def local(cls, capacity: int = RING_CAPACITY) -> SpanRing:
        return cls(np.zeros(capacity, SPAN_DTYPE), np.zeros(1, np.int64))

    def add(self, phase: int, t0: int, t1: int, cpu: int) -> None:
        h = int(self.head[0])
        self.buf[h % len(self.buf)] = (phase, t0, t1, cpu)
        self.head[0] = h + 1

    def clear(self) -> None:
        self.head[0] = 0

    @property
    def dropped(self) -> int:
        return max(0, int(self.head[0]) - len(self.buf))

    def spans(self) -> np.ndarray:
        """The retained spans, oldest first (a copy)."""
        h, cap = int(self.head[0]), len(self.buf)
        if h <= cap:
            return self.buf[:h].copy()
        i = h % cap
        return np.concatenate([self.buf[i:], self.buf[:i]])


class PhaseClock:
    """Attributes every instant of a process to one phase.

    Example:
        >>> clock = PhaseClock(SpanRing.local())
        >>> clock.switch("wait_obs")      # ... blocked ...
        >>> clock.switch("inference")     # closes the wait_obs span
        >>> clock.stop()
    """

    def __init__(self, ring: SpanRing) -> None:
        self.ring = ring
        self.phase = -1
        self.t = self.c = 0

    def switch(self, phase: str, tail: tuple[str, int, int] | None = None) -> None:
        """Close the current span and open ``phase``.

        ``tail = (name, wall_ns, cpu_ns)`` carves the last ``wall_ns`` of the closing span off
        into a span of its own (e.g. the render at the end of a chunk of physics).
        """
        t, c = time.perf_counter_ns(), time.thread_time_ns()
        if self.phase >= 0:
            if tail is not None:
                name, wall, cpu = tail
                cut = max(self.t, t - wall)
                self.ring.add(self.phase, self.t, cut, max(0, c - self.c - cpu))
                self.ring.add(PHASE_ID[name], cut, t, cpu)
            else:
                self.ring.add(self.phase, self.t, t, c - self.c)
        self.phase, self.t, self.c = PHASE_ID[phase], t, c

    def stop(self) -> None:
        """Close the current span; the clock records nothing until the next switch."""
        if self.phase >= 0:
            t, c = time.perf_counter_ns(), time.thread_time_ns()
            self.ring.add(self.phase, self.t, t, c - self.c)
        self.phase = -1


class PhaseSwitch:
    """The inference loop's phase switch, shared by the loop's parts: a no-op until a profile
    hands it a clock.

    Example:
        >>> phase = PhaseSwitch()
        >>> phase("inference")               # nothing: no profile is running
        >>> phase.clock = PhaseClock(SpanRing.local())
        >>> phase("inference")               # a span opens
    """

    __slots__ = ("clock",)

    def __init__(self) -> None:
        self.clock: PhaseClock | None = None

    def __call__(self, name: str) -> None:
        if self.clock is not None:
            self.clock.switch(name)


_active: PhaseClock | None = None  # the inference loop's clock while a profile runs


def set_active(clock: PhaseClock | None) -> None:
    global _active
    _active = clock


def mark(phase: str) -> None:
    """Switch the running profile's inference-loop clock to ``phase``; a no-op otherwise.

    Policies call ``mark("sample")`` where their forward pass turns into sampling, so the
    profile separates the two. Example: ``pipeline.profiler.mark("sample")``.
    """
    if _active is not None:
        _active.switch(phase)
